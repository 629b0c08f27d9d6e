"""Metrics of one model's outputs against labels or the FP32 outputs: what the outputs mean (logits,
probabilities, scores, embeddings), task metrics, fidelity (agreement, cosine, SQNR, KL), custom metrics, and
which way is better."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from qops.errors import DataError
from qops.evaluate.outputs import nearest_neighbors
from qops.metric_names import (
    CLASSIFICATION_METRICS,
    EMBEDDING_METRICS,
    FIDELITY_METRICS,
    HIGHER_IS_BETTER,
    REGRESSION_METRICS,
)
from qops.stats import tango_interval

# metric -> per-row 0/1 outcome (FP32's own agreement and neighbour agreement are 1 on every row)
PAIRED_BINARY = {"accuracy": "correct", "agreement": "agreement", "neighbor_agreement": "neighbor_agreement"}


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER.get(metric, True)


def degradation(metric: str, fp32: float, quantized: float) -> float:
    """How much worse the quantized model is (positive = worse), whatever the metric's direction."""
    return (fp32 - quantized) if higher_is_better(metric) else (quantized - fp32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Side:
    """Per-row quantities of one model, from which every metric is a mean or a ratio of sums."""

    pred: np.ndarray
    score: np.ndarray | None  # positive-class score (binary classification)
    rows: dict[str, np.ndarray] = field(default_factory=dict)


def output_semantics(task: str, ref: np.ndarray, outputs: str = "auto") -> str:
    """``logits`` or ``probabilities``, decided once on the FP32 outputs and applied to both models.
    ``auto``: probabilities when every FP32 output is in [0, 1] (and, with several columns, rows sum to 1)."""
    if task == "regression":
        return "values"
    if outputs in ("logits", "probabilities"):
        return outputs
    if outputs != "auto":
        raise DataError(f"gates.outputs {outputs!r} is not one of logits, probabilities, auto.",
                        "set gates.outputs to logits, probabilities or auto.")
    in_unit = ref.size > 0 and float(ref.min()) >= 0.0 and float(ref.max()) <= 1.0
    if ref.shape[1] > 1:
        return "probabilities" if in_unit and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3) else "logits"
    return "probabilities" if in_unit else "logits"


def check_labels(y: np.ndarray, task: str, out: np.ndarray, label: str, path) -> np.ndarray:
    """Labels the task can score: numbers for regression; class indices 0..K-1 of the model's K outputs (two for
    a single-logit binary model) for classification. Anything else is a :class:`DataError` naming the values."""

    values = pd.Series(y)
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values[numeric.isna()]
    if len(bad):
        raise DataError(f"The validation set's label column {label!r} ({path}) holds non-numeric values, e.g. "
                        f"{sorted(map(str, bad.unique()))[:5]}.",
                        "encode the labels as numbers (class indices 0..K-1 in the order of the model's outputs), "
                        "or set data.label: null for label-free fidelity gates.")
    y = numeric.to_numpy()
    if task != "classification":
        return y.astype(float)
    classes = out.shape[1] if out.ndim == 2 and out.shape[1] > 1 else 2
    wrong = sorted({float(v) for v in y if v != int(v) or not 0 <= v < classes})
    if wrong:
        shown = [int(v) if v == int(v) else v for v in wrong[:5]]
        raise DataError(f"The validation set's label column {label!r} ({path}) holds {shown}, which are not class "
                        f"indices of the model: it has {classes} classes (0..{classes - 1}).",
                        "give labels as class indices matching the model's outputs, or fix data.label (for a "
                        "regression model set gates.task: regression).")
    return y.astype(int)


def model_side(task: str, out: np.ndarray, ref: np.ndarray, y: np.ndarray | None, semantics: str = "logits",
          emb: np.ndarray | None = None, emb_ref: np.ndarray | None = None) -> Side:
    """Per-row outcomes of one model against FP32's outputs ``ref`` (and its embeddings ``emb_ref``)."""
    side = _side_task(task, out, ref, y, semantics)
    e, e_ref = (emb, emb_ref) if emb is not None else ((out, ref) if task == "embedding" else (None, None))
    if e is not None and len(e) > 1:
        side.rows["neighbor_agreement"] = (nearest_neighbors(e) == nearest_neighbors(e_ref)).astype(float)
        if emb is not None:
            side.rows["embedding_cosine"] = _row_cosine(emb, emb_ref)
    return side


