"""Example retraining job: a credit-risk MLP on the German Credit data, logged to MLflow.

It is what a team's scheduled retraining looks like from qops' side: prepare the data splits
(training = drift reference, validation with slice columns, a pool of recent production rows),
train a model, log it to MLflow as ONNX and point alias ``champion`` at it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qops.artifacts import atomic_path, write_json_atomic
from qops.datasets import load_german_credit
from qops.quantize.torch_engine import export_fp32
from qops.registry import configure_mlflow

log = logging.getLogger(__name__)

CATEGORICAL = ["job", "housing", "saving_accounts", "checking_account", "purpose"]
NUMERIC = ["credit_amount", "duration", "age"]
LABEL = "risk"
SLICES = ["sex", "age_group"]


def age_group(age: pd.Series) -> pd.Series:
    return pd.cut(age, bins=[0, 25, 40, 200], labels=["under_25", "25_to_40", "over_40"], right=False).astype(str)


def encode(df: pd.DataFrame, stats: dict) -> pd.DataFrame:
    """Standardize numeric columns, one-hot the categoricals; keep label and slice columns."""
    out = pd.DataFrame(index=df.index)
    for c in NUMERIC:
        v = np.log1p(df[c]) if c == "credit_amount" else df[c].astype(float)
        out[f"num_{c}"] = ((v - stats["mean"][c]) / stats["std"][c]).astype("float32")
    for c in CATEGORICAL:
        for level in stats["levels"][c]:
            out[f"{c}={level}"] = (df[c].astype(str) == level).astype("float32")
    out["sex"] = df["sex"].astype(str)
    out["age_group"] = age_group(df["age"])
    out[LABEL] = df[LABEL].astype("int64")
    return out


@dataclass
class PreparedData:
    train: str
    validation: str
    pool: str
    features: list[str]


def prepare_data(out_dir: str | os.PathLike, seed: int = 7) -> PreparedData:
    """Split 60/20/20 into train (drift reference), validation and a production pool; write parquet."""
    raw = load_german_credit()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(raw))
    n_train, n_val = int(0.6 * len(raw)), int(0.2 * len(raw))
    parts = {
        "train": raw.iloc[idx[:n_train]],
        "validation": raw.iloc[idx[n_train : n_train + n_val]],
        "pool": raw.iloc[idx[n_train + n_val :]],
    }
    tr = parts["train"]
    stats = {
        "mean": {c: float((np.log1p(tr[c]) if c == "credit_amount" else tr[c]).mean()) for c in NUMERIC},
        "std": {c: float((np.log1p(tr[c]) if c == "credit_amount" else tr[c]).std()) for c in NUMERIC},
        "levels": {c: sorted(raw[c].astype(str).unique().tolist()) for c in CATEGORICAL},
    }
    out = Path(out_dir)
    paths = {}
    for name, frame in parts.items():
        enc = encode(frame, stats).reset_index(drop=True)
        with atomic_path(out / f"{name}.parquet") as tmp:
            enc.to_parquet(tmp, index=False)
        paths[name] = str(out / f"{name}.parquet")
    features = [c for c in enc.columns if c not in (*SLICES, LABEL)]
    write_json_atomic(out / "encoding.json", {"stats": stats, "features": features})
    return PreparedData(paths["train"], paths["validation"], paths["pool"], features)


def train_mlp(train_path: str, features: list[str], hidden: int = 1024, epochs: int = 60, seed: int = 0):
    """Train a 3-hidden-layer MLP (full-batch AdamW); returns the torch module in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    df = pd.read_parquet(train_path)
    x = torch.tensor(df[features].to_numpy(np.float32))
    y = torch.tensor(df[LABEL].to_numpy(np.int64))
    model = nn.Sequential(
        nn.Linear(len(features), hidden), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 2),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if epoch % 10 == 0 or epoch == epochs - 1:
            log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, loss.item())
    model.eval()
    return model


def export_onnx(model, n_features: int, features: list[str], path: str | os.PathLike) -> Path:
    """Export to ONNX (dynamic batch) with the feature column names in the model's metadata."""
    import onnx
    import torch

    dummy = torch.zeros(1, n_features)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            model, (dummy,), str(tmp), input_names=["features"], output_names=["logits"],
            dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )
        m = onnx.load(str(tmp))
        entry = m.metadata_props.add()
        entry.key, entry.value = "qops.feature_columns", ",".join(features)
        onnx.save(m, str(tmp))
    return Path(path)


TORCH_PROGRAM_TAG = "qops.torch_program"


def retrain_and_register(
    work_dir: str | os.PathLike,
    model_name: str = "german-credit",
    tracking_uri: str | None = None,
    alias: str = "champion",
    hidden: int = 1024,
    epochs: int = 60,
    seed: int = 0,
) -> dict:
    """The whole retraining job. Returns small JSON: data paths, model URI, version, accuracy."""
    import mlflow
    import onnx
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    configure_mlflow(tracking_uri)
    work = Path(work_dir)
    data = prepare_data(work / "data")
    model = train_mlp(data.train, data.features, hidden=hidden, epochs=epochs, seed=seed)
    onnx_path = export_onnx(model, len(data.features), data.features, work / "model" / "model.onnx")

    program = export_fp32(model, data.features, work / "model" / "model.pt2")  # what QAT trains

    import onnxruntime as ort

    val = pd.read_parquet(data.validation)
    xv = val[data.features].to_numpy(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"features": xv})[0]
    acc = float((logits.argmax(1) == val[LABEL].to_numpy()).mean())
    log.info("validation accuracy %.4f", acc)

    mlflow.set_experiment("qops-retraining")
    with mlflow.start_run(run_name=f"retrain-{model_name}") as run:
        mlflow.log_params({"hidden": hidden, "epochs": epochs, "seed": seed, "n_features": len(data.features)})
        mlflow.log_metric("val_accuracy", acc)
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            signature=infer_signature(xv[:5], logits[:5]),
            registered_model_name=model_name,
        )
        mlflow.log_artifact(str(program), artifact_path="torch_program")
    version = info.registered_model_version
    client = MlflowClient()
    # the torch.export program the ONNX model was exported from: the QAT stage trains it (docs/qat.md)
    client.set_model_version_tag(model_name, version, TORCH_PROGRAM_TAG,
                                 f"runs:/{run.info.run_id}/torch_program/{program.name}")
    client.set_registered_model_alias(model_name, alias, version)
    result = {
        "model_uri": f"models:/{model_name}@{alias}",
        "model_name": model_name,
        "version": str(version),
        "run_id": run.info.run_id,
        "val_accuracy": acc,
        "data": {"train": data.train, "validation": data.validation, "pool": data.pool},
        "n_features": len(data.features),
    }
    write_json_atomic(work / "result.json", result)
    return result
