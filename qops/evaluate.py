"""Evaluate FP32 and quantized models on a validation set, in the same process.

Per model: metrics overall and per slice (each slice column, and intersections of columns), label-free
fidelity against FP32, fairness (fairlearn), file size and batch-1 latency. Every FP32-vs-quantized
delta carries its evidence: for paired binary outcomes (accuracy, top-1 agreement) the discordant row
counts and Tango's score interval; for other metrics and for fairness increases a paired bootstrap (the
same resampled rows for both models) with its percentile interval and standard error. Classifier
outputs are read as logits or probabilities once, decided on the FP32 model's outputs.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from qops.data import DataKind, data_kind, iter_feeds, onnx_io, read_table, require_columns
from qops.errors import DataError, ModelError
from qops.metric_names import (  # noqa: F401 - re-exported: gates and cards read them from here
    CLASSIFICATION_METRICS,
    EMBEDDING_METRICS,
    FAIRNESS_METRICS,
    FIDELITY_METRICS,
    HIGHER_IS_BETTER,
    REGRESSION_METRICS,
)
from qops.quantize.graph import model_size
from qops.runtime import open_session
from qops.stats import tango_interval

log = logging.getLogger(__name__)

# metric -> per-row 0/1 outcome (FP32's own agreement and neighbour agreement are 1 on every row)
PAIRED_BINARY = {"accuracy": "correct", "agreement": "agreement", "neighbor_agreement": "neighbor_agreement"}


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER.get(metric, True)


def degradation(metric: str, fp32: float, quantized: float) -> float:
    """How much worse the quantized model is (positive = worse), whatever the metric's direction."""
    return (fp32 - quantized) if higher_is_better(metric) else (quantized - fp32)


def worker_hardware() -> dict:
    """The evaluating worker's CPU, recorded with every latency figure."""
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags: set[str] = set()
        for line in text.splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
        info["isa"] = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                        "amx_bf16", "fma", "asimd", "asimddp", "i8mm"})
    except OSError:
        info["isa"] = []
    return info


def hardware_match(recipe: dict | None, hw: dict) -> dict:
    """Is the worker the target's hardware? If not, latency is not the target's latency; say so."""
    if recipe is None:
        return {"matches": None, "note": "no target recipe given"}
    arch, isa = recipe.get("arch"), set(recipe.get("required_isa") or [])
    missing = sorted(isa - set(hw.get("isa", [])))
    if arch and hw.get("machine") != arch:
        return {"matches": False, "note": f"measured on a {hw.get('machine')} worker, not on the target's {arch} "
                                          "hardware: size and accuracy hold, latency does not transfer"}
    if missing:
        return {"matches": False, "note": f"worker lacks {', '.join(missing)} that the target assumes: latency "
                                          "here is not the target's"}
    return {"matches": True, "note": "measured on hardware of the target's kind"}


def _session(model_path: str | os.PathLike, threads: int | None = None, recipe: dict | None = None):
    return open_session(model_path, threads, recipe)


def file_size(path) -> int:
    if str(path).lower().endswith(".onnx"):
        return model_size(path)  # with external data
    return Path(path).stat().st_size


def run_model(model_path: str | os.PathLike, feed, recipe: dict | None = None, *, kind: DataKind | None = None,
              outputs: list[str | None] | None = None, batch_size: int = 64, what: str = "validation set"):
    """Run a model. ``feed`` is a ready feed dict (returns output 0 as ``[rows, -1]``), or a table whose rows
    ``kind`` turns into feeds batch by batch (each batch padded on its own); then ``outputs`` names the outputs
    to return (None: the first) and the result is a list of ``[rows, -1]`` arrays in that order."""
    sess = _session(model_path, recipe=recipe)
    names = list(getattr(sess, "output_names", None) or [])
    wanted = outputs or [None]
    idx = []
    for w in wanted:
        if w is None:
            idx.append(0)
        elif w in names:
            idx.append(names.index(w))
        else:
            raise ModelError(f"{Path(model_path).name} has no output {w!r}; its outputs are {names}.",
                             "set gates.output / gates.embedding_output to one of them.")
    if isinstance(feed, dict):
        batches, single = [feed], True
    else:
        inputs = onnx_io(model_path)[0]
        batches, single = iter_feeds(feed, inputs, kind, what, batch_size), False
    parts: list[list[np.ndarray]] = [[] for _ in idx]
    for b in batches:
        try:
            res = sess.run(None, b)
        except Exception as e:
            raise DataError(f"Running {Path(model_path).name} on the {what} failed: {str(e)[:500]}",
                            "check that the data's features match the model's inputs.") from None
        for j, k in enumerate(idx):
            a = np.asarray(res[k], dtype=np.float64)
            parts[j].append(a.reshape(len(a), -1))
    out = [np.concatenate(p) if p else np.zeros((0, 1)) for p in parts]
    return out[0] if single else out


