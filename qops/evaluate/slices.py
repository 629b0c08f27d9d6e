"""Slices and fairness: slice keys (single columns and intersections), group metrics and their spread
(fairlearn's definitions), bootstrap intervals for each."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from qops.evaluate.metrics import PAIRED_BINARY, Scorer, Side


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


def fairness_values(y, side: Side, codes: np.ndarray, n_groups: int, idx: np.ndarray, primary: str) -> dict:
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


def slice_fairness(y, f32: Side, q: Side, df: pd.DataFrame, dims: list[list[str]], primary: str, scorer: Scorer,
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