def _side_task(task: str, out: np.ndarray, ref: np.ndarray, y: np.ndarray | None, semantics: str) -> Side:
    if task == "embedding":
        return Side(pred=np.zeros(len(out), dtype=int), score=None, rows={"cosine": _row_cosine(out, ref)})
    if task == "regression":
        pred, score = out[:, 0], None
        rows = {}
        if y is not None:
            err = pred - y.astype(float)
            rows = {"abs_err": np.abs(err), "sq_err": err**2}
    else:
        is_prob = semantics == "probabilities"
        if out.shape[1] > 1:
            if is_prob:
                prob = np.clip(out, 0.0, 1.0)
                ref_prob = np.clip(ref, 0.0, 1.0)
            else:
                prob, ref_prob = _softmax(out), _softmax(ref)
            pred, ref_pred = prob.argmax(1), ref_prob.argmax(1)
            score = prob[:, 1] if out.shape[1] == 2 else None
            kl = np.sum(ref_prob * (np.log(ref_prob + 1e-12) - np.log(prob + 1e-12)), axis=1)
        else:
            flat, ref_flat = out[:, 0], ref[:, 0]
            cut = 0.5 if is_prob else 0.0
            pred = (flat > cut).astype(int)
            ref_pred = (ref_flat > cut).astype(int)
            score = flat
            p = np.clip(flat, 0.0, 1.0) if is_prob else 1 / (1 + np.exp(-flat))
            q = np.clip(ref_flat, 0.0, 1.0) if is_prob else 1 / (1 + np.exp(-ref_flat))
            kl = q * np.log((q + 1e-12) / (p + 1e-12)) + (1 - q) * np.log((1 - q + 1e-12) / (1 - p + 1e-12))
        rows = {"agreement": (pred == ref_pred).astype(float), "kl": kl}
        if y is not None:
            rows["label"] = np.asarray(y, dtype=float)
            rows["correct"] = (pred == y).astype(float)
            rows["tp"] = ((pred == 1) & (y == 1)).astype(float)
            rows["fp"] = ((pred == 1) & (y != 1)).astype(float)
            rows["fn"] = ((pred != 1) & (y == 1)).astype(float)
    rows["cosine"] = _row_cosine(out, ref)
    return Side(pred=pred, score=score, rows=rows)


