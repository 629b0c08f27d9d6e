"""The ``data`` section: where the pool, reference and validation tables are, and how rows become feeds (data kinds)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qops.spec.base import Base


class TextSpec(Base):
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


class ImageSpec(Base):
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


class TensorsSpec(Base):
    pad_value: float = Field(0, description="Right-padding value for 1-D rows of different lengths.")


class CausalLMSpec(Base):
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


class DataSpec(Base):
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
