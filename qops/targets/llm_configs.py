"""The engine configs of decoder-LLM targets (``model_kind causal_lm``): each holds only what its engine reads.
See :mod:`qops.targets.configs` for the base class and the registry."""

from __future__ import annotations

from typing import ClassVar, Literal

from qops.targets.configs import EngineConfig, Problems, block_problem, register_config, smooth_problems

LmHead = Literal["int4", "int8", "fp32", "nf4"]


@register_config
class OrtDecoderConfig(EngineConfig):
    """ONNX Runtime GenAI folders: INT4 (MatMulNBits: RTN, GPTQ, AWQ, HQQ, k-quant), NF4 (MatMulBnb4) and W8A8
    (SmoothQuant, then per-tensor DynamicQuantizeMatMul or per-block 8-bit MatMulNBits)."""

    ENGINE: ClassVar[str] = "onnxruntime"
    MODEL_KIND: ClassVar[str] = "causal_lm"

    algorithm: Literal["rtn", "gptq", "awq", "hqq", "k_quant"] = "rtn"
    block_size: int = 32
    symmetric_weights: bool = True
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal (static groups)
    clip_search: bool = False  # GPTQ: each group's range shrunk to the least rounding error (GPTQ's mse option)
    accuracy_level: int | None = 4  # MatMulNBits compute type: 4 = int8 activations (fast on CPUs)
    # the embedding table: GatherBlockQuantized with "Gather" (embeddings: int8, sharing a tied model's 8-bit
    # lm_head table; or int4), else FP32
    op_types: tuple[str, ...] = ("MatMul", "Gather")
    embeddings: Literal["int8", "int4"] = "int8"
    lm_head: LmHead = "int8"  # the output projection's precision (docs/llm.md#lm-head)
    # W8A8: activations quantized per tensor (DynamicQuantizeMatMul) or per token and block of block_size
    # (8-bit MatMulNBits, accuracy_level 4)
    activation_granularity: Literal["per-tensor", "per-block"] = "per-tensor"
    smooth_quant_alpha: float | None = None  # W8A8: SmoothQuant migration strength
    tensor_overrides: str | None = None  # INT4: a `qops sensitivity` file whose layers stay 8-bit

    def problems(self) -> Problems:
        out = super().problems()
        if self.precision not in ("int4", "int8", "nf4"):
            out.append((f"precision {self.precision!r} is not an ONNX decoder format.", "use int4, int8 or nf4."))
        if self.precision in ("int4", "nf4"):
            out += block_problem(self.block_size)
        if self.activation_granularity == "per-block" and self.precision != "int8":
            out.append(("per-block activations are the 8-bit MatMulNBits path of decoder W8A8 targets.",
                        "drop activation_granularity, or use llm_w8a8_sq."))
        if self.tensor_overrides is not None and self.precision != "int4":
            out.append(("tensor_overrides (8-bit layers from `qops sensitivity`) apply to the ONNX INT4 decoder "
                        "targets.", "drop tensor_overrides, or use an llm_int4_* target."))
        if self.lm_head == "nf4" and self.precision != "nf4" or self.lm_head == "int4" and self.precision == "nf4":
            out.append((f"lm_head {self.lm_head!r} does not fit precision {self.precision!r}.",
                        "use lm_head int8 or fp32, or the recipe's own 4-bit format."))
        return out + smooth_problems(self.smooth_quant_alpha, self.mode)

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        what = {"int8": f"{mode} INT8 PTQ ({self.activation_granularity} activations)",
                "int4": f"INT4 weight-only ({self.algorithm.upper()}, block {self.block_size}), lm_head {self.lm_head}",
                "nf4": f"NF4 weight-only (block {self.block_size}), lm_head {self.lm_head}"}
        return f"{what[self.precision]} ({runtime})"

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in ("gptq", "awq") and self.precision == "int4" or self.smooth_quant_alpha is not None

    @property
    def granularity(self) -> str:
        per_block = self.precision != "int8" or self.activation_granularity == "per-block"
        return f"block-wise ({self.block_size})" if per_block else "per-channel"


@register_config
class GgufConfig(EngineConfig):
    """llama.cpp: the GGUF file type ``llama-quantize`` writes, whether an importance matrix from the calibration
    set weighs its rounding, and the KV-cache element type the runtime allocates."""

    ENGINE: ClassVar[str] = "llama.cpp"
    MODEL_KIND: ClassVar[str] = "causal_lm"
    SUFFIX: ClassVar[str] = ".gguf"

    mode: Literal["weight_only"] = "weight_only"
    gguf_type: Literal["Q8_0", "Q4_K_M", "Q4_0"]
    imatrix: bool = True
    kv_cache_type: Literal["f16", "q8_0"] = "f16"

    def problems(self) -> Problems:
        want = "int8" if self.gguf_type == "Q8_0" else "int4"
        if self.precision != want:
            return [(f"precision {self.precision!r} does not match gguf_type {self.gguf_type}.", f"use {want}.")]
        return super().problems()

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        imatrix = ", importance matrix" if technique.get("imatrix") else ""
        return f"GGUF {self.gguf_type} weight-only{imatrix}, KV cache {self.kv_cache_type} ({runtime})"

    @property
    def needs_calibration(self) -> bool:
        return self.imatrix

    @property
    def calibration_use(self) -> str:
        return "importance matrix"

    @property
    def granularity(self) -> str:  # Q8_0/Q4_0: blocks of 32; k-quants: blocks of 32 in super-blocks of 256
        return "block-wise (32)"


