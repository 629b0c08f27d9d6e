"""The pipeline spec: one YAML file, validated by typed models, the single source of truth.

The CLI (`qops run spec.yaml`) runs it, the Airflow DAG factory builds the DAG from it, and the
model card quotes it. Strings may use ``${VAR}`` or ``${VAR:-default}``; relative paths are
resolved against the folder of the spec file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qops.errors import QopsError, SpecError
from qops.metric_names import known_metrics
from qops.qat.plan import config_for, plan_for
from qops.targets import get_target, list_targets

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None or value == "":
            if default is None:
                raise SpecError(
                    f"The spec uses ${{{name}}} but the environment variable {name} is not set.",
                    f"export {name}=... or write ${{{name}:-default}} in the spec.",
                )
            return default
        return value

    return _VAR.sub(repl, text)


def _expand_tree(node):
    """Expand ${VAR} in every string value of the parsed YAML (comments are never expanded)."""
    if isinstance(node, str):
        return expand_vars(node)
    if isinstance(node, list):
        return [_expand_tree(v) for v in node]
    if isinstance(node, dict):
        return {k: _expand_tree(v) for k, v in node.items()}
    return node


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextSpec(_Base):
    """Text columns tokenized by a local tokenizer (never downloaded)."""

    columns: list[str] = Field(min_length=1, max_length=2, description="One text column, or two for pairs.")
    tokenizer: str = Field(description="Local directory with tokenizer.json (or a tokenizer transformers loads "
                           "from files); a hub name is an error.")
    max_length: int = Field(128, ge=1, description="Tokens per row after truncation.")
    truncation: bool = True
    padding: Literal["longest", "max_length"] = Field("longest", description="Pad each batch to its longest row "
                                                     "or always to max_length.")
    latency_length: int | None = Field(default=None, ge=1, description="Sequence length for batch-1 latency; "
                                       "default: the validation rows' median length.")


class ImageSpec(_Base):
    """Image files preprocessed with Pillow (resize the shorter side, centre crop, scale, mean/std)."""

    path_column: str = Field("path", description="Column of image paths.")
    root: str | None = Field(default=None, description="Folder that relative paths are read from; default: "
                             "the folder of the spec.")
    resize: int | None = Field(256, ge=1, description="Shorter side after resizing (null: no resize).")
    crop: int | None = Field(224, ge=1, description="Centre crop size (null: no crop).")
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406], min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225], min_length=3, max_length=3)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input: str | None = Field(default=None, description="Model input the pixels go to (default: the only one).")


class TensorsSpec(_Base):
    pad_value: float = Field(0, description="Right-padding value for 1-D rows of different lengths.")


class CausalLMSpec(_Base):
    """A text column scored by a decoder LLM: perplexity over fixed-length windows, generation speed with the KV
    cache (docs/llm.md)."""

    column: str = Field("text", description="The text column.")
    tokenizer: str | None = Field(default=None, description="Local tokenizer directory (tokenizer.json); default: "
                                  "the source model's own.")
    seq_len: int = Field(128, ge=8, description="Tokens per perplexity window.")
    stride: int = Field(64, ge=1, description="Window step; each window scores the tokens no earlier window "
                        "scored (the sliding-window perplexity of the HF guide).")
    max_windows_per_row: int = Field(2, ge=1, description="Windows scored per row at most (rows are documents).")
    calibration_windows: int = Field(1, ge=1, description="Windows per calibration row fed to GPTQ.")
    prompt_length: int = Field(64, ge=1, description="Prompt tokens for time to first token.")
    new_tokens: int = Field(32, ge=1, description="Greedy decode steps timed per prompt (KV cache, batch 1).")
    speed_prompts: int = Field(5, ge=1, description="Validation rows used as prompts for the generation timing.")

    @model_validator(mode="after")
    def _stride(self) -> "CausalLMSpec":
        if self.stride > self.seq_len:
            raise ValueError(f"data.causal_lm.stride {self.stride} is larger than seq_len {self.seq_len}: tokens "
                             "between windows would never be scored; use stride <= seq_len")
        return self


class DataSpec(_Base):
    kind: Literal["tabular", "tensors", "text", "image", "causal_lm"] = Field(
        "tabular", description="How rows become model feeds keyed by input name (docs/spec.md#data-kinds).")
    text: TextSpec | None = None
    image: ImageSpec | None = None
    tensors: TensorsSpec | None = None
    causal_lm: CausalLMSpec | None = None
    pool: str = Field(description="Parquet/CSV pool to draw the calibration set from (recent production data).")
    reference: str = Field(description="Parquet/CSV reference (e.g. the training data) for the drift check.")
    validation: str = Field(description="Parquet/CSV validation set with labels and slice columns.")
    label: str | None = Field(description="Label column of the validation set; null: label-free fidelity gates.")
    slice_columns: list[str] = Field(default_factory=list, description="Demographic/slice columns.")
    intersections: list[list[str]] = Field(default_factory=list,
                                           description="Slice column combinations, e.g. [[sex, age_group]].")
    features: list[str] | None = Field(
        default=None,
        description="Feature columns fed to the model, in order. Default: the model's "
        "'qops.feature_columns' metadata.",
    )

    @model_validator(mode="after")
    def _kind_block(self) -> "DataSpec":
        if self.kind == "causal_lm" and self.causal_lm is None:
            self.causal_lm = CausalLMSpec()
        if self.kind in ("text", "image") and getattr(self, self.kind) is None:
            raise ValueError(f"data.kind is {self.kind} but the data.{self.kind} block is missing "
                             "(see docs/spec.md#data-kinds)")
        for other in ("text", "image", "tensors", "causal_lm"):
            if other != self.kind and getattr(self, other) is not None:
                raise ValueError(f"data.{other} is set but data.kind is {self.kind}; set data.kind: {other} "
                                 f"or remove data.{other}")
        if self.kind != "tabular" and self.features:
            raise ValueError("data.features lists tabular feature columns; it does not apply to data.kind "
                             f"{self.kind}")
        return self


class DriftSpec(_Base):
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


class RecencySpec(_Base):
    column: str
    window_days: float = Field(gt=0)


class DiversitySpec(_Base):
    columns: list[str] | None = Field(default=None, description="Numeric columns; default: the features.")
    embedding_column: str | None = Field(default=None, description="A list/array column used instead.")
    candidates: int = Field(20, ge=1, description="Candidate reservoir = candidates x size rows.")


class CalibrationSpec(_Base):
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


class MetricThreshold(_Base):
    """Bounds for one metric, in the spirit of MLflow's MetricThreshold / TFMA's thresholds."""

    metric: str
    min_value: float | None = Field(default=None, description="Absolute lower bound on the quantized value.")
    max_value: float | None = Field(default=None, description="Absolute upper bound on the quantized value.")
    max_drop: float | None = Field(default=None, ge=0, description="Allowed degradation vs FP32, overall.")
    max_slice_drop: float | None = Field(default=None, ge=0, description="Allowed degradation per slice.")
    slice_overrides: dict[str, float] = Field(default_factory=dict,
                                              description="Slice key (e.g. 'sex=female') -> allowed degradation.")


class InconclusiveSpec(_Base):
    """What an inconclusive check (its interval straddles the tolerance) decides."""

    overall: Literal["warn", "fail", "point"] = Field(
        "warn", description="Overall change checks and absolute bounds.")
    slices: Literal["warn", "fail", "point"] = Field(
        "warn", description="Slice and fairness checks (one family per target, multiplicity-corrected).")


class GateSpec(_Base):
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


class TuningSpec(_Base):
    """Accuracy-aware tuning (docs/targets.md#tuning): search, node fallback, fastest passing candidate."""

    enabled: bool = Field(False, description="Tune every target; off: quantize with the recipe as it is.")
    targets: list[str] | None = Field(default=None, description="Only these targets (default: all).")
    max_trials: int = Field(12, ge=1, description="Candidates quantized and judged, per target.")
    timeout_s: float = Field(900, gt=0, description="Wall-clock budget per target; no new trial starts after it.")
    calibration_methods: list[Literal["minmax", "percentile", "entropy", "distribution"]] = Field(
        default_factory=lambda: ["minmax", "percentile", "entropy"])
    granularities: list[Literal["per-channel", "per-tensor"]] = Field(
        default_factory=lambda: ["per-channel", "per-tensor"])
    modes: list[Literal["static", "dynamic"]] | None = Field(
        default=None, description="INT8 modes to try (default: the recipe's; 'auto' recipes try both).")
    smooth_quant_alphas: list[float | Literal["auto"]] | None = Field(
        default=None, description="SmoothQuant strengths to try (static and dynamic INT8; needs a calibration set); "
        "'auto' picks one per layer. Default: [auto, 0.7] for attention graphs, none otherwise; [] turns it off.")
    embedding_granularities: list[Literal["per-tensor", "per-row"]] | None = Field(
        default=None, description="INT8 embedding tables to try: one scale per table (ONNX Runtime's) or one per "
        "row (default: per-row for attention graphs, else the recipe's).")
    try_all_ops: bool = Field(True, description="Static INT8: also try quantizing every op ONNX Runtime can "
                              "(keeps tensors INT8 between layers), not only the weighted ones.")
    activation_types: list[Literal["uint8", "int8"]] | None = Field(
        default=None, description="Static INT8 activation types to try (default: the recipe's).")
    max_fallback_nodes: int = Field(8, ge=0, description="Most nodes kept in FP32 by the fallback phase.")
    fallback_share: float = Field(0.5, ge=0, lt=1, description="Share of max_trials kept for node fallback "
                                  "(at least 2 trials) whatever the size of the search grid.")
    latency_tie: float = Field(0.03, ge=0, description="Latency ratios within this fraction of the fastest tie; "
                               "among them the smallest file wins (size_tie), then the most faithful.")
    size_tie: float = Field(0.05, ge=0, description="File sizes within this fraction of the smallest tie.")
    bootstrap: int = Field(200, ge=0, description="Bootstrap resamples per trial (the evaluate stage uses gates.bootstrap).")
    latency_runs: int = Field(200, ge=10, description="Timed batch-1 runs per trial, interleaved with FP32.")


class QatTargetSpec(_Base):
    """QAT for one target; unset training fields take the qat block's values."""

    when: Literal["always", "ptq_fails"] = Field(
        "ptq_fails", description="ptq_fails: train only when the target's PTQ model (after tuning) fails its gates; "
        "always: the QAT model is the target's candidate whatever PTQ did (PTQ still runs, for the comparison).")
    engine: Literal["torchao", "pt2e"] | None = Field(default=None, description="Default: the one that writes the "
                                                      "target's format (docs/qat.md#targets).")
    scheme: str | None = Field(default=None, description="Default: the target's (docs/qat.md#targets).")
    group_size: int | None = Field(default=None, ge=1, description="int4 groups; ONNX INT4 targets: their block_size.")
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    lr: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1)
    time_budget_s: float | None = Field(default=None, gt=0)


