"""Calibration set selection, streamed over pools larger than memory, then a drift check.

Strategies (deterministic for a given seed and pool):
- ``random``: reservoir sampling by random keys — each row gets a seeded uniform key in stream
  order and the ``n`` smallest keys are kept, batch by batch;
- ``stratified``: the same per stratum of the slice columns, with a proportional allocation and at
  least ``min_per_slice`` rows per stratum (a first pass counts the strata);
- ``diversity``: k-center greedy over standardised numeric features (or an embedding column) among a
  random candidate reservoir of ``candidates × n`` rows;
- any of them restricted to a recency window over a timestamp column.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qops.artifacts import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from qops.calibration.drift import check_drift
from qops.calibration.sources import S3Options, TableSource, as_source
from qops.data import DataKind, Tabular, feature_matrix, require_numeric
from qops.errors import DataError, DriftError
from qops.run_folder import CalibrationFiles
from qops.spec import CalibrationSpec, DiversitySpec, RecencySpec

log = logging.getLogger(__name__)
ROW = "__qops_row__"


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
    feeds_path: str | None = None  # the feeds the quantizer calibrates on: .npz of arrays named like the inputs
    feeds_sha256: str | None = None
    feeds: dict = field(default_factory=dict)  # input name -> {dtype, shape}
    data: dict = field(default_factory=dict)  # the data kind (and its settings) that built the feeds
    attempts: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _strata(frame: pd.DataFrame, cols: list[str]) -> np.ndarray:
    keys = frame[cols[0]].astype("string").fillna("missing")
    for c in cols[1:]:
        keys = keys + " & " + frame[c].astype("string").fillna("missing")
    return keys.to_numpy(dtype=object)


def allocate(sizes: dict[str, int], n: int, min_per_slice: int = 1) -> dict[str, int]:
    """Proportional allocation of ``n`` rows over strata, at least ``min_per_slice`` each (or the whole
    stratum when it is smaller), remainders by largest fractional part."""
    keys = sorted(sizes)
    sz = np.array([sizes[k] for k in keys])
    base = np.minimum(sz, min_per_slice)
    if base.sum() > n:
        raise DataError(
            f"{len(keys)} strata x min_per_slice {min_per_slice} need {int(base.sum())} rows, more than the "
            f"calibration size {n}.", "raise calibration.size, lower min_per_slice, or stratify by fewer columns.")
    cap = sz - base
    rest = n - int(base.sum())
    exact = rest * cap / cap.sum() if cap.sum() else np.zeros(len(keys))
    extra = np.minimum(np.floor(exact).astype(int), cap)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while extra.sum() < rest:
        j = order[i % len(order)]
        if extra[j] < cap[j]:
            extra[j] += 1
        i += 1
    return {k: int(b + e) for k, b, e in zip(keys, base, extra)}


class _Reservoir:
    """Keeps, per stratum, the rows with the smallest random keys (one global reservoir: stratum '')."""

    def __init__(self, quota: dict[str, int]):
        self.quota = quota
        self.frame: pd.DataFrame | None = None
        self.keys = np.empty(0)
        self.codes = np.empty(0, dtype=object)

    def offer(self, frame: pd.DataFrame, keys: np.ndarray, codes: np.ndarray) -> None:
        if len(frame) == 0:
            return
        frame = frame if self.frame is None else pd.concat([self.frame, frame], ignore_index=True)
        keys = np.concatenate([self.keys, keys])
        codes = np.concatenate([self.codes, codes])
        order = np.lexsort((keys, codes.astype(str)))
        keep = []
        start = 0
        sorted_codes = codes[order]
        while start < len(order):
            code = sorted_codes[start]
            end = start
            while end < len(order) and sorted_codes[end] == code:
                end += 1
            keep.extend(order[start : min(end, start + self.quota.get(code, 0))])
            start = end
        keep = np.sort(np.array(keep, dtype=int))
        self.frame, self.keys, self.codes = frame.iloc[keep].reset_index(drop=True), keys[keep], codes[keep]


def _cutoff(source: TableSource, recency: RecencySpec | None):
    if recency is None:
        return None
    latest = None
    for b in source.batches([recency.column]):
        col = pd.to_datetime(b.column(0).to_pandas(), utc=True, errors="coerce")
        if col.notna().any():
            m = col.max()
            latest = m if latest is None or m > latest else latest
    if latest is None:
        raise DataError(f"The timestamp column {recency.column!r} has no parseable values.",
                        "point recency.column at a timestamp column.")
    return latest - pd.Timedelta(days=recency.window_days)


def _in_window(frame: pd.DataFrame, recency: RecencySpec | None, cutoff) -> np.ndarray:
    if recency is None:
        return np.ones(len(frame), dtype=bool)
    ts = pd.to_datetime(frame[recency.column], utc=True, errors="coerce")
    return (ts >= cutoff).to_numpy()


def stream_sample(source, n: int, *, strategy: str = "random", seed: int = 0, columns: list[str] | None = None,
                  stratify_by: list[str] | None = None, min_per_slice: int = 1, recency: RecencySpec | None = None,
                  check_columns: list[str] | None = None, allow_fewer: bool = False, numeric: list[str] | None = None,
                  what: str = "calibration pool", batch_size: int = 65_536) -> tuple[pd.DataFrame, dict]:
    """Sample ``n`` rows from a (possibly larger than memory) source; returns rows in pool order and stats
    (pool rows, rows per stratum in the pool, null counts of ``check_columns``). ``allow_fewer``: return
    every eligible row when there are fewer than ``n`` (random strategy)."""
    source = as_source(source, role=what)
    stratify_by = list(stratify_by or []) if strategy == "stratified" else []
    cutoff = _cutoff(source, recency)
    need = None if columns is None else list(dict.fromkeys(columns + stratify_by +
                                                            ([recency.column] if recency else [])))
    # pass 1 (stratified only): stratum sizes, reading just the slice columns
    sizes: dict[str, int] = {}
    if stratify_by:
        for b in source.batches(stratify_by + ([recency.column] if recency else []), batch_size):
            f = b.to_pandas()
            codes = _strata(f, stratify_by)[_in_window(f, recency, cutoff)]
            u, c = np.unique(codes.astype(str), return_counts=True)
            for k, v in zip(u, c):
                sizes[k] = sizes.get(k, 0) + int(v)
        eligible = sum(sizes.values())
        if eligible == 0:
            raise DataError(f"The {what} is empty" + (" in the recency window" if recency else "") + ".",
                            f"point the {what} at a table with rows" + (" or widen recency.window_days" if recency
                                                                       else "") + ".")
        if n > eligible:
            raise DataError(f"The {what} has {eligible} rows, fewer than the {n} requested.",
                            f"lower calibration.size to at most {eligible} or use a larger pool.")
        quota = allocate(sizes, n, min_per_slice)
    else:
        quota = {"": n}
    rng = np.random.default_rng(seed)
    res = _Reservoir(quota)
    total = eligible_rows = 0
    nulls = {c: 0 for c in (check_columns or [])}
    for b in source.batches(need, batch_size):
        f = b.to_pandas()
        f[ROW] = np.arange(total, total + len(f))
        total += len(f)
        keys = rng.random(len(f))  # drawn for every row, so a row's key does not depend on filters
        for c in nulls:
            nulls[c] += int(f[c].isna().sum())
        if numeric:  # every row of the pool, not just the sampled ones: "abc" in a numeric CSV column
            require_numeric(f, numeric, what, source.uri)
        mask = _in_window(f, recency, cutoff)
        eligible_rows += int(mask.sum())
        codes = _strata(f, stratify_by) if stratify_by else np.full(len(f), "", dtype=object)
        res.offer(f[mask], keys[mask], codes[mask])
    if total == 0:
        raise DataError(f"The {what} is empty.", "point data.pool at a table with rows.")
    if not stratify_by and n > eligible_rows and not allow_fewer:
        raise DataError(f"The {what} has {eligible_rows} rows" + (" in the recency window" if recency else "")
                        + f", fewer than the {n} requested.",
                        f"lower calibration.size to at most {eligible_rows} or use a larger pool.")
    out = res.frame.sort_values(ROW).reset_index(drop=True)
    stats = {"pool_rows": total, "eligible_rows": eligible_rows, "pool_rows_per_stratum": sizes, "nulls": nulls,
             "cutoff": None if cutoff is None else str(cutoff)}
    return out, stats


def k_center_greedy(points: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` points chosen greedily to cover the set (farthest-first traversal from point 0)."""
    chosen = [0]
    dist = np.linalg.norm(points - points[0], axis=1)
    for _ in range(1, min(n, len(points))):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return np.array(sorted(chosen))


