"""Evaluate FP32 and quantized models on a validation set, in the same process.

Per model: metrics overall and per slice (each slice column, and intersections of columns), label-free
fidelity against FP32, fairness (fairlearn), file size and batch-1 latency. Every FP32-vs-quantized
delta carries its evidence: for paired binary outcomes (accuracy, top-1 agreement) the discordant row
counts and Tango's score interval; for other metrics and for fairness increases a paired bootstrap (the
same resampled rows for both models) with its percentile interval and standard error. Classifier
outputs are read as logits or probabilities once, decided on the FP32 model's outputs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from qops.data import data_kind, onnx_io, read_table, require_columns
from qops.errors import DataError, ModelError
from qops.evaluate.hardware import file_size, hardware_match, measure_latency, worker_hardware
from qops.evaluate.metrics import (
    Scorer,
    check_labels,
    default_metrics,
    degradation,
    fidelity_metrics,
    higher_is_better,
    load_custom_metric,
    model_side,
    output_fidelity,
    output_semantics,
)
from qops.evaluate.outputs import fp32_outputs, run_model
from qops.evaluate.slices import slice_fairness, slice_keys
from qops.metric_names import (
    CLASSIFICATION_METRICS,
    EMBEDDING_METRICS,
    FAIRNESS_METRICS,
    FIDELITY_METRICS,
    HIGHER_IS_BETTER,
    REGRESSION_METRICS,
)

log = logging.getLogger(__name__)



@dataclass
class EvaluationResult:
    task: str
    primary_metric: str
    metrics: list[str]
    rows: int
    label: str | None
    dimensions: list[str]
    overall: dict  # metric -> {fp32, quantized, delta, ci_low, ci_high}
    slices: list[dict]  # {dimension, key, n, metrics: {metric -> {...}}}
    fairness: dict  # dimension -> {fp32: {...}, quantized: {...}, groups_used, groups_too_small}
    performance: dict
    fp32_model: str
    quantized_model: str
    validation: str
    bootstrap: dict = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)
    hardware_match: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)  # always measured vs FP32: agreement, cosine, SQNR, max error
    outputs: str = "logits"  # how classifier outputs were read (decided on FP32's, applied to both models)
    flips: int | None = None  # validation rows whose predicted class differs between the two models
    data: dict = field(default_factory=dict)  # the data kind that built the feeds
    batch_size: int | None = None  # validation rows per inference batch
    embedding_output: str | None = None
    embedding_fidelity: dict = field(default_factory=dict)


def evaluate(
    fp32_model: str | os.PathLike,
    quantized_model: str | os.PathLike,
    validation: str | os.PathLike,
    label: str | None,
    slice_columns: list[str] | None = None,
    features: list[str] | None = None,
    metric: str | None = None,
    latency_runs: int = 300,
    *,
    task: str = "classification",
    metrics: list[str] | None = None,
    custom_metrics: dict[str, str] | None = None,
    intersections: list[list[str]] | None = None,
    min_slice_size: int = 20,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    target: dict | None = None,
    outputs: str = "auto",
    output: str | None = None,
    embedding_output: str | None = None,
    batch_size: int | None = None,
) -> EvaluationResult:
    """Evaluate FP32 vs quantized. ``label=None``: label-free, fidelity metrics only. ``features`` is a list of
    tabular feature columns or a :class:`~qops.data.DataKind` (tensors, text, image); the validation rows are
    run in batches of ``batch_size``. ``output`` names the output the task reads (default the first);
    ``embedding_output`` a further output of embeddings (adds embedding_cosine and neighbor_agreement).
    ``batch_size`` None: 1 for text (unpadded rows; dynamic INT8 scales activations per batch, as a batch-1
    server does), 64 otherwise."""
    slice_columns = list(slice_columns or [])
    intersections = [list(i) for i in (intersections or [])]
    df = read_table(validation, "validation set")
    if len(df) == 0:
        raise DataError(f"The validation set {validation} is empty.", "point data.validation at labelled rows.")
    require_columns(df, ([label] if label else []) + slice_columns + [c for i in intersections for c in i],
                    "validation set", validation)
    if label and df[label].isna().any():
        raise DataError(f"The validation set's label column {label!r} has missing values.",
                        "drop unlabelled rows from the validation set, or set data.label: null for label-free "
                        "fidelity gates.")
    custom = {name: load_custom_metric(path) for name, path in (custom_metrics or {}).items()}
    if task == "embedding" and label is not None:
        label = None  # embeddings are judged against FP32's, label-free
    names = list(metrics or default_metrics(task, label is not None, embedding_output is not None)) + [
        m for m in custom if m not in (metrics or [])]
    primary = metric or names[0]
    if primary not in names:
        names.insert(0, primary)
    if label is None:
        allowed = fidelity_metrics(task, embedding_output is not None)
        bad = [m for m in names if m not in allowed and m not in custom]
        if bad:
            raise DataError(f"Metrics {bad} need labels but the validation set has none (data.label is null).",
                            f"use fidelity metrics {allowed} or give the label column.")
    kind = data_kind(fp32_model, features, validation)
    if batch_size is None:
        batch_size = 1 if kind.kind == "text" else 64
    wanted = [output] + ([embedding_output] if embedding_output else [])
    res32 = fp32_outputs(fp32_model, df, validation, target, kind, wanted, batch_size)
    resq = run_model(quantized_model, df, target, kind=kind, outputs=wanted, batch_size=batch_size)
    out32, outq = res32[0], resq[0]
    emb32, embq = (res32[1], resq[1]) if embedding_output else (None, None)
    y = df[label].to_numpy() if label else None
    if out32.shape != outq.shape:
        raise ModelError(f"FP32 output shape {out32.shape} differs from the quantized model's {outq.shape}.",
                         "quantize the same FP32 model that is evaluated.")
    if y is not None:
        y = check_labels(y, task, out32, label, validation)
    semantics = output_semantics(task, out32, outputs) if task != "embedding" else "embeddings"
    f32 = model_side(task, out32, out32, y, semantics, emb32, emb32)
    q = model_side(task, outq, out32, y, semantics, embq, emb32)
    fidelity = output_fidelity(task, out32, outq)
    scorer = Scorer(names, y, f32, q, custom, bootstrap, confidence, seed)
    dims = [[c] for c in slice_columns] + intersections
    everything = np.arange(len(df))
    overall = scorer.score(everything, "__overall__")
    slices = [{"dimension": d, "key": k, "n": int(len(rows)), "flips": scorer.flips(rows),
               "metrics": scorer.score(rows, k)} for d, k, rows in slice_keys(df, dims)]
    fairness = slice_fairness(y, f32, q, df, dims, primary, scorer, min_slice_size) if dims else {}
    log.info("timing batch-1 latency: %d interleaved runs per model", latency_runs)
    runners: list = []
    lat_feed, lat_shape = kind.latency_feed(df, onnx_io(fp32_model)[0])
    lat32, latq = measure_latency([fp32_model, quantized_model], lat_feed, runs=latency_runs, recipe=target,
                                  describe=runners)
    size32, sizeq = file_size(fp32_model), file_size(quantized_model)
    hw = worker_hardware()
    p50_32, p50_q = float(np.median(lat32)) * 1e3, float(np.median(latq)) * 1e3
    performance = {
        "size_bytes": {"fp32": int(size32), "quantized": int(sizeq)},
        "size_ratio": sizeq / size32,
        "latency_p50_ms": {"fp32": round(p50_32, 5), "quantized": round(p50_q, 5)},
        "latency_p90_ms": {"fp32": round(float(np.quantile(lat32, 0.9)) * 1e3, 5),
                           "quantized": round(float(np.quantile(latq, 0.9)) * 1e3, 5)},
        "latency_ratio": p50_q / p50_32,
        "latency_method": f"batch 1 ({lat_shape}), p50 of {latency_runs} runs interleaved FP32/quantized, "
        f"1 intra-op thread; FP32: {runners[0]}; quantized: {runners[1]}",
        "latency_input": lat_shape,
    }
    return EvaluationResult(
        task=task, primary_metric=primary, metrics=names, rows=len(df), label=label, outputs=semantics,
        flips=scorer.flips(everything),
        dimensions=[" & ".join(d) for d in dims], overall=overall, slices=slices, fairness=fairness,
        performance=performance, batch_size=batch_size, fp32_model=str(fp32_model), quantized_model=str(quantized_model),
        validation=str(validation), bootstrap={"resamples": bootstrap, "confidence": confidence, "seed": seed,
                                               "paired": True, "binary_metrics": "score interval on discordant "
                                               "pairs (Tango)"},
        hardware=hw, hardware_match=hardware_match(target, hw), fidelity=fidelity, data=kind.describe(),
        embedding_output=embedding_output,
        embedding_fidelity=output_fidelity("embedding", emb32, embq) if embedding_output else {},
    )


def evaluate_with_gates(fp32_model, quantized_model, validation, gates, *, label: str | None,
                        slice_columns: list[str] | None = None, intersections: list[list[str]] | None = None,
                        features=None, target: dict | None = None, latency_runs: int | None = None,
                        bootstrap: int | None = None) -> EvaluationResult:
    """:func:`evaluate` with its settings taken whole from the spec's ``gates`` section (a
    :class:`~qops.spec.GateSpec`): the evaluate stage, and the tuner's judge (fewer timed runs and resamples)."""
    g = gates
    return evaluate(fp32_model, quantized_model, validation, label, slice_columns, features=features, metric=g.metric,
                    latency_runs=g.latency_runs if latency_runs is None else latency_runs, task=g.task,
                    metrics=g.metrics, custom_metrics=g.custom_metrics, intersections=intersections,
                    min_slice_size=g.min_slice_size, bootstrap=g.bootstrap if bootstrap is None else bootstrap,
                    confidence=g.confidence, seed=g.seed, target=target, outputs=g.outputs, output=g.output,
                    embedding_output=g.embedding_output, batch_size=g.batch_size)


__all__ = ["CLASSIFICATION_METRICS", "EMBEDDING_METRICS", "FAIRNESS_METRICS", "FIDELITY_METRICS", "HIGHER_IS_BETTER",
           "REGRESSION_METRICS", "EvaluationResult", "default_metrics", "degradation", "evaluate", "evaluate_with_gates",
           "fidelity_metrics", "file_size", "hardware_match", "higher_is_better", "measure_latency", "output_fidelity",
           "run_model", "slice_keys", "worker_hardware"]