class QatSpec(_Base):
    """Quantization-aware training (docs/qat.md): per target, when PTQ fails its gates or always."""

    targets: dict[str, QatTargetSpec] = Field(description="Target name -> when (and optional overrides).")
    data: str | None = Field(default=None, description="Training split (parquet/CSV/.npz, the data kind's columns "
                             "and the label). Default: data.reference (the training data).")
    label: str | None = Field(default=None, description="Label column for loss: task. Default: data.label.")
    loss: Literal["task", "distill"] | None = Field(
        default=None, description="task: cross-entropy on the labels; distill: KL to the FP32 model's outputs "
        "(label-free). Default: task when a label is known, else distill.")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature.")
    program: str | None = Field(default=None, description="The FP32 torch.export program (.pt2) to train when the "
                                "source model is ONNX; default: the source's own (pytorch-flavored sources) or the "
                                "model version's qops.torch_program tag.")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    momentum: float = Field(0.9, ge=0, description="sgd only.")
    weight_decay: float = Field(0.0, ge=0)
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps (or epochs; default 3 epochs).")
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(32, ge=1)
    max_rows: int | None = Field(default=None, ge=1, description="Use at most this many training rows "
                                 "(a seeded sample).")
    seed: int = 0
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints (an Airflow retry resumes from "
                                  "the last one).")
    time_budget_s: float | None = Field(default=None, gt=0, description="Stop training (with a checkpoint) after "
                                        "this long, counted over retries.")
    group_size: int = Field(32, ge=1, description="int4 group size of the torchao schemes.")
    holdout: float = Field(0.2, ge=0, lt=1, description="Fraction of the training rows held out: scored at every "
                           "checkpoint; the best-scoring weights are kept (0: none).")
    patience: int | None = Field(8, ge=1, description="Checkpoints without a better held-out loss before training "
                                 "stops early (null: never).")
    bn_freeze_after: float | None = Field(0.0, ge=0, le=1, description="Fraction of the planned steps after which "
                                          "batch norm uses its running statistics (0: keep the pretrained ones; "
                                          "null: batch statistics throughout).")
    freeze_after: float | None = Field(0.5, gt=0, le=1, description="Fraction of the planned steps after which "
                                       "the observers stop: activation ranges and weight scales fixed (null: never).")
    logit_mse: float = Field(1.0, ge=0, description="distill: weight of the logits' relative MSE beside the KL.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "QatSpec":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set qat.steps or qat.epochs, not both")
        return self

    def resolved_loss(self, has_label: bool) -> str:
        """``loss``, or by default ``task`` when there is a label column and ``distill`` when there is none."""
        return self.loss or ("task" if has_label else "distill")


