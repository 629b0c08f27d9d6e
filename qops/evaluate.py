"""Evaluate FP32 and quantized models on a validation set: metrics overall and per slice, fairness
(fairlearn), agreement, file size and batch-1 latency, measured in the same process."""

from __future__ import annotations

import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qops.data import feature_columns_for, feature_matrix, read_table, require_columns
from qops.errors import DataError, ModelError

log = logging.getLogger(__name__)


@dataclass
class ModelEval:
    overall: float
    slices: dict  # "col=value" -> {"value": float|None, "n": int}
    fairness: dict  # col -> {"demographic_parity_difference": float, "equalized_odds_difference": float}
    size_bytes: int
    latency_p50_ms: float
    latency_p90_ms: float


@dataclass
class EvaluationResult:
    metric: str
    rows: int
    label: str
    slice_columns: list[str]
    fp32: ModelEval
    quantized: ModelEval
    agreement: float  # share of rows where both models predict the same class
    fp32_model: str
    quantized_model: str
    validation: str
    hardware: dict = field(default_factory=dict)
    latency_method: str = ""


def worker_hardware() -> dict:
    """The evaluating worker's CPU, recorded with every latency figure."""
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = set()
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        info["isa"] = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                        "amx_bf16", "fma"})
    except OSError:
        pass
    return info


def _session(model_path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot load {model_path}: {e}", "check the model file and opset.") from None


def predict(model_path: str | os.PathLike, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Class predictions: argmax of [N, C] outputs, or threshold 0.5 on a single probability/logit column."""
    sess = _session(model_path)
    try:
        out = sess.run(None, feed)[0]
    except Exception as e:
        raise DataError(f"Running {Path(model_path).name} on the data failed: {e}",
                        "check that the data's features match the model's inputs.") from None
    out = np.asarray(out)
    if out.ndim == 2 and out.shape[1] > 1:
        return out.argmax(axis=1)
    flat = out.reshape(len(out), -1)[:, 0]
    threshold = 0.5 if (flat.min() >= 0 and flat.max() <= 1) else 0.0
    return (flat > threshold).astype(int)


def _metric(name: str, y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    if len(y) == 0:
        return None
    if name == "accuracy":
        return float(accuracy_score(y, p))
    if name == "f1":
        return float(f1_score(y, p, zero_division=0))
    if name == "roc_auc":
        return float(roc_auc_score(y, p)) if len(np.unique(y)) > 1 else None
    raise DataError(f"Unknown metric {name!r}.", "use accuracy, f1 or roc_auc.")


def _fairness(y: np.ndarray, p: np.ndarray, frame: pd.DataFrame, slice_columns: list[str]) -> dict:
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    out = {}
    binary = set(np.unique(y)).issubset({0, 1})
    for col in slice_columns:
        sens = frame[col].astype(str).fillna("missing").to_numpy()
        entry = {"demographic_parity_difference": None, "equalized_odds_difference": None}
        if binary and len(np.unique(sens)) > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                entry["demographic_parity_difference"] = float(
                    demographic_parity_difference(y, p, sensitive_features=sens))
                entry["equalized_odds_difference"] = float(equalized_odds_difference(y, p, sensitive_features=sens))
        out[col] = entry
    return out


def _model_eval(metric: str, y, p, frame, slice_columns, size, lat) -> ModelEval:
    slices = {}
    for col in slice_columns:
        values = frame[col].astype(str).fillna("missing")
        for v in sorted(values.unique()):
            m = (values == v).to_numpy()
            slices[f"{col}={v}"] = {"value": _metric(metric, y[m], p[m]), "n": int(m.sum())}
    return ModelEval(
        overall=_metric(metric, y, p), slices=slices, fairness=_fairness(y, p, frame, slice_columns),
        size_bytes=int(size), latency_p50_ms=round(float(np.median(lat)) * 1e3, 4),
        latency_p90_ms=round(float(np.quantile(lat, 0.9)) * 1e3, 4),
    )


def measure_latency(models: list[str | os.PathLike], feed: dict[str, np.ndarray], runs: int = 300,
                    warmup: int = 30) -> list[np.ndarray]:
    """Batch-1 latency of several models, interleaved run by run in one process (one intra-op thread)
    so that clock, cache and load changes hit all models alike."""
    sessions = [_session(m, threads=1) for m in models]
    row = {k: v[:1] for k, v in feed.items()}
    for _ in range(warmup):
        for s in sessions:
            s.run(None, row)
    times = [np.empty(runs) for _ in sessions]
    for i in range(runs):
        for j, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, row)
            times[j][i] = time.perf_counter() - t0
    return times


def evaluate(
    fp32_model: str | os.PathLike,
    quantized_model: str | os.PathLike,
    validation: str | os.PathLike,
    label: str,
    slice_columns: list[str] | None = None,
    features: list[str] | None = None,
    metric: str = "accuracy",
    latency_runs: int = 300,
) -> EvaluationResult:
    slice_columns = list(slice_columns or [])
    df = read_table(validation, "validation set")
    if len(df) == 0:
        raise DataError(f"The validation set {validation} is empty.", "point data.validation at labelled rows.")
    require_columns(df, [label] + slice_columns, "validation set", validation)
    if df[label].isna().any():
        raise DataError(f"The validation set's label column {label!r} has missing values.",
                        "drop unlabelled rows from the validation set.")
    feats = feature_columns_for(fp32_model, features)
    feed = feature_matrix(df, fp32_model, feats, "validation set")
    qfeed = feature_matrix(df, quantized_model, feats, "validation set")
    y = df[label].to_numpy()
    p32 = predict(fp32_model, feed)
    pq = predict(quantized_model, qfeed)
    log.info("timing batch-1 latency: %d interleaved runs per model", latency_runs)
    lat32, latq = measure_latency([fp32_model, quantized_model], feed, runs=latency_runs)
    size32, sizeq = Path(fp32_model).stat().st_size, Path(quantized_model).stat().st_size
    return EvaluationResult(
        metric=metric, rows=len(df), label=label, slice_columns=slice_columns,
        fp32=_model_eval(metric, y, p32, df, slice_columns, size32, lat32),
        quantized=_model_eval(metric, y, pq, df, slice_columns, sizeq, latq),
        agreement=float((p32 == pq).mean()), fp32_model=str(fp32_model), quantized_model=str(quantized_model),
        validation=str(validation), hardware=worker_hardware(),
        latency_method=f"batch 1, p50 of {latency_runs} runs interleaved FP32/quantized, 1 intra-op thread, "
        "ONNX Runtime CPUExecutionProvider",
    )