@register_config
class CompressedTensorsConfig(EngineConfig):
    """compressed-tensors checkpoints for vLLM: W4A16 (int4 groups), W8A8 INT8 (SmoothQuant + int8 weights per
    channel, int8 activations per token at run time) or FP8 dynamic."""

    ENGINE: ClassVar[str] = "compressed-tensors"
    MODEL_KIND: ClassVar[str] = "causal_lm"

    algorithm: Literal["rtn", "gptq", "awq"] = "gptq"
    block_size: int = 128  # W4A16: the group size
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal (static groups)
    clip_search: bool = False  # GPTQ: each group's range shrunk to the least rounding error (GPTQ's mse option)
    smooth_quant_alpha: float | None = None
    # SmoothQuant sites: the norms feeding q/k/v and the MLP, or also up_proj -> down_proj (and v -> o without GQA)
    smooth_sites: Literal["norms", "all"] = "norms"
    # W8A8: the share of the measured int8-activation cost (KL, site by site on calibration windows) taken back by
    # leaving the costliest sites' modules unquantized (the scheme's ignore list; at most 10% of the sites); 0: none
    activation_fallback: float = 0.0

    def problems(self) -> Problems:
        if (self.precision, self.mode) not in (("int4", "weight_only"), ("int8", "dynamic"), ("fp8", "dynamic")):
            return [("the compressed-tensors engine writes decoder LLMs as W4A16 (int4, weight_only), W8A8 (int8, "
                     "dynamic) or FP8 dynamic (fp8, dynamic).", "use a ct_* target (qops targets).")]
        out = smooth_problems(self.smooth_quant_alpha, self.mode)
        if not 0.0 <= self.activation_fallback < 1.0:
            out.append((f"activation_fallback {self.activation_fallback} is not a share of the activation cost in "
                        "[0, 1).", "use e.g. 0.33 (the costliest sites holding a third of the cost stay unquantized), "
                        "or 0 for none."))
        elif self.activation_fallback and self.precision != "int8":
            out.append(("activation_fallback applies to W8A8 INT8 (int8 activations per token).",
                        "drop activation_fallback, or use ct_w8a8_int8."))
        if self.precision == "fp8" and self.algorithm != "rtn":
            out.append(("FP8 dynamic rounds weights to the e4m3 grid (no GPTQ/AWQ search in qops).",
                        "use algorithm rtn."))
        return out + (block_problem(self.block_size) if self.precision == "int4" else [])

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        return f"compressed-tensors {technique.get('algorithm', self.algorithm)} ({runtime})"

    @property
    def needs_calibration(self) -> bool:
        return (self.algorithm in ("gptq", "awq") or self.smooth_quant_alpha is not None
                or (self.activation_fallback > 0 and self.precision == "int8"))

    @property
    def granularity(self) -> str:
        return f"block-wise ({self.block_size})" if self.precision == "int4" else "per-channel"


@register_config
class BitsAndBytesConfig(EngineConfig):
    """Transformers folders quantized by bitsandbytes at load time: NF4 with double quantization in blocks of 64
    (QLoRA's format) or LLM.int8() (int8 rows, outlier features in 16-bit)."""

    ENGINE: ClassVar[str] = "bitsandbytes"
    MODEL_KIND: ClassVar[str] = "causal_lm"

    mode: Literal["weight_only"] = "weight_only"
    precision: Literal["nf4", "int8"] = "nf4"

    @property
    def granularity(self) -> str:
        return "block-wise (64)" if self.precision == "nf4" else "per-channel"

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        what = "NF4 weight-only (block 64, double quantization)" if self.precision == "nf4" else \
            "LLM.int8() weight-only (outlier features in 16-bit)"
        return f"{what}, lm_head fp32 ({runtime})"


@register_config
class TorchaoDecoderConfig(EngineConfig):
    """torchao on a Transformers checkpoint (CUDA): INT4 weight-only groups or FP8 dynamic per row."""

    ENGINE: ClassVar[str] = "torchao"
    MODEL_KIND: ClassVar[str] = "causal_lm"

    torch_method: Literal["int4_weight_only", "float8_dynamic"]
    block_size: int = 128  # int4_weight_only: the group size

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        what = f"INT4 weight-only (block {self.block_size})" if self.precision == "int4" else f"FP8 {mode}"
        return f"{what}, torchao {self.torch_method} ({runtime})"

    @property
    def granularity(self) -> str:
        return f"block-wise ({self.block_size})" if self.precision == "int4" else "per-channel"