class QloraSpec(_Base):
    """QLoRA fine-tuning before quantization (data.kind causal_lm; docs/llm.md#qlora): the base in NF4 with double
    quantization, LoRA adapters trained on the training text, merged into a full-precision copy."""

    data: str | None = Field(default=None, description="Training text table; default: data.reference.")
    column: str | None = Field(default=None, description="Text column; default: data.causal_lm.column.")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(default=None, description="Default: every attention and MLP projection.")
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=8)
    seed: int = 0
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints (a retry resumes from the last).")
    time_budget_s: float | None = Field(default=None, gt=0)
    double_quant: bool = Field(True, description="Quantize the NF4 absmax constants again (8-bit), as QLoRA does.")
    max_rows: int | None = Field(default=None, ge=1)
    queue: Literal["cpu", "gpu"] = Field("cpu", description="Worker queue of the finetune task.")


class StorageSpec(_Base):
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; default "
                                        "$AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL or AWS.")
    s3_region: str | None = None


class PromotionSpec(_Base):
    """Move a serving alias to a registered quantized version, by policy (docs/registry.md#promotion)."""

    alias: str = Field("production", description="The serving alias to move.")
    require_approval: bool = Field(False, description="Only with a manual approval: the DAG run's conf "
                                   "{approve_promotion: true}, or qops promote --approve.")
    better_on: dict[str, Literal["max", "min"]] = Field(
        default_factory=dict, description="Logged metric -> max/min: the version must be at least as good as "
        "the current holder on each (e.g. quantized_accuracy: max, latency_p50_ms: min).")