def diversity_sample(source, n: int, *, seed: int, features: list[str], diversity: DiversitySpec,
                     columns: list[str] | None, recency: RecencySpec | None, check_columns: list[str] | None):
    """k-center greedy among a random candidate reservoir of up to ``diversity.candidates * n`` rows."""
    candidates, stats = stream_sample(source, n * diversity.candidates, strategy="random", seed=seed,
                                      columns=columns, recency=recency, check_columns=check_columns,
                                      allow_fewer=True)
    if len(candidates) < n:
        raise DataError(f"The calibration pool has {len(candidates)} rows, fewer than the {n} requested.",
                        f"lower calibration.size to at most {len(candidates)} or use a larger pool.")
    if diversity.embedding_column:
        pts = np.stack([np.asarray(v, dtype=float) for v in candidates[diversity.embedding_column]])
    else:
        pts = candidates[diversity.columns or features].to_numpy(dtype=float)
    std = pts.std(axis=0)
    pts = (pts - pts.mean(axis=0)) / np.where(std > 0, std, 1)
    return candidates.iloc[k_center_greedy(pts, n)].reset_index(drop=True), stats


def select_rows(pool: pd.DataFrame, n: int, strategy: str = "random", seed: int = 0,
                stratify_by: list[str] | None = None, min_per_slice: int = 1) -> pd.DataFrame:
    """In-memory convenience over :func:`stream_sample`: the chosen rows with the pool's index."""
    if strategy not in ("random", "stratified"):
        raise DataError(f"Unknown calibration strategy {strategy!r}.", "use 'random', 'stratified' or 'diversity'.")
    if len(pool) == 0:
        raise DataError("The calibration pool is empty.", "point data.pool at a table with rows.")
    frame, _ = stream_sample(pool.reset_index(drop=True), n, strategy=strategy, seed=seed, stratify_by=stratify_by,
                             min_per_slice=min_per_slice)
    return pool.iloc[frame[ROW].to_numpy()]