def _row_cosine(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine per row; 1 where both rows are zero, 0 where only one is (a collapsed output is not faithful)."""
    no, nr = np.linalg.norm(out, axis=1), np.linalg.norm(ref, axis=1)
    norm = no * nr
    cos = np.sum(out * ref, axis=1) / np.where(norm > 0, norm, 1)
    return np.where(norm > 0, cos, np.where((no == 0) & (nr == 0), 1.0, 0.0))


def output_fidelity(task: str, ref: np.ndarray, out: np.ndarray) -> dict:
    """Label-free agreement of the quantized outputs with FP32's over all rows: SQNR (dB) of the outputs,
    mean cosine, worst-row cosine, max absolute error, and top-1 agreement for classifiers."""
    noise = float(np.sum((out - ref) ** 2))
    signal = float(np.sum(ref**2))
    cos = _row_cosine(out, ref)
    res = {
        "sqnr_db": round(10 * np.log10(signal / noise), 3) if noise > 0 else None,  # None: identical outputs
        "cosine_mean": round(float(cos.mean()), 6),
        "cosine_min": round(float(cos.min()), 6),
        "max_abs_error": round(float(np.max(np.abs(out - ref))), 6) if out.size else 0.0,
    }
    if task != "regression" and out.shape[1] > 1:
        res["top1_agreement"] = round(float((out.argmax(1) == ref.argmax(1)).mean()), 6)
    return res


def _vector_metric(name: str, side: Side, idx: np.ndarray) -> np.ndarray | None:
    """Metric over rows ``idx`` (shape [B, n]); one value per row of idx. None if not vectorizable."""
    r = side.rows
    if name == "accuracy":
        return r["correct"][idx].mean(1)
    if name == "f1":
        tp, fp, fn = r["tp"][idx].sum(1), r["fp"][idx].sum(1), r["fn"][idx].sum(1)
        den = 2 * tp + fp + fn
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
    if name == "mae":
        return r["abs_err"][idx].mean(1)
    if name == "rmse":
        return np.sqrt(r["sq_err"][idx].mean(1))
    if name in ("agreement", "cosine", "kl", "neighbor_agreement", "embedding_cosine"):
        return r[name][idx].mean(1) if name in r else None
    if name == "roc_auc" and side.score is not None and "label" in r and np.isin(r["label"], (0.0, 1.0)).all():
        from scipy.stats import rankdata

        pos = r["label"][idx] == 1  # Mann-Whitney form of the AUC, ties ranked by their average
        ranks = rankdata(side.score[idx], axis=1)
        npos = pos.sum(1)
        nneg = pos.shape[1] - npos
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (np.sum(ranks * pos, axis=1) - npos * (npos + 1) / 2) / (npos * nneg)
        return np.where((npos > 0) & (nneg > 0), auc, np.nan)
    return None


def load_custom_metric(path: str) -> Callable:
    """``package.module:function`` with signature ``f(y_true, y_pred, y_score) -> float``."""
    mod, _, fn = path.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise DataError(f"Custom metric {path!r} cannot be imported: {e}",
                        "give it as 'package.module:function' importable on the worker.") from None


def _loop_metric(name: str, side: Side, y, rows: np.ndarray, custom: dict[str, Callable]) -> float | None:
    if len(rows) == 0:
        return None
    if name == "roc_auc":
        from sklearn.metrics import roc_auc_score

        yy = y[rows]
        if side.score is None or len(np.unique(yy)) < 2:
            return None
        return float(roc_auc_score(yy, side.score[rows]))
    fn = custom[name]
    return float(fn(y[rows] if y is not None else None, side.pred[rows],
                    None if side.score is None else side.score[rows]))


class Scorer:
    def __init__(self, metrics, y, f32: Side, q: Side, custom, bootstrap: int, confidence: float, seed: int):
        self.metrics, self.y, self.f32, self.q, self.custom = metrics, y, f32, q, custom
        self.bootstrap, self.alpha, self.seed = bootstrap, 1 - confidence, seed

    def _value(self, name, side, rows):
        v = _vector_metric(name, side, rows[None, :]) if len(rows) else None
        if v is not None:
            return None if np.isnan(v[0]) else float(v[0])
        return _loop_metric(name, side, self.y, rows, self.custom)

    def score(self, rows: np.ndarray, key: str) -> dict:
        """Point values for both models and an interval of (quantized - FP32) per metric: Tango's score interval
        from the discordant rows for paired binary metrics (accuracy, agreement), else the paired bootstrap
        (percentile interval, plus its standard errors for the gates' multiplicity-adjusted levels)."""
        out = {}
        # seed per slice key: the same inputs give the same intervals
        rng = np.random.default_rng([self.seed, *key.encode()])
        boot = rng.integers(0, len(rows), size=(self.bootstrap, len(rows))) if len(rows) > 1 and self.bootstrap else None
        for m in self.metrics:
            a, b = self._value(m, self.f32, rows), self._value(m, self.q, rows)
            entry = {"fp32": a, "quantized": b, "delta": None if a is None or b is None else b - a,
                     "ci_low": None, "ci_high": None, "ci_method": None}
            col = PAIRED_BINARY.get(m)
            if col is not None and col in self.q.rows and entry["delta"] is not None:
                ra, rb = self.f32.rows[col][rows] > 0.5, self.q.rows[col][rows] > 0.5
                worse, better = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
                lo, hi = tango_interval(worse, better, len(rows), 1 - self.alpha)  # of FP32 - quantized
                entry.update(ci_low=-hi, ci_high=-lo, ci_method="score interval on discordant pairs (Tango)",
                             paired={"n": int(len(rows)), "worse": worse, "better": better,
                                     "quantized_hits": int(rb.sum())})
            elif boot is not None and entry["delta"] is not None:
                idx = rows[boot]
                va, vb = _vector_metric(m, self.f32, idx), _vector_metric(m, self.q, idx)
                if va is None:  # not vectorizable: fewer resamples, one by one
                    pairs = [(self._value(m, self.f32, r), self._value(m, self.q, r)) for r in idx[:200]]
                    pairs = [(pa, pb) for pa, pb in pairs if pa is not None and pb is not None]
                    d = np.array([pb - pa for pa, pb in pairs])
                    qv = np.array([pb for _, pb in pairs])
                else:
                    d, qv = vb - va, vb
                    ok = ~np.isnan(d)
                    d, qv = d[ok], qv[ok]
                if len(d) > 1:
                    lo, hi = np.quantile(d, [self.alpha / 2, 1 - self.alpha / 2])
                    entry.update(ci_low=float(lo), ci_high=float(hi), ci_method=f"paired bootstrap ({len(d)} resamples)",
                                 se=float(np.std(d, ddof=1)), quantized_se=float(np.std(qv, ddof=1)))
            out[m] = entry
        return out

    def flips(self, rows: np.ndarray) -> int | None:
        """Rows whose predicted class differs between the two models."""
        agree = self.q.rows.get("agreement")
        return None if agree is None else int(np.sum(agree[rows] < 0.5))


def fidelity_metrics(task: str, embedding_output: bool = False) -> list[str]:
    """Label-free agreement with FP32: top-1 agreement and output KL only make sense for classes; embeddings
    are compared by cosine and by nearest-neighbour agreement within the validation set."""
    if task == "embedding":
        return list(EMBEDDING_METRICS)
    extra = ["embedding_cosine", "neighbor_agreement"] if embedding_output else []
    return (["cosine"] if task == "regression" else list(FIDELITY_METRICS)) + extra


def default_metrics(task: str, labelled: bool, embedding_output: bool = False) -> list[str]:
    if not labelled or task == "embedding":
        return fidelity_metrics(task, embedding_output)
    return ((list(REGRESSION_METRICS) if task == "regression" else list(CLASSIFICATION_METRICS))
            + fidelity_metrics(task, embedding_output))