class MlflowSpec(_Base):
    tracking_uri: str | None = Field(default=None, description="Default: $MLFLOW_TRACKING_URI.")
    registry_uri: str | None = None
    experiment: str = "qops"
    model_name: str = Field(
        "{source}-{target}",
        description="Registered model name per target; {source} is the source model's registered name.",
    )
    register_failed: bool = Field(
        False, description="Register a version whose gates failed (no aliases, tagged qops.gate=failed)."
    )
    promote_alias: str = "champion"
    candidate_alias: str = "candidate"
    promotion: PromotionSpec | None = Field(default=None, description="Also move a serving alias (e.g. "
                                            "production) after registration, by policy.")


class CardSpec(_Base):
    intended_use: str | None = None
    training_data: str | None = None
    limitations: str | None = Field(default=None, description="Rendered as 'Caveats and recommendations'.")
    ethical_considerations: str | None = None
    owners: list[str] = Field(default_factory=list)


class WatchSpec(_Base):
    """Run the DAG when the source model's alias moves in the MLflow registry (docs/airflow.md#promotion-triggers)."""

    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between registry polls (triggerer).")
    fire_on_start: bool = Field(False, description="Also run for the version holding the alias when watching "
                                "starts (default: only for later moves).")


class PipelineSpec(_Base):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source_model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION, or a .onnx path.")
    data: DataSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    targets: list[str] = Field(min_length=1)
    target_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Target name -> recipe fields to override (qops targets --json lists them).")
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    qat: QatSpec | None = Field(default=None, description="Quantization-aware training per target (docs/qat.md).")
    qlora: QloraSpec | None = Field(default=None, description="QLoRA fine-tuning of a causal LM before quantization "
                                    "(docs/llm.md#qlora).")
    gates: GateSpec = Field(default_factory=GateSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    card: CardSpec = Field(default_factory=CardSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    artifact_root: str = Field("qops-artifacts", description="Local folder for run artifacts.")
    schedule_asset: str | None = Field(
        default=None, description="Asset URI whose updates trigger the quantization DAG."
    )
    watch: WatchSpec | None = Field(default=None, description="Also trigger the DAG when source_model's alias "
                                    "(models:/NAME@ALIAS) moves to another version, set by anyone.")

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("targets must not repeat")
        return v

    @model_validator(mode="after")
    def _check_known_targets(self) -> "PipelineSpec":
        for t in self.targets:
            get_target(t, self.target_options.get(t))  # raises TargetError naming the problem and the fix
        stray = sorted(set(self.target_options) - set(self.targets))
        if stray:
            raise ValueError(f"target_options names target(s) {stray} that are not in targets {self.targets}")
        if self.data.kind == "causal_lm":
            if "task" not in self.gates.model_fields_set:
                self.gates.task = "causal_lm"
                if "metric" not in self.gates.model_fields_set:
                    self.gates.metric = "perplexity_increase"
            if self.gates.task != "causal_lm":
                raise ValueError(f"gates.task is {self.gates.task} but data.kind is causal_lm; use gates.task: "
                                 "causal_lm (or leave it out)")
            if self.qat is not None:
                raise ValueError("qat applies to classifiers and encoders; for a causal LM use the qlora block "
                                 "(docs/llm.md#qlora)")
        elif self.qlora is not None:
            raise ValueError("qlora fine-tunes causal LMs; set data.kind: causal_lm or remove the qlora block")
        elif self.gates.task == "causal_lm":
            raise ValueError("gates.task causal_lm needs data.kind: causal_lm")
        self._check_model_kinds()
        if self.qat is not None:
            self._check_qat()
        if self.watch is not None and self.watched_alias() is None:
            raise ValueError(f"watch needs source_model as models:/NAME@ALIAS (an alias to watch); it is "
                             f"{self.source_model!r}")
        return self

    def _check_model_kinds(self) -> None:
        """Every target of a causal_lm spec must be an LLM recipe, and LLM recipes only serve causal_lm specs."""
        llm = self.data.kind == "causal_lm"
        for t in self.targets:
            r = self.recipe(t)
            if llm and r.model_kind != "causal_lm":
                ok = [n for n, x in list_targets().items() if x.model_kind == "causal_lm"]
                raise ValueError(f"Target {t!r} quantizes ONNX graphs of any kind; data.kind causal_lm takes decoder "
                                 f"LLM targets (KV-cache aware, lm_head and embedding choices). Fix: use one of {ok}.")
            if not llm and r.model_kind == "causal_lm":
                raise ValueError(f"Target {t!r} is a decoder-LLM target but data.kind is {self.data.kind}. Fix: set "
                                 "data.kind: causal_lm (docs/llm.md), or pick a target from `qops targets`.")

    def watched_alias(self) -> tuple[str, str] | None:
        """(model name, alias) of ``source_model`` when it is ``models:/NAME@ALIAS``."""
        m = re.match(r"^models:/([^/@]+)@([^/@]+)$", self.source_model)
        return (m.group(1), m.group(2)) if m else None

    def _check_qat(self) -> None:
        stray = sorted(set(self.qat.targets) - set(self.targets))
        if stray:
            raise ValueError(f"qat.targets names target(s) {stray} that are not in targets {self.targets}")
        for name, t in self.qat.targets.items():
            if t.steps is not None and t.epochs is not None:
                raise ValueError(f"qat.targets.{name}: set steps or epochs, not both")
            try:
                plan = plan_for(self.recipe(name), engine=t.engine, scheme=t.scheme, mode="static")
                if t.group_size and plan.output == "onnx_matmulnbits" and t.group_size != plan.group_size:
                    raise QopsError(f"target {name} stores blocks of {plan.group_size}; qat group_size "
                                    f"{t.group_size} would not fit", "drop qat group_size for this target, or set "
                                    "target_options block_size to the same value")
                config_for(self.qat, name, plan, has_label=bool(self.qat.label or self.data.label))
            except QopsError as e:
                raise ValueError(f"qat.targets.{name}: {e}") from None

    def qat_plan(self, target: str, mode: str | None = None):
        """The QAT plan of ``target`` (None when the spec has no QAT for it)."""
        if self.qat is None or target not in self.qat.targets:
            return None
        t = self.qat.targets[target]
        return plan_for(self.recipe(target), engine=t.engine, scheme=t.scheme, mode=mode)

    def recipe(self, target: str):
        return get_target(target, self.target_options.get(target))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


def _resolve_paths(spec: PipelineSpec, base: Path) -> PipelineSpec:
    def fix(p: str) -> str:
        if "://" in p or p.startswith("models:"):
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    d = spec.data
    d.pool, d.reference, d.validation = fix(d.pool), fix(d.reference), fix(d.validation)
    if d.text is not None:
        d.text.tokenizer = fix(d.text.tokenizer) if d.text.tokenizer.startswith((".", "/", "~")) or (
            base / d.text.tokenizer).exists() else d.text.tokenizer  # a hub-like name stays as given: an error later
    if d.image is not None:
        d.image.root = fix(d.image.root or ".")
    if d.causal_lm is not None and d.causal_lm.tokenizer:
        d.causal_lm.tokenizer = fix(d.causal_lm.tokenizer)
    if spec.qlora is not None and spec.qlora.data:
        spec.qlora.data = fix(spec.qlora.data)
    if spec.qat is not None:
        spec.qat.data = fix(spec.qat.data) if spec.qat.data else None
        spec.qat.program = fix(spec.qat.program) if spec.qat.program else None
    spec.artifact_root = fix(spec.artifact_root)
    spec.source_model = fix(spec.source_model)
    return spec


def parse_spec(raw: dict, base_dir: str | os.PathLike = ".") -> PipelineSpec:
    try:
        spec = PipelineSpec.model_validate(raw)  # an unknown target raises TargetError, unwrapped
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise SpecError("The pipeline spec is invalid:\n" + "\n".join(lines), "correct the fields listed.") from None
    return _resolve_paths(spec, Path(base_dir))


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"Spec file {p} does not exist.", "pass the path of a pipeline spec YAML file.")
    try:
        raw = _expand_tree(yaml.safe_load(p.read_text(encoding="utf-8")))
    except yaml.YAMLError as e:
        raise SpecError(f"Spec file {p} is not valid YAML: {e}", "fix the YAML syntax.") from None
    if not isinstance(raw, dict):
        raise SpecError(f"Spec file {p} must hold a mapping at the top level.", "see docs/spec.md.")
    return parse_spec(raw, p.parent.resolve())
