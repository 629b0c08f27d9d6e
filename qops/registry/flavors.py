"""How each kind of quantized LLM artifact is logged to MLflow: Transformers folders with the transformers flavor
(a pre-quantized one — bitsandbytes, compressed-tensors — with its weights byte for byte), GGUF files as a pyfunc
model whose code (:mod:`qops.registry.gguf_pyfunc`, "models from code": nothing is pickled) loads them with
llama.cpp."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

GGUF_PYFUNC = Path(__file__).with_name("gguf_pyfunc.py")


@contextlib.contextmanager
def offline_hub():
    """No Hugging Face Hub look-ups (model cards, licences) while transformers and MLflow load and save."""
    import huggingface_hub.constants as hub

    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    old_hub = hub.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    hub.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub: set it where it is read
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old_hub
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_transformers_model(folder: str | os.PathLike, pip_requirements: list[str], **kwargs):
    """Log a causal-LM folder with MLflow's transformers flavor, offline. MLflow 3.17 cannot log a local checkpoint
    path with transformers 5 (its task table changed), so the model and tokenizer are loaded and logged as
    objects; requirements are stated (its inference pins torchvision, which an LLM does not need)."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with offline_hub():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return mlflow.transformers.log_model({"model": model, "tokenizer": tok}, name="model",
                                             task="text-generation", pip_requirements=pip_requirements, **kwargs)


def log_prequantized_transformers_model(folder: str | os.PathLike, pip_requirements: list[str]):
    """Log a pre-quantized checkpoint folder (bitsandbytes, compressed-tensors) with the transformers flavor, its
    weights byte for byte: transformers cannot re-save a model loaded from a bitsandbytes folder (no reverse of its
    deserialization), a re-save of NF4 with double quantization is not exact, and a compressed-tensors folder must
    reach vLLM as llm-compressor's layout wrote it. So the flavor's files are written from the loaded model
    (its conversion record dropped), then its weights and config are replaced by the folder's own, and the model
    directory is logged to the active run. Returns an object with ``model_uri`` like ``log_model``'s."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    with offline_hub():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                 if not any("Deserialize" in type(op).__name__ for op in getattr(c, "operations", []))]
    with tempfile.TemporaryDirectory(prefix="qops-bnb-") as td:
        path = Path(td) / "model"
        with offline_hub():
            mlflow.transformers.save_model({"model": model, "tokenizer": tok}, path=str(path), task="text-generation",
                                           pip_requirements=pip_requirements)
        weights = path / "model"
        for f in weights.glob("*.safetensors*"):
            f.unlink()
        for f in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")) + [
                folder / "config.json"]:
            shutil.copy(f, weights / f.name)
        mlflow.log_artifacts(str(path), artifact_path="model")
    return SimpleNamespace(model_uri=f"runs:/{mlflow.active_run().info.run_id}/model")


def log_gguf_model(path: str | os.PathLike, pip_requirements: list[str], kv_cache_type: str = "f16",
                   n_ctx: int = 2048):
    """Log a GGUF file as an MLflow pyfunc model served by llama.cpp: the file is the model's ``gguf`` artifact
    (``llama-server -m`` takes it as is), :mod:`qops.registry.gguf_pyfunc` its code; ``predict`` takes prompts and
    returns greedy completions (param ``max_tokens``)."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    signature = infer_signature(pd.DataFrame({"prompt": ["The government said"]}), ["text"],
                                params={"max_tokens": 32})
    return mlflow.pyfunc.log_model(name="model", python_model=str(GGUF_PYFUNC), artifacts={"gguf": str(path)},
                                   model_config={"n_ctx": n_ctx, "kv_cache_type": kv_cache_type},
                                   signature=signature, pip_requirements=pip_requirements)
