"""Drift check of a calibration set against a reference, with a Great Expectations (GX Core 1.x) suite.

The suite is generated from the reference profile:
- numeric columns: quantile bounds (5/25/50/75/95%): the band in which a sample of the calibration set's
  size would find each quantile of the reference (exact order-statistic bands, 1 in 10,000), widened by a tolerance in
  reference std units,
  min/max bounds (reference range widened by half a std, ``mostly=0.95``), and KL divergence
  against the reference histogram, with tail holdout so values outside the reference range do not
  make the divergence infinite;
- categorical columns: the value set seen in the reference.
A column drifts when any of its expectations fails; the report names every column and its verdict.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from qops.data.kinds.base import ColumnCheck

log = logging.getLogger(__name__)

QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]


@dataclass
class DriftReport:
    passed: bool
    drifted_columns: list[str]
    checks: list[ColumnCheck] = field(default_factory=list)
    reference_rows: int = 0
    sample_rows: int = 0
    engine: str = "great_expectations + qops (PSI, two-sample KS)"
    suite: dict = field(default_factory=dict)
    column_stats: dict = field(default_factory=dict)
    attempts: list = field(default_factory=list)

    def text(self) -> str:
        lines = [f"drift check: {'PASS' if self.passed else 'DRIFT'} "
                 f"({self.sample_rows} rows vs reference {self.reference_rows})"]
        for c in self.checks:
            mark = "ok   " if c.passed else "DRIFT"
            lines.append(f"  {mark} {c.column:<32} {c.expectation:<48} observed={_short(c.observed)} "
                         f"expected={_short(c.expected)}")
        return "\n".join(lines)


def _short(v: object) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _partition(ref: np.ndarray) -> dict | None:
    """Histogram partition object of the reference, or None for (near) constant columns."""
    if np.unique(ref).size < 2:
        return None
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11)))
    if edges.size < 2:
        return None
    hist, edges = np.histogram(ref, bins=edges)
    weights = hist / hist.sum()
    return {"bins": edges.tolist(), "weights": weights.tolist()}


# chance that a draw from the reference itself fails one sampling-aware check (a calibration set meets ~10 per
# numeric column: 1e-4 keeps false drift alarms below 1 in 100 runs at 16-128 rows)
SAMPLING_ALPHA = 1e-4


def quantile_band(p: float, n: int, alpha: float = SAMPLING_ALPHA) -> tuple[float, float]:
    """Reference probabilities between which a sample of ``n`` rows finds its ``p``-quantile with probability
    ``1 - alpha``: the sample quantile interpolates order statistics ``k = floor((n-1)p)`` and ``k+1`` (1-based
    ``k+1``, ``k+2``), and the ``j``-th of ``n`` uniform order statistics is Beta(j, n + 1 - j)."""
    from scipy.stats import beta

    n = max(int(n), 1)
    k = int(np.floor((n - 1) * p))
    j_lo, j_hi = k + 1, min(k + 2, n)
    return float(beta.ppf(alpha / 2, j_lo, n + 1 - j_lo)), float(beta.ppf(1 - alpha / 2, j_hi, n + 1 - j_hi))


def kl_bound(max_kl: float, bins: int, n: int, alpha: float = SAMPLING_ALPHA) -> float:
    """The KL-divergence threshold for a sample of ``n`` rows over ``bins`` bins: never below the noise of a draw
    from the reference itself (the G statistic 2n KL ~ chi2(bins - 1), with Williams' small-sample correction
    q = 1 + (bins^2 - 1) / (6 n (bins - 1)))."""
    from scipy.stats import chi2

    k, n = max(int(bins), 2), max(int(n), 1)
    q = 1 + (k * k - 1) / (6 * n * (k - 1))
    return max(max_kl, q * float(chi2.ppf(1 - alpha, k - 1)) / (2 * n))


RANGE_MARGIN = 0.5  # reference std units beyond the reference's min/max
RANGE_MOSTLY = 0.95  # share of values that must lie in that range


def build_suite(reference: pd.DataFrame, numeric: list[str], categorical: list[str], quantile_tolerance: float,
                max_kl: float, sample_rows: int):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="qops_calibration_drift")
    for col in numeric:
        ref = reference[col].dropna().to_numpy(dtype=float)
        values, counts = np.unique(ref, return_counts=True)
        if values.size <= 2:  # indicator / one-hot column: compare proportions, not quantiles
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=values.tolist()))
            if values.size == 2:
                suite.add_expectation(gxe.ExpectColumnKLDivergenceToBeLessThan(
                    column=col, partition_object={"values": values.tolist(), "weights": (counts / counts.sum()).tolist()},
                    threshold=kl_bound(max_kl, 2, sample_rows),
                ))
            continue
        std = float(ref.std()) or 1.0
        tol = quantile_tolerance * std
        # The sample's p-quantile lies between two order statistics of n draws, whose reference probabilities are
        # Beta-distributed (exact at any n, unlike the normal band that is too narrow for 16 rows at p = 0.05);
        # beyond that sampling band, allow `tol`.
        ranges = []
        for p in QUANTILES:
            lo_p, hi_p = quantile_band(p, sample_rows)
            lo, hi = np.quantile(ref, [lo_p, hi_p])
            ranges.append([float(lo - tol), float(hi + tol)])
        suite.add_expectation(gxe.ExpectColumnQuantileValuesToBeBetween(
            column=col, quantile_ranges={"quantiles": QUANTILES, "value_ranges": ranges},
        ))
        margin = max(tol, RANGE_MARGIN * std)
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column=col, min_value=float(ref.min() - margin), max_value=float(ref.max() + margin),
            mostly=RANGE_MOSTLY,
        ))
        part = _partition(ref)
        if part is not None:
            suite.add_expectation(gxe.ExpectColumnKLDivergenceToBeLessThan(
                column=col, partition_object=part, threshold=kl_bound(max_kl, len(part["weights"]) + 2, sample_rows),
                tail_weight_holdout=0.01,
                internal_weight_holdout=0.01,
            ))
    for col in categorical:
        ref = reference[col].dropna().astype(str)
        counts = ref.value_counts().sort_index()
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=counts.index.tolist()))
        if len(counts) > 1:  # category proportions
            suite.add_expectation(gxe.ExpectColumnKLDivergenceToBeLessThan(
                column=col, threshold=kl_bound(max_kl, len(counts), sample_rows),
                partition_object={"values": counts.index.tolist(), "weights": (counts / counts.sum()).tolist()},
            ))
    for col in numeric + categorical:  # null fraction no higher than the reference's (+5 points)
        null_frac = float(reference[col].isna().mean())
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col, mostly=max(0.0, 1 - null_frac - 0.05)))
    suite.add_expectation(gxe.ExpectTableRowCountToEqual(value=sample_rows))
    return suite


def psi(reference: np.ndarray, sample: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's decile bins (open-ended outer bins)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if edges.size < 3:
        edges = np.unique(np.concatenate([edges, [edges[0] - 0.5, edges[-1] + 0.5]]))
    edges[0], edges[-1] = -np.inf, np.inf
    k = len(edges) - 1
    # add-one-half smoothing: an empty bin in a small sample must not make the index explode
    r = (np.histogram(reference, edges)[0] + 0.5) / (len(reference) + 0.5 * k)
    s = (np.histogram(sample, edges)[0] + 0.5) / (len(sample) + 0.5 * k)
    return float(np.sum((s - r) * np.log(s / r)))


def direct_checks(sample: pd.DataFrame, reference: pd.DataFrame, numeric: list[str], max_psi: float,
                  min_ks_pvalue: float) -> tuple[list[ColumnCheck], dict]:
    """PSI and two-sample Kolmogorov-Smirnov per numeric column (GX 1.x ships no KS expectation)."""
    from scipy.stats import chi2, ks_2samp

    checks, stats = [], {}
    for col in numeric:
        a = reference[col].dropna().to_numpy(dtype=float)
        b = sample[col].dropna().to_numpy(dtype=float)
        if len(a) == 0 or len(b) == 0:
            continue
        p = psi(a, b)
        # PSI of two samples from one distribution is ~ chi2(bins-1) * (1/n + 1/m): a small calibration set
        # has a large PSI by chance, so the bound is never below that noise's (1 - SAMPLING_ALPHA) quantile.
        bound = max(max_psi, float(chi2.ppf(1 - SAMPLING_ALPHA, 9)) * (1 / len(a) + 1 / len(b)))
        ks = ks_2samp(a, b)
        stats[col] = {"reference_mean": float(a.mean()), "sample_mean": float(b.mean()),
                      "reference_std": float(a.std()), "sample_std": float(b.std()), "psi": round(p, 5),
                      "ks_statistic": round(float(ks.statistic), 5), "ks_pvalue": float(ks.pvalue)}
        checks.append(ColumnCheck(col, "numeric", "population_stability_index", p <= bound, round(p, 5),
                                  {"max": round(bound, 5)}))
        checks.append(ColumnCheck(col, "numeric", "ks_2samp", ks.pvalue >= min_ks_pvalue,
                                  {"statistic": round(float(ks.statistic), 5), "pvalue": float(ks.pvalue)},
                                  {"min_pvalue": min_ks_pvalue}))
    return checks, stats


def check_drift(
    sample: pd.DataFrame,
    reference: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    quantile_tolerance: float = 0.1,
    max_kl: float = 0.5,
    max_psi: float = 0.25,
    min_ks_pvalue: float = 0.001,
    extra_checks: list | None = None,
) -> DriftReport:
    """Validate ``sample`` with a GX suite generated from ``reference``, plus PSI and KS computed
    directly; never raises on drift."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    sample = sample[numeric + categorical].copy()
    for col in categorical:
        sample[col] = sample[col].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        suite = context.suites.add(build_suite(reference, numeric, categorical, quantile_tolerance, max_kl,
                                                len(sample)))
        source = context.data_sources.add_pandas("qops")
        asset = source.add_dataframe_asset("calibration")
        batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(batch_parameters={"dataframe": sample})
        result = batch.validate(suite)
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        kw = cfg.kwargs
        observed = (r.result or {}).get("observed_value")
        if observed is None and "unexpected_percent" in (r.result or {}):
            observed = f"{r.result['unexpected_percent']:.2f}% unexpected"
        expected = {k: v for k, v in kw.items() if k in ("threshold", "value_set", "min_value", "max_value", "mostly",
                                                         "value")}
        if cfg.type == "expect_column_quantile_values_to_be_between":
            expected = kw["quantile_ranges"]["value_ranges"]
        if isinstance(observed, dict) and "values" in observed:
            observed = [round(float(v), 4) for v in observed["values"]]
        if isinstance(observed, float):
            observed = round(observed, 4)
        column = kw.get("column", "(table)")
        checks.append(ColumnCheck(
            column=column, kind="numeric" if column in numeric else ("table" if column == "(table)" else "categorical"),
            expectation=cfg.type, passed=bool(r.success), observed=observed, expected=expected,
        ))
    direct, stats = direct_checks(sample, reference, numeric, max_psi, min_ks_pvalue)
    checks += direct + list(extra_checks or [])
    drifted = sorted({c.column for c in checks if not c.passed})
    return DriftReport(
        passed=not drifted, drifted_columns=drifted, checks=checks,
        reference_rows=len(reference), sample_rows=len(sample), suite=suite.to_json_dict(), column_stats=stats,
    )
