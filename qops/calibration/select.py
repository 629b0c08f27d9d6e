"""Calibration set selection: seeded random or stratified sampling from a pool, then a drift check."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qops.artifacts import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from qops.calibration.drift import check_drift
from qops.data import read_table, require_columns
from qops.errors import DataError, DriftError

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    path: str | None
    sha256: str | None
    rows: int
    strategy: str
    seed: int
    pool: str
    pool_rows: int
    reference: str
    rows_per_slice: dict = field(default_factory=dict)
    drift_passed: bool = True
    drifted_columns: list[str] = field(default_factory=list)
    drift_report_path: str = ""
    manifest_path: str = ""


def select_rows(pool: pd.DataFrame, n: int, strategy: str = "random", seed: int = 0,
                stratify_by: list[str] | None = None) -> pd.DataFrame:
    """Choose ``n`` rows, deterministically for a given seed and pool.

    ``stratified``: proportional allocation over the strata (largest remainders), at least one row per
    stratum while ``n`` allows, sampling without replacement inside each stratum.
    """
    if len(pool) == 0:
        raise DataError("The calibration pool is empty.", "point data.pool at a table with rows.")
    if n > len(pool):
        raise DataError(
            f"The calibration pool has {len(pool)} rows, fewer than the {n} requested.",
            f"lower calibration.size to at most {len(pool)} or use a larger pool.",
        )
    rng = np.random.default_rng(seed)
    if strategy == "random" or not stratify_by:
        idx = np.sort(rng.choice(len(pool), size=n, replace=False))
        return pool.iloc[idx]
    if strategy != "stratified":
        raise DataError(f"Unknown calibration strategy {strategy!r}.", "use 'random' or 'stratified'.")
    require_columns(pool, stratify_by, "calibration pool")
    keys = pool[stratify_by].astype(str).agg("|".join, axis=1)
    groups = {k: np.flatnonzero(keys.to_numpy() == k) for k in sorted(keys.unique())}
    sizes = np.array([len(g) for g in groups.values()])
    exact = n * sizes / sizes.sum()
    alloc = np.floor(exact).astype(int)
    if n >= len(groups):
        alloc = np.maximum(alloc, 1)
    alloc = np.minimum(alloc, sizes)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while alloc.sum() < n:  # hand out the remainder by largest fractional part, where rows remain
        j = order[i % len(order)]
        if alloc[j] < sizes[j]:
            alloc[j] += 1
        i += 1
    while alloc.sum() > n:  # the minimum of one row per stratum overshot: trim the largest strata
        j = int(np.argmax(alloc))
        alloc[j] -= 1
    chosen = [rng.choice(g, size=a, replace=False) for g, a in zip(groups.values(), alloc) if a > 0]
    return pool.iloc[np.sort(np.concatenate(chosen))]


def select_calibration(
    pool: str | os.PathLike,
    reference: str | os.PathLike,
    output_dir: str | os.PathLike,
    size: int,
    features: list[str],
    slice_columns: list[str] | None = None,
    strategy: str = "stratified",
    seed: int = 0,
    stratify_by: list[str] | None = None,
    drift_enabled: bool = True,
    quantile_tolerance: float = 0.1,
    max_kl: float = 0.5,
    on_drift: str = "fail",
) -> CalibrationResult:
    """Select the calibration set, check it for drift, write ``calibration.parquet`` + manifest + report.

    On drift with ``on_drift='fail'`` the drift report is written, the calibration set is not, and
    :class:`DriftError` names the drifted columns.
    """
    slice_columns = list(slice_columns or [])
    stratify_by = list(stratify_by or slice_columns)
    out = Path(output_dir)
    pool_df = read_table(pool, "calibration pool")
    ref_df = read_table(reference, "drift reference")
    require_columns(pool_df, slice_columns, "calibration pool", pool)
    require_columns(pool_df, features, "calibration pool", pool)
    require_columns(ref_df, features + slice_columns, "drift reference", reference)
    nan_cols = [c for c in features if pool_df[c].isna().any()]
    if nan_cols:
        raise DataError(
            f"The calibration pool {pool} has NaN in feature column(s) {nan_cols} "
            f"({int(pool_df[nan_cols].isna().any(axis=1).sum())} row(s)).",
            "impute or drop those rows upstream; calibration data must be what the model sees in serving.",
        )
    chosen = select_rows(pool_df, size, strategy, seed, stratify_by)
    log.info("selected %d of %d pool rows (%s, seed %d)", len(chosen), len(pool_df), strategy, seed)

    report_path = out / "drift_report.json"
    if drift_enabled:
        report = check_drift(chosen, ref_df, numeric=features, categorical=slice_columns,
                             quantile_tolerance=quantile_tolerance, max_kl=max_kl)
        log.info("%s", report.text())
        write_json_atomic(report_path, report)
        write_text_atomic(out / "drift_report.txt", report.text() + "\n")
        passed, drifted = report.passed, report.drifted_columns
    else:
        write_json_atomic(report_path, {"passed": True, "skipped": True, "drifted_columns": []})
        passed, drifted = True, []
    if not passed and on_drift == "fail":
        raise DriftError(
            f"The calibration set drifted from the reference in column(s) {drifted}; "
            f"see {report_path}.",
            "refresh the pool/reference, or set calibration.drift.on_drift: warn to proceed anyway.",
            report=report.__dict__ if drift_enabled else {},
        )
    cal_path = out / "calibration.parquet"
    with atomic_path(cal_path) as tmp:
        chosen.reset_index(drop=True).to_parquet(tmp, index=False)
    digest = sha256_file(cal_path)
    per_slice = (
        {c: {str(k): int(v) for k, v in chosen[c].astype(str).value_counts().sort_index().items()}
         for c in slice_columns}
    )
    result = CalibrationResult(
        path=str(cal_path), sha256=digest, rows=len(chosen), strategy=strategy, seed=seed, pool=str(pool),
        pool_rows=len(pool_df), reference=str(reference), rows_per_slice=per_slice, drift_passed=passed,
        drifted_columns=drifted, drift_report_path=str(report_path),
        manifest_path=str(out / "calibration.json"),
    )
    write_json_atomic(out / "calibration.json", result)
    return result
