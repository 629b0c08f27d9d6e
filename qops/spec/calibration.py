"""The ``calibration`` section: size, strategy, recency and diversity, and the drift check."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qops.spec.base import Base


class DriftSpec(Base):
    enabled: bool = True
    max_kl_divergence: float = Field(0.5, ge=0, description="Per column (GX, with tail holdout).")
    quantile_tolerance: float = Field(
        0.1, ge=0, description="Allowed shift of the 5/25/50/75/95% quantiles beyond the sampling band "
        "expected for the calibration set's size, in reference std units."
    )
    max_psi: float = Field(0.25, ge=0, description="Population stability index bound (raised to the sampling "
                           "noise of small sets).")
    min_ks_pvalue: float = Field(0.001, ge=0, le=1, description="Two-sample KS test p-value below which a column "
                                 "drifted.")
    on_drift: Literal["fail", "warn", "reselect"] = "fail"
    max_reselect: int = Field(3, ge=0, description="With on_drift: reselect, new seeds to try before failing.")


class RecencySpec(Base):
    column: str
    window_days: float = Field(gt=0)


class DiversitySpec(Base):
    columns: list[str] | None = Field(default=None, description="Numeric columns; default: the features.")
    embedding_column: str | None = Field(default=None, description="A list/array column used instead.")
    candidates: int = Field(20, ge=1, description="Candidate reservoir = candidates x size rows.")


class CalibrationSpec(Base):
    size: int = Field(200, gt=0, description="Number of rows in the calibration set.")
    strategy: Literal["random", "stratified", "diversity"] = "stratified"
    stratify_by: list[str] | None = Field(default=None, description="Default: data.slice_columns.")
    min_per_slice: int = Field(1, ge=0, description="Stratified: at least this many rows per stratum.")
    on_small_slice: Literal["warn", "fail"] = "warn"
    recency: RecencySpec | None = None
    diversity: DiversitySpec | None = None
    reference_sample: int = Field(100_000, ge=100, description="Rows of the reference used for the drift check.")
    seed: int = 0
    drift: DriftSpec = Field(default_factory=DriftSpec)
