"""The ``gates`` section: metrics, thresholds overall and per slice, fairness, speed and size, and what an
inconclusive interval means."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, model_validator

from qops.metric_names import known_metrics
from qops.spec.base import Base


class MetricThreshold(Base):
    """Bounds for one metric, in the spirit of MLflow's MetricThreshold / TFMA's thresholds."""

    metric: str
    min_value: float | None = Field(default=None, description="Absolute lower bound on the quantized value.")
    max_value: float | None = Field(default=None, description="Absolute upper bound on the quantized value.")
    max_drop: float | None = Field(default=None, ge=0, description="Allowed degradation vs FP32, overall.")
    max_slice_drop: float | None = Field(default=None, ge=0, description="Allowed degradation per slice.")
    slice_overrides: dict[str, float] = Field(default_factory=dict,
                                              description="Slice key (e.g. 'sex=female') -> allowed degradation.")


class InconclusiveSpec(Base):
    """What an inconclusive check (its interval straddles the tolerance) decides."""

    overall: Literal["warn", "fail", "point"] = Field(
        "warn", description="Overall change checks and absolute bounds.")
    slices: Literal["warn", "fail", "point"] = Field(
        "warn", description="Slice and fairness checks (one family per target, multiplicity-corrected).")


class GateSpec(Base):
    task: Literal["classification", "regression", "embedding", "causal_lm"] = Field(
        "classification", description="embedding: label-free, the outputs are vectors compared with FP32's "
        "(cosine, neighbor_agreement); causal_lm: next-token perplexity, agreement and KL against FP32 "
        "(docs/llm.md). Default: causal_lm when data.kind is causal_lm.")
    metric: str = Field("accuracy", description="Primary metric: the drop checks below apply to it "
                        "(task embedding: cosine unless set).")
    output: str | None = Field(default=None, description="Model output the task reads (default: the first).")
    embedding_output: str | None = Field(
        default=None, description="A further output holding embeddings (e.g. a classifier's pooled vector): adds "
        "embedding_cosine and neighbor_agreement on it.")
    metrics: list[str] | None = Field(default=None, description="Metrics to compute; default by task (+ fidelity).")
    custom_metrics: dict[str, str] = Field(
        default_factory=dict, description="name -> 'package.module:function(y_true, y_pred, y_score)'.")
    max_overall_drop: float = Field(0.01, ge=0, description="FP32 minus quantized primary metric, overall.")
    max_slice_drop: float = Field(0.03, ge=0, description="The same, for every slice.")
    slice_overrides: dict[str, float] = Field(default_factory=dict,
                                              description="Slice key -> allowed drop of the primary metric.")
    thresholds: list[MetricThreshold] = Field(default_factory=list, description="Bounds on further metrics.")
    inconclusive: InconclusiveSpec = Field(
        default_factory=lambda: InconclusiveSpec(),
        description="What a check whose interval straddles its tolerance means, for overall and for slice/"
        "fairness checks: warn (pass with a warning), fail, or point (decide on the point estimate).")
    decision: Literal["point", "bound"] | None = Field(
        default=None, description="Alias kept from earlier versions: point = inconclusive {overall: point, "
        "slices: point}; bound = inconclusive {overall: fail, slices: fail}.")
    multiplicity: Literal["holm", "bonferroni", "none"] = Field(
        "holm", description="Correction of the slice and fairness checks of one target (one family) so that the "
        "chance of failing a model that is within tolerance everywhere stays within 1 - confidence.")
    outputs: Literal["auto", "logits", "probabilities"] = Field(
        "auto", description="How classifier outputs are read; auto decides on the FP32 model's outputs and "
        "applies the same reading to the quantized model.")
    batch_size: int | None = Field(
        default=None, ge=1, description="Validation rows per inference batch. Default: 1 for text (no padding, and "
        "dynamic INT8 computes activation ranges per batch, as a batch-1 server does), 64 otherwise.")
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap: int = Field(1000, ge=0, description="Paired bootstrap resamples for the confidence intervals.")
    seed: int = 0
    min_slice_size: int = Field(20, ge=1, description="Smaller slices are reported as insufficient data.")
    insufficient_data: Literal["warn", "fail"] = "warn"
    fairness_metrics: list[Literal["demographic_parity_difference", "equalized_odds_difference", "metric_gap"]] = (
        Field(default_factory=lambda: ["demographic_parity_difference", "equalized_odds_difference", "metric_gap"]))
    max_fairness_increase: float = Field(0.02, ge=0, description="Allowed increase of each fairness metric.")
    max_fairness_value: float | None = Field(default=None, ge=0, description="Optional absolute bound.")
    max_latency_ratio: float = Field(1.0, gt=0, description="Quantized batch-1 p50 latency / FP32's.")
    max_size_ratio: float = Field(1.0, gt=0, description="Quantized file size / FP32's.")
    serves: bool = Field(True, description="Decoder LLMs: after registration, load the registered version in its "
                         "serving runtime in a fresh process and generate a fixed prompt; a failure keeps the "
                         "candidate/champion aliases where they are and is in the card.")
    latency_runs: int = Field(300, ge=10, description="Timed batch-1 runs per model (after warm-up).")

    @model_validator(mode="after")
    def _embedding_metric(self) -> "GateSpec":
        if self.task == "embedding" and "metric" not in self.model_fields_set:
            self.metric = "cosine"
        if self.task == "causal_lm" and "metric" not in self.model_fields_set:
            self.metric = "perplexity_increase"
        return self

    @model_validator(mode="after")
    def _decision_alias(self) -> "GateSpec":
        if self.decision is not None:
            policy = "point" if self.decision == "point" else "fail"
            implied = InconclusiveSpec(overall=policy, slices=policy)
            if "inconclusive" in self.model_fields_set and self.inconclusive != implied:
                raise ValueError("set either gates.decision (an older alias) or gates.inconclusive, not both; "
                                 "decision: point = inconclusive {overall: point, slices: point}, "
                                 "decision: bound = inconclusive {overall: fail, slices: fail}")
            self.inconclusive = implied
        return self

    @model_validator(mode="after")
    def _known_metric_names(self) -> "GateSpec":
        known = known_metrics(self.custom_metrics)
        named = [("gates.metric", self.metric)] + [("gates.thresholds", t.metric) for t in self.thresholds] + [
            ("gates.metrics", m) for m in self.metrics or []]
        bad = [f"{where}: {m!r}" for where, m in named if m not in known]
        if bad:
            close = sorted({c for _, m in named for c in difflib.get_close_matches(m, known, n=2, cutoff=0.6)
                            if m not in known})
            raise ValueError(f"unknown metric name(s) {', '.join(bad)}"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + f"; known metrics: {', '.join(known)} (and custom_metrics names)")
        return self