def _check_schema(chosen: pd.DataFrame, kind: DataKind, validation: TableSource | None,
                  model_inputs: list | None, where: str) -> dict | None:
    """The calibration set's feeds must fit the model's inputs (names, dtypes, ranks) and the validation set must
    have the same columns. Returns the feeds (None without the model's inputs)."""
    features = kind.columns()
    feeds = None
    if model_inputs:
        feeds = feature_matrix(chosen, model_inputs, kind, where)  # names, dtypes, ranks, fixed dims, finite
    elif isinstance(kind, Tabular):
        non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(chosen[c])]
        if non_numeric:
            raise DataError(f"Feature column(s) {non_numeric} of {where} are not numeric.",
                            "encode them as numbers before calibration.")
    if validation is not None:
        names = validation.schema_names()
        missing = [c for c in features if c not in names]
        if missing:
            raise DataError(f"The validation set {validation.uri} lacks feature column(s) {missing} that the "
                            "calibration set has.", "calibrate and validate on data with the same schema.")
    return feeds


def _write_feeds(feeds: dict, out: Path) -> dict:
    """The calibration feeds as an ``.npz`` of arrays named like the model inputs (atomic), with a manifest."""
    path = CalibrationFiles(out).feeds
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **feeds)
    return {"path": str(path), "sha256": sha256_file(path),
            "inputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()}}


def select_calibration(
    calibration: CalibrationSpec,
    *,
    pool,
    reference,
    output_dir: str | os.PathLike,
    features,
    slice_columns: list[str] | None = None,
    validation=None,
    model_inputs: list | None = None,
    s3: S3Options | None = None,
) -> CalibrationResult:
    """Select the calibration set by the spec's ``calibration`` section, check it for drift against
    ``reference``, and write ``calibration.parquet``, its manifest (``calibration.json``) and the drift report
    (JSON and text). ``features``: tabular feature columns or a :class:`~qops.data.DataKind`.

    ``calibration.drift.on_drift``: ``fail`` (write the report, not the set, raise :class:`DriftError`), ``warn``
    (keep the set, record the drift), or ``reselect`` (try up to ``max_reselect`` new seeds, then fail).
    """
    c, d = calibration, calibration.drift
    size, strategy, seed, recency, diversity = c.size, c.strategy, c.seed, c.recency, c.diversity
    min_per_slice, on_drift = c.min_per_slice, d.on_drift
    if strategy not in ("random", "stratified", "diversity"):
        raise DataError(f"Unknown calibration strategy {strategy!r}.", "use 'random', 'stratified' or 'diversity'.")
    kind = features if isinstance(features, DataKind) else Tabular(list(features))
    features = kind.columns()
    if strategy == "diversity" and not isinstance(kind, Tabular) and not (
            diversity and (diversity.columns or diversity.embedding_column)):
        raise DataError(f"The diversity strategy needs numeric columns or an embedding column; {kind.kind} data has "
                        "neither by default.", "set calibration.diversity.embedding_column (e.g. precomputed "
                        "embeddings) or diversity.columns, or use strategy: stratified.")
    slice_columns = list(slice_columns or [])
    stratify_by = list(c.stratify_by or slice_columns)
    out = Path(output_dir)
    pool_src, ref_src = as_source(pool, s3, "calibration pool"), as_source(reference, s3, "drift reference")
    val_src = as_source(validation, s3, "validation set") if validation is not None else None
    pool_cols = pool_src.schema_names()
    missing = [c for c in features + slice_columns + stratify_by if c not in pool_cols]
    if missing:
        raise DataError(f"The calibration pool ({pool_src.uri}) lacks column(s) {sorted(set(missing))}; it has "
                        f"{pool_cols[:30]}.", "add the column(s) to the data or correct the column names in the spec.")
    extra = [diversity.embedding_column] if diversity and diversity.embedding_column else []
    columns = list(dict.fromkeys(features + slice_columns + extra))

    numeric = features if isinstance(kind, Tabular) else None
    ref, ref_stats = stream_sample(ref_src, c.reference_sample, strategy="random", seed=seed,
                                   columns=features + slice_columns, allow_fewer=True, what="drift reference",
                                   numeric=numeric)
    ref = ref.drop(columns=[ROW])

    attempts, seeds = [], [seed] + ([seed + i for i in range(1, d.max_reselect + 1)] if on_drift == "reselect" else [])
    report = None
    for s in seeds:
        if strategy == "diversity":
            chosen, stats = diversity_sample(pool_src, size, seed=s, features=features, diversity=diversity or DiversitySpec(),
                                             columns=columns, recency=recency, check_columns=features)
        else:
            chosen, stats = stream_sample(pool_src, size, strategy=strategy, seed=s, columns=columns,
                                          stratify_by=stratify_by, min_per_slice=min_per_slice, recency=recency,
                                          check_columns=features, numeric=numeric)
        if s == seed:
            _check_pool_columns(stats, features, pool_src.uri)
        bad = [c for c, v in stats["nulls"].items() if v]  # counted over the whole pool while streaming
        if bad:
            raise DataError(
                f"The calibration pool {pool_src.uri} has NaN in feature column(s) {bad} "
                f"({sum(stats['nulls'][c] for c in bad)} row(s)).",
                "impute or drop those rows upstream; calibration data must be what the model sees in serving.")
        log.info("selected %d of %d pool rows (%s, seed %d)", len(chosen), stats["pool_rows"], strategy, s)
        if not d.enabled:
            attempts.append({"seed": s, "drift_passed": None})
            break
        sample_x, ref_x, numeric = _drift_frames(kind, chosen, ref)
        report = check_drift(sample_x, ref_x, numeric=numeric, categorical=slice_columns,
                             quantile_tolerance=d.quantile_tolerance, max_kl=d.max_kl_divergence, max_psi=d.max_psi,
                             min_ks_pvalue=d.min_ks_pvalue, extra_checks=kind.drift_extra(chosen, ref, d.max_psi))
        attempts.append({"seed": s, "drift_passed": report.passed, "drifted_columns": report.drifted_columns})
        log.info("%s", report.text())
        if report.passed:
            break
        if on_drift == "reselect" and s != seeds[-1]:
            log.warning("drift in %s with seed %d: reselecting with seed %d", report.drifted_columns, s, s + 1)

    files = CalibrationFiles(out)
    report_path = files.drift_report
    if report is not None:
        report.attempts = attempts
        write_json_atomic(report_path, report)
        write_text_atomic(files.drift_text, report.text() + "\n")
        passed, drifted = report.passed, report.drifted_columns
    else:
        write_json_atomic(report_path, {"passed": True, "skipped": True, "drifted_columns": []})
        passed, drifted = True, []
    if not passed and on_drift in ("fail", "reselect"):
        tried = f" after {len(attempts)} selection(s) (seeds {[a['seed'] for a in attempts]})" if len(attempts) > 1 else ""
        raise DriftError(
            f"The calibration set drifted from the reference in column(s) {drifted}{tried}; see {report_path}.",
            "refresh the pool/reference, or set calibration.drift.on_drift: warn to proceed anyway.",
            report=report.__dict__,
        )
    used_seed = attempts[-1]["seed"]
    warnings = _slice_minimums(chosen, stratify_by, min_per_slice, c.on_small_slice, stats)
    feeds = _check_schema(chosen, kind, val_src, model_inputs, "the calibration set")
    cal_path = files.table
    with atomic_path(cal_path) as tmp:
        chosen.drop(columns=[ROW]).to_parquet(tmp, index=False)
    feeds_manifest = _write_feeds(feeds, out) if feeds is not None else None
    per_slice = {c: {str(k): int(v) for k, v in chosen[c].astype(str).value_counts().sort_index().items()}
                 for c in slice_columns}
    result = CalibrationResult(
        path=str(cal_path), sha256=sha256_file(cal_path), rows=len(chosen), strategy=strategy, seed=used_seed,
        pool=pool_src.uri, pool_rows=stats["pool_rows"], reference=ref_src.uri, rows_per_slice=per_slice,
        drift_passed=passed, drifted_columns=drifted, drift_report_path=str(report_path),
        manifest_path=str(files.manifest), attempts=attempts, warnings=warnings,
        feeds_path=feeds_manifest["path"] if feeds_manifest else None,
        feeds_sha256=feeds_manifest["sha256"] if feeds_manifest else None,
        feeds=feeds_manifest["inputs"] if feeds_manifest else {}, data=kind.describe(),
    )
    manifest = {**result.__dict__, "sources": {"pool": pool_src.describe(), "reference": ref_src.describe()},
                "recency": None if recency is None else {**recency.model_dump(), "cutoff": stats.get("cutoff")},
                "min_per_slice": min_per_slice, "pool_rows_per_stratum": stats["pool_rows_per_stratum"],
                "stratify_by": stratify_by if strategy == "stratified" else []}
    write_json_atomic(files.manifest, manifest)
    return result


def _drift_frames(kind: DataKind, chosen: pd.DataFrame, ref: pd.DataFrame):
    """Numeric per-row features that fit the kind (tabular: the features themselves), beside the slice columns."""
    if isinstance(kind, Tabular):
        return chosen, ref, kind.columns()
    fs, fr = kind.drift_features(chosen), kind.drift_features(ref)
    return (pd.concat([chosen.drop(columns=[c for c in fs.columns if c in chosen]), fs], axis=1),
            pd.concat([ref.drop(columns=[c for c in fr.columns if c in ref]), fr], axis=1), list(fs.columns))


def _check_pool_columns(stats: dict, features: list[str], uri: str) -> None:
    all_null = [c for c in features if stats["nulls"].get(c, 0) == stats["pool_rows"]]
    if all_null:
        raise DataError(f"Feature column(s) {all_null} of the calibration pool {uri} are entirely null.",
                        "fix the upstream data (or drop the feature from the model).")


def _slice_minimums(chosen, stratify_by, min_per_slice, policy, stats) -> list[str]:
    if not stratify_by or min_per_slice <= 1:
        return []
    counts = pd.Series(_strata(chosen, stratify_by)).value_counts()
    short = {k: int(counts.get(k, 0)) for k in stats["pool_rows_per_stratum"] if counts.get(k, 0) < min_per_slice}
    if not short:
        return []
    msg = (f"slice(s) below min_per_slice {min_per_slice} (the pool has too few rows): "
           + ", ".join(f"{k}: {v}" for k, v in sorted(short.items())))
    if policy == "fail":
        raise DataError(f"Calibration {msg}.", "add rows for those groups to the pool, lower min_per_slice, or set "
                        "calibration.on_small_slice: warn.")
    log.warning("%s", msg)
    return [msg]
