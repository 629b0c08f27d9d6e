"""Quantization DAG for the decoder-LLM example (``make demo-llm``), built from dags/specs/smollm2.yaml.

Scheduled on the Asset that smollm2_publish updates (mlflow://smollm2-135m/champion): the registered GGUF
dequantized once into an FP32 Transformers folder, calibration windows drift-checked on token statistics, every
decoder engine (ONNX Runtime GenAI INT4 and W8A8, llama.cpp GGUF, compressed-tensors for vLLM, the guide's
bitsandbytes NF4), perplexity / agreement / KL gates per news domain, generation speed, cards and registration per
target.
"""

from pathlib import Path

from qops_airflow.dag_factory import build_quantization_dag

dag = build_quantization_dag(Path(__file__).parent / "specs" / "smollm2.yaml", dag_id="smollm2_quantize")
