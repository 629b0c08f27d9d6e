"""The sections that train or search: ``tuning`` (accuracy-aware tuning), ``qat`` (quantization-aware training per
target) and ``qlora`` (QLoRA fine-tuning of a causal LM)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qops.spec.base import Base


class TuningSpec(Base):
    """Accuracy-aware tuning (docs/targets.md#tuning): search, node fallback, fastest passing candidate."""

    enabled: bool = Field(False, description="Tune every target; off: quantize with the recipe as it is.")
    targets: list[str] | None = Field(default=None, description="Only these targets (default: all).")
    max_trials: int = Field(12, ge=1, description="Candidates quantized and judged, per target.")
    timeout_s: float = Field(600, gt=0, description="Wall-clock budget per target: no trial starts that would end "
                             "after it (judged by the median time of the trials so far).")
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


class QatTargetSpec(Base):
    """QAT for one target; unset training fields take the qat block's values."""

    when: Literal["always", "ptq_fails"] = Field(
        "ptq_fails", description="ptq_fails: train only when the target's PTQ model (after tuning) fails its gates; "
        "always: the QAT model is the target's candidate whatever PTQ did (PTQ still runs, for the comparison).")
    engine: Literal["qdq", "pt2e", "torchao"] | None = Field(
        default=None, description="Default: the one that writes the target's format: qdq (fine-tuning of the "
        "static PTQ model itself) for ONNX static INT8 (docs/qat.md#targets).")
    scheme: str | None = Field(default=None, description="Default: the target's (docs/qat.md#targets).")
    group_size: int | None = Field(default=None, ge=1, description="int4 groups; ONNX INT4 targets: their block_size.")
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    lr: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1)
    time_budget_s: float | None = Field(default=None, gt=0)


class QatSpec(Base):
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
    lr: float | None = Field(default=None, gt=0, description="Learning rate; default per engine: 1e-5 for qdq "
                             "(the PTQ model's own weights), 1e-4 for pt2e and torchao.")
    momentum: float = Field(0.9, ge=0, description="sgd only.")
    weight_decay: float = Field(0.0, ge=0)
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps (or epochs; default: 300 steps for "
                              "engine qdq, 3 epochs for pt2e and torchao).")
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1, description="Rows per step; default per engine: 8 for qdq, "
                                   "32 for pt2e and torchao.")
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


class QloraSpec(Base):
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