_FP32_CACHE: dict = {}


def _stamp(path) -> tuple:
    p = Path(path)
    return (str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else (str(path),)


def _fp32_outputs(model, df, validation, recipe, kind, wanted, batch_size):
    """FP32 outputs on the validation rows, computed once per model file, data file, kind, batch size and
    outputs: tuning judges many candidates against the same FP32 model."""
    import json

    key = (_stamp(model), _stamp(validation), json.dumps(kind.describe(), sort_keys=True, default=str),
           tuple(wanted), batch_size, (recipe or {}).get("execution_provider"), len(df))
    if key not in _FP32_CACHE:
        _FP32_CACHE.clear()  # one entry: FP32 outputs of a large validation set are not small
        _FP32_CACHE[key] = run_model(model, df, recipe, kind=kind, outputs=wanted, batch_size=batch_size)
    return [a.copy() for a in _FP32_CACHE[key]]


def nearest_neighbors(emb: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity (ties: the lowest index)."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = np.empty(len(e), dtype=np.int64)
    for start in range(0, len(e), chunk):
        sim = e[start:start + chunk] @ e.T
        rows = np.arange(start, min(start + chunk, len(e)))
        sim[rows - start, rows] = -np.inf
        out[start:start + chunk] = sim.argmax(1)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class _Side:
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
    import pandas as pd

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


def _side(task: str, out: np.ndarray, ref: np.ndarray, y: np.ndarray | None, semantics: str = "logits",
          emb: np.ndarray | None = None, emb_ref: np.ndarray | None = None) -> _Side:
    """Per-row outcomes of one model against FP32's outputs ``ref`` (and its embeddings ``emb_ref``)."""
    side = _side_task(task, out, ref, y, semantics)
    e, e_ref = (emb, emb_ref) if emb is not None else ((out, ref) if task == "embedding" else (None, None))
    if e is not None and len(e) > 1:
        side.rows["neighbor_agreement"] = (nearest_neighbors(e) == nearest_neighbors(e_ref)).astype(float)
        if emb is not None:
            side.rows["embedding_cosine"] = _row_cosine(emb, emb_ref)
    return side


def _side_task(task: str, out: np.ndarray, ref: np.ndarray, y: np.ndarray | None, semantics: str) -> _Side:
    if task == "embedding":
        return _Side(pred=np.zeros(len(out), dtype=int), score=None, rows={"cosine": _row_cosine(out, ref)})
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
    return _Side(pred=pred, score=score, rows=rows)


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


def _vector_metric(name: str, side: _Side, idx: np.ndarray) -> np.ndarray | None:
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


def _loop_metric(name: str, side: _Side, y, rows: np.ndarray, custom: dict[str, Callable]) -> float | None:
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


class _Scorer:
    def __init__(self, metrics, y, f32: _Side, q: _Side, custom, bootstrap: int, confidence: float, seed: int):
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


def slice_keys(df: pd.DataFrame, dims: list[list[str]]) -> list[tuple[str, str, np.ndarray]]:
    """(dimension name, slice key, row indices) for every value of every slice dimension."""
    out = []
    for cols in dims:
        values = df[cols].astype("string").fillna("missing")
        joined = cols[0] + "=" + values[cols[0]]
        for c in cols[1:]:
            joined = joined + " & " + c + "=" + values[c]
        for key in sorted(joined.unique()):
            out.append((" & ".join(cols), key, np.flatnonzero((joined == key).to_numpy())))
    return out


def _group_spread(values: np.ndarray) -> np.ndarray:
    """max - min over groups (axis 1), ignoring groups absent from a resample; NaN if fewer than two remain."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = np.sum(~np.isnan(values), axis=1) >= 2
        return np.where(ok, np.nanmax(values, axis=1) - np.nanmin(values, axis=1), np.nan)


def _rate(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def fairness_values(y, side: _Side, codes: np.ndarray, n_groups: int, idx: np.ndarray, primary: str) -> dict:
    """Fairness metrics of one model for each row-index resample in ``idx`` (shape [B, n]); the same
    definitions as fairlearn's demographic_parity_difference / equalized_odds_difference (checked by a test)."""
    g = codes[idx]
    pred = side.pred[idx].astype(float)
    out: dict[str, np.ndarray] = {}
    masks = [(g == k) for k in range(n_groups)]
    if y is not None and set(np.unique(y)).issubset({0, 1}):
        yy = y[idx]
        sel = np.stack([_rate((pred * m).sum(1), m.sum(1)) for m in masks], axis=1)
        tpr = np.stack([_rate((pred * m * (yy == 1)).sum(1), (m * (yy == 1)).sum(1)) for m in masks], axis=1)
        fpr = np.stack([_rate((pred * m * (yy == 0)).sum(1), (m * (yy == 0)).sum(1)) for m in masks], axis=1)
        out["demographic_parity_difference"] = _group_spread(sel)
        out["equalized_odds_difference"] = np.fmax(_group_spread(tpr), _group_spread(fpr))
    col = {**PAIRED_BINARY, "cosine": "cosine", "kl": "kl", "mae": "abs_err",
           "embedding_cosine": "embedding_cosine"}.get(primary)
    if col is not None and col in side.rows:
        v = side.rows[col][idx]
        out["metric_gap"] = _group_spread(np.stack([_rate((v * m).sum(1), m.sum(1)) for m in masks], axis=1))
    return out


def _fairness(y, f32: _Side, q: _Side, df: pd.DataFrame, dims: list[list[str]], primary: str, scorer: _Scorer,
              min_group: int) -> dict:
    """Per slice dimension: fairness metrics of both models (fairlearn), and the paired bootstrap standard
    error of each metric's increase (same resampled rows for both models) for the gates' intervals."""
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    out = {}
    binary = y is not None and set(np.unique(y)).issubset({0, 1})
    for cols in dims:
        name = " & ".join(cols)
        sens = df[cols].astype("string").fillna("missing").agg(" & ".join, axis=1).to_numpy()
        groups, counts = np.unique(sens, return_counts=True)
        big = set(groups[counts >= min_group])
        keep = np.array([s in big for s in sens])
        entry = {"groups_used": sorted(big), "groups_too_small": sorted(set(groups) - big)}
        for side_name, side in (("fp32", f32), ("quantized", q)):
            vals = {}
            if binary and len(big) > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vals["demographic_parity_difference"] = float(demographic_parity_difference(
                        y[keep], side.pred[keep], sensitive_features=sens[keep]))
                    vals["equalized_odds_difference"] = float(equalized_odds_difference(
                        y[keep], side.pred[keep], sensitive_features=sens[keep]))
            per_group = [scorer._value(primary, side, np.flatnonzero(sens == g)) for g in sorted(big)]
            per_group = [v for v in per_group if v is not None]
            vals["metric_gap"] = float(max(per_group) - min(per_group)) if len(per_group) > 1 else None
            entry[side_name] = vals
        rows = np.flatnonzero(keep)
        entry["increase_se"] = {}
        entry["rows"] = int(len(rows))
        entry["flips"] = scorer.flips(rows) if len(rows) else None
        if len(big) > 1 and scorer.bootstrap > 1 and len(rows) > 1:
            order = sorted(big)
            codes = np.array([order.index(s) if s in big else -1 for s in sens])
            rng = np.random.default_rng([scorer.seed, *("fairness:" + name).encode()])
            idx = rows[rng.integers(0, len(rows), size=(scorer.bootstrap, len(rows)))]
            a = fairness_values(y, f32, codes, len(order), idx, primary)
            b = fairness_values(y, q, codes, len(order), idx, primary)
            for metric in a:
                d = b[metric] - a[metric]
                d = d[~np.isnan(d)]
                if len(d) > 1:
                    entry["increase_se"][metric] = float(np.std(d, ddof=1))
        out[name] = entry
    return out


def measure_latency(models: list[str | os.PathLike], feed: dict[str, np.ndarray], runs: int = 300,
                    warmup: int = 30, recipe: dict | None = None, describe: list | None = None) -> list[np.ndarray]:
    """Batch-1 latency of several models, interleaved run by run in one process (one intra-op thread)
    so that clock, cache and load changes hit all models alike."""
    sessions = [_session(m, threads=1, recipe=recipe) for m in models]
    if describe is not None:
        describe.extend(s.describe for s in sessions)
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
    res32 = _fp32_outputs(fp32_model, df, validation, target, kind, wanted, batch_size)
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
    f32 = _side(task, out32, out32, y, semantics, emb32, emb32)
    q = _side(task, outq, out32, y, semantics, embq, emb32)
    fidelity = output_fidelity(task, out32, outq)
    scorer = _Scorer(names, y, f32, q, custom, bootstrap, confidence, seed)
    dims = [[c] for c in slice_columns] + intersections
    everything = np.arange(len(df))
    overall = scorer.score(everything, "__overall__")
    slices = [{"dimension": d, "key": k, "n": int(len(rows)), "flips": scorer.flips(rows),
               "metrics": scorer.score(rows, k)} for d, k, rows in slice_keys(df, dims)]
    fairness = _fairness(y, f32, q, df, dims, primary, scorer, min_slice_size) if dims else {}
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
