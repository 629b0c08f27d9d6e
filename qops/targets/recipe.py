"""The recipe of a hardware target: what to quantize to, how, and for which runtime, execution provider and
worker queue. A frozen dataclass validated in ``__post_init__`` with messages that say how to fix the input (the
shape of torchao's configs); overrides (:meth:`Recipe.with_options`, a spec's ``target_options``, ``--option``)
are validated by pydantic against each field's type."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from qops.errors import TargetError

Mode = Literal["static", "dynamic", "auto", "weight_only", "cast"]


QType = Literal["int8", "uint8", "int4", "uint4", "float8e4m3fn"]


Precision = Literal["int8", "fp16", "int4", "codebook", "fp8", "nf4"]


_MODES_BY_PRECISION = {
    "int8": ("static", "dynamic", "auto", "weight_only"),
    "fp16": ("cast",),
    "int4": ("weight_only",),
    "codebook": ("weight_only",),
    "fp8": ("dynamic", "static"),
    "nf4": ("weight_only",),
}


@dataclass(frozen=True)
class Recipe:
    """How to quantize for one hardware target.

    ``mode``: ``static`` (calibrated activations), ``dynamic`` (activation ranges at run time), ``auto``
    (dynamic for attention/recurrent graphs, static otherwise: :func:`qops.quantize.graph.choose_mode`),
    ``weight_only`` (INT4 block-wise or codebook weights, FP32 activations), ``cast`` (FP16).
    """

    target: str
    description: str
    hardware: str
    mode: Mode
    precision: Precision = "int8"
    engine: Literal["onnxruntime", "torchao", "bitsandbytes", "llama.cpp", "compressed-tensors"] = "onnxruntime"
    weight_type: QType = "int8"
    activation_type: QType = "uint8"
    per_channel: bool = True
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    quant_format: Literal["QDQ", "QOperator"] = "QDQ"
    calibration_method: Literal["minmax", "entropy", "percentile", "distribution"] = "minmax"
    percentile: float = 99.999  # calibration_method="percentile": clip activations at this percentile
    # SmoothQuant migration strength (None: off; "auto": chosen per layer on the calibration activations)
    smooth_quant_alpha: float | Literal["auto"] | None = None
    # static INT8 of convolutional graphs (qops.quantize.cnn): "auto" = on for convolutional graphs
    integer_graph: Literal["auto", "on", "off"] = "auto"  # QDQ on every op ORT quantizes (Clip, Add, pooling...)
    bias_correction: Literal["auto", "on", "off"] = "auto"  # empirical, layer by layer, on refine_rows rows
    # cross-layer equalization before static INT8 (qops.quantize.equalize): "exact" = Relu/linear chains (FP32
    # outputs unchanged), "calibrated" = Clip(0, c) chains too (unchanged on the calibration rows only)
    equalization: Literal["off", "exact", "calibrated"] = "off"
    learned_rounding: bool = False  # AdaRound per layer (slower: ~1-2 s per layer)
    refine_rows: int = 128  # calibration rows bias correction reproduces FP32's mean output on (streamed)
    rounding_rows: int = 32  # of those, the rows learned rounding fits (held in memory, one layer at a time)
    rounding_iters: int = 200
    refine_budget_s: float = 600.0
    # quantization-aware fine-tuning of the static QDQ graph itself (qops.quantize.finetune): 0 steps = off
    finetune_steps: int = 0
    finetune_lr: float = 1e-5
    finetune_batch: int = 8
    finetune_rows: int = 512  # calibration rows loaded for it (a held-out fifth picks the best step)
    finetune_budget_s: float = 1200.0
    calibration_batch: int = 8  # rows per calibration batch: peak memory is one batch's intermediate tensors
    # INT8 embedding tables (Gather on a large weight): one scale for the table (ONNX Runtime's) or one per row
    embedding_granularity: Literal["per-tensor", "per-row"] = "per-tensor"
    # weighted ops (Gather: embedding tables); () = every op ONNX Runtime quantizes (INT8)
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv", "Gather")
    nodes_to_exclude: tuple[str, ...] = ()  # kept in FP32 (accuracy-aware tuning fills this)
    # INT4 weight-only (ONNX Runtime MatMulNBits)
    algorithm: Literal["rtn", "gptq", "awq", "hqq", "k_quant"] = "rtn"  # hqq, k_quant: decoder LLM targets
    block_size: int = 128
    embedding_block_size: int | None = None  # INT4 embedding tables (GatherBlockQuantized); None: block_size
    # weight-only INT4/INT8: the precision of the layers kept out of it (nodes_to_exclude; the tuner's fallback)
    fallback_precision: Literal["int8", "fp32"] = "int8"  # int8: dynamic INT8 per channel (MatMulInteger)
    accuracy_level: int | None = 4  # MatMulNBits compute type: 4 = int8 activations (fast on CPUs)
    # decoder LLMs (data.kind causal_lm): the output projection's precision (docs/llm.md#lm-head)
    lm_head: Literal["int4", "int8", "fp32", "nf4"] = "int8"
    # decoder W8A8 in ONNX Runtime: activations quantized per tensor (DynamicQuantizeMatMul) or per token and block
    # of block_size (8-bit MatMulNBits, accuracy_level 4)
    activation_granularity: Literal["per-tensor", "per-block"] = "per-tensor"
    # decoder INT4 in ONNX Runtime: a qops tensor-override file (`qops sensitivity`): its layers stay 8-bit
    tensor_overrides: str | None = None
    model_kind: Literal["any", "causal_lm"] = "any"  # causal_lm: only for decoder LLM pipelines
    # GGUF for llama.cpp (engine llama.cpp): the file type llama-quantize writes, whether an importance matrix from
    # the calibration set weighs its rounding, and the KV-cache element type the runtime allocates
    gguf_type: Literal["Q8_0", "Q4_K_M", "Q4_0"] | None = None
    imatrix: bool = True
    kv_cache_type: Literal["f16", "q8_0"] = "f16"
    # non-uniform (codebook) weights
    codebook: Literal["kmeans", "pow2"] = "kmeans"
    codebook_bits: int = 4
    # torchao engine
    torch_method: Literal["pt2e_x86_inductor", "int8_dynamic", "int8_weight_only", "int4_weight_only",
                          "float8_dynamic"] | None = None
    torch_compile: bool = True
    runtime: str = "onnxruntime"
    execution_provider: str = "CPUExecutionProvider"
    device: Literal["cpu", "cuda"] = "cpu"
    min_compute_capability: tuple[int, int] | None = None  # CUDA capability the recipe needs (FP8: 8.9)
    queue: Literal["cpu", "gpu"] = "cpu"
    arch: str | None = "x86_64"  # platform.machine() of the target hardware
    required_isa: tuple[str, ...] = ()  # CPU flags the recipe assumes (for the "not on target hardware" note)
    version: int = 2
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(problem: str, fix: str) -> None:
            raise TargetError(f"Target {self.target!r}: {problem}", fix)

        if self.mode not in _MODES_BY_PRECISION[self.precision]:
            bad(f"mode {self.mode!r} does not apply to precision {self.precision!r}.",
                f"use mode one of {list(_MODES_BY_PRECISION[self.precision])}.")
        if self.precision == "int8" and self.mode == "dynamic" and self.engine == "onnxruntime" \
                and self.activation_type != "uint8":
            bad(f"ONNX Runtime dynamic quantization computes activations as uint8 only, not {self.activation_type}.",
                "set activation_type='uint8' for a dynamic recipe.")
        if self.precision == "int8" and self.weight_type not in ("int8", "uint8"):
            bad(f"INT8 recipes take int8/uint8 weights, not {self.weight_type}.", "set weight_type='int8'.")
        if self.quant_format == "QOperator" and self.mode == "static" and self.activation_type == "int8":
            bad("QOperator format with int8 activations is not supported by the CPU EP.",
                "use quant_format='QDQ' or activation_type='uint8'.")
        if not self.op_types and not (self.precision == "int8" and self.engine == "onnxruntime"):
            bad("an empty op_types list (every op) applies to ONNX Runtime INT8 recipes only.",
                "list the op types to quantize, e.g. ['MatMul'].")
        if self.precision in ("int4", "nf4") and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            bad(f"block_size {self.block_size} is not a power of two >= 16.", "use 16, 32, 64 or 128.")
        if self.precision == "codebook" and not 2 <= self.codebook_bits <= 8:
            bad(f"codebook_bits {self.codebook_bits} is outside 2..8.", "use 4 (16 centroids) or 8.")
        if self.finetune_steps < 0 or self.finetune_lr <= 0 or self.finetune_batch < 1 or self.finetune_rows < 2:
            bad("finetune_steps must be >= 0, finetune_lr > 0, finetune_batch >= 1 and finetune_rows >= 2.",
                "use e.g. finetune_steps=300, finetune_lr=1e-5, finetune_batch=8, finetune_rows=512.")
        if min(self.refine_rows, self.rounding_rows, self.calibration_batch, self.rounding_iters) < 1:
            bad("refine_rows, rounding_rows, calibration_batch and rounding_iters must be at least 1.",
                "use e.g. refine_rows=128, rounding_rows=32, calibration_batch=16, rounding_iters=200.")
        if not 90.0 <= self.percentile < 100.0:
            bad(f"percentile {self.percentile} is outside [90, 100).", "use e.g. 99.99 or 99.999.")
        if isinstance(self.smooth_quant_alpha, (int, float)) and not 0.0 < self.smooth_quant_alpha < 1.0:
            bad(f"smooth_quant_alpha {self.smooth_quant_alpha} is outside (0, 1).", "use 0.5 (the paper's default).")
        if self.smooth_quant_alpha is not None and self.mode not in ("static", "dynamic", "auto"):
            bad("SmoothQuant migrates activation outliers into weights before activation quantization; it does "
                "nothing for a weight-only recipe.",
                "set mode='static' or 'dynamic', or drop smooth_quant_alpha.")
        if self.activation_granularity == "per-block" and not (
                self.model_kind == "causal_lm" and self.precision == "int8" and self.engine == "onnxruntime"):
            bad("per-block activations are the 8-bit MatMulNBits path of decoder W8A8 targets (ONNX Runtime).",
                "drop activation_granularity, or use llm_w8a8_sq.")
        if self.tensor_overrides is not None and not (self.model_kind == "causal_lm" and self.precision == "int4"
                                                      and self.engine == "onnxruntime"):
            bad("tensor_overrides (8-bit layers from `qops sensitivity`) apply to the ONNX INT4 decoder targets.",
                "drop tensor_overrides, or use an llm_int4_* target.")
        if self.embedding_granularity == "per-row" and self.precision != "int8":
            bad("per-row embedding quantization is an INT8 technique.", "drop embedding_granularity.")
        if self.lm_head == "nf4" and self.precision != "nf4" or self.lm_head == "int4" and self.precision == "nf4":
            bad(f"lm_head {self.lm_head!r} does not fit precision {self.precision!r}.",
                "use lm_head int8 or fp32, or the recipe's own 4-bit format.")
        if self.precision == "nf4" and self.engine not in ("onnxruntime", "bitsandbytes"):
            bad("NF4 is written as ONNX MatMulBnb4 (engine onnxruntime) or as a Transformers folder quantized by "
                "bitsandbytes (engine bitsandbytes).", "set engine='onnxruntime' or 'bitsandbytes'.")
        if self.engine == "bitsandbytes" and (self.model_kind != "causal_lm" or self.precision not in ("nf4", "int8")
                                              or self.mode != "weight_only"):
            bad("the bitsandbytes engine loads decoder LLMs in NF4 or LLM.int8() weights (model_kind causal_lm, "
                "mode weight_only).", "use precision nf4 or int8, mode weight_only, model_kind causal_lm.")
        if self.engine == "llama.cpp" and (self.model_kind != "causal_lm" or self.gguf_type is None
                                           or self.mode != "weight_only"):
            bad("the llama.cpp engine writes decoder LLMs as GGUF (model_kind causal_lm, mode weight_only, a "
                "gguf_type).", "use a gguf_* target (qops targets), or set gguf_type to Q8_0, Q4_K_M or Q4_0.")
        if self.gguf_type is not None and self.engine != "llama.cpp":
            bad(f"gguf_type {self.gguf_type!r} is a llama.cpp file type.", "drop gguf_type, or use a gguf_* target.")
        if self.kv_cache_type != "f16" and self.engine != "llama.cpp":
            bad("kv_cache_type is an option of llama.cpp targets (ONNX Runtime and PyTorch keep the KV cache in the "
                "model's dtype).", "drop kv_cache_type, or use a gguf_* target.")
        if self.algorithm in ("hqq", "k_quant") and self.model_kind != "causal_lm":
            bad(f"algorithm {self.algorithm!r} is served for decoder LLM targets (model_kind causal_lm).",
                "use rtn or gptq, or an llm_* target.")
        if self.engine == "torchao" and self.torch_method is None:
            bad("a torchao recipe needs torch_method.", "set torch_method, e.g. 'pt2e_x86_inductor'.")
        if self.engine == "compressed-tensors" and (self.model_kind != "causal_lm" or (self.precision, self.mode) not in (
                ("int4", "weight_only"), ("int8", "dynamic"), ("fp8", "dynamic"))):
            bad("the compressed-tensors engine writes decoder LLMs as W4A16 (int4, weight_only), W8A8 (int8, "
                "dynamic) or FP8 dynamic (fp8, dynamic).", "use a ct_* target (qops targets).")
        if self.engine == "compressed-tensors" and self.algorithm not in ("rtn", "gptq", "awq"):
            bad(f"algorithm {self.algorithm!r} is not one qops runs for compressed-tensors.", "use gptq, awq or rtn.")
        if self.engine == "compressed-tensors" and self.precision == "fp8" and self.algorithm != "rtn":
            bad("FP8 dynamic rounds weights to the e4m3 grid (no GPTQ/AWQ search in qops).", "use algorithm rtn.")
        if self.engine == "onnxruntime" and self.precision == "fp8":
            bad("FP8 is served through torchao on Hopper GPUs in qops.", "set engine='torchao', "
                "torch_method='float8_dynamic'.")
        if self.device == "cuda" and self.queue != "gpu":
            bad("a CUDA recipe must run on the 'gpu' worker queue.", "set queue='gpu'.")

    @property
    def needs_calibration(self) -> bool:
        if self.model_kind == "causal_lm":
            if self.engine == "llama.cpp":
                return self.imatrix
            if self.engine == "compressed-tensors":
                return self.algorithm in ("gptq", "awq") or self.smooth_quant_alpha is not None
            return self.algorithm in ("gptq", "awq") and self.precision == "int4" \
                or self.smooth_quant_alpha is not None
        if self.engine == "torchao":
            return self.torch_method == "pt2e_x86_inductor"
        return self.mode in ("static", "auto") or (self.precision == "int4" and self.algorithm in ("gptq", "awq")) \
            or self.smooth_quant_alpha is not None

    @property
    def granularity(self) -> str:
        if self.engine == "llama.cpp":  # Q8_0/Q4_0 blocks of 32; k-quants: blocks of 32 in super-blocks of 256
            return f"block-wise ({self.block_size})"
        if self.precision in ("int4", "nf4"):
            return f"block-wise ({self.block_size})"
        if self.engine == "bitsandbytes":  # LLM.int8(): rows of weights, outlier columns kept in 16-bit
            return "per-channel"
        if self.precision == "fp16":
            return "n/a (cast)"
        return "per-channel" if self.per_channel else "per-tensor"

    @property
    def output_suffix(self) -> str:
        if self.model_kind == "causal_lm" and self.engine in ("torchao", "bitsandbytes", "compressed-tensors"):
            return ""  # a checkpoint folder
        if self.engine == "llama.cpp":
            return ".gguf"
        return ".pt2" if self.engine == "torchao" else ".onnx"

    def with_options(self, **options) -> "Recipe":
        """A copy with fields overridden (e.g. from the spec's ``target_options``), re-validated."""
        names = {f.name for f in dataclasses.fields(self)} - {"target", "version"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TargetError(f"Target {self.target!r}: unknown recipe option(s) {unknown}.",
                              f"use recipe fields: {sorted(names)}.")
        hints = field_types()
        options = {k: coerce_option(self.target, k, v, hints[k]) for k, v in options.items()}
        return dataclasses.replace(self, **options)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("op_types", "required_isa", "nodes_to_exclude"):
            d[k] = list(d[k])
        if d["min_compute_capability"] is not None:
            d["min_compute_capability"] = list(d["min_compute_capability"])
        d["granularity"] = self.granularity
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("op_types", "nodes_to_exclude", "required_isa", "min_compute_capability"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def field_types() -> dict:
    """Each recipe field's type (what :func:`coerce_option` validates an override against)."""
    return typing.get_type_hints(Recipe)


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])} (YAML list or comma-separated)"
        return f"a list of {len(args)} " + "/".join(_describe(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


def _prepare(value, tp):
    """What YAML and ``--option`` give, shaped for the field's type: comma-separated strings to lists (never
    split into characters), ``"8.9"`` to ``(8, 9)``, YAML 1.1's ``"1e-5"`` to a float; lists to tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for a in args:
            if a is not type(None) and (typing.get_origin(a) is tuple or a is float):
                return _prepare(value, a)
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if args and args[-1] is Ellipsis else \
                [int(v) if v.strip().lstrip("-").isdigit() else v for v in value.replace(",", ".").split(".") if v]
        return tuple(value) if isinstance(value, list) else value
    if tp is float and isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


@functools.lru_cache(maxsize=None)
def _adapter(tp) -> TypeAdapter:
    return TypeAdapter(tp, config=ConfigDict(strict=True, allow_inf_nan=False))


def coerce_option(target: str, name: str, value, tp):
    """One recipe option checked against its field type by pydantic (strict: no silent casts; finite numbers;
    lists accept YAML lists or comma-separated strings); the error names the option, the type and the fix."""
    try:
        return _adapter(tp).validate_python(_prepare(value, tp))
    except (ValidationError, TypeError, ValueError):
        raise TargetError(f"Target {target!r}: option {name}={value!r} is not {_describe(tp)}.",
                          f"set {name} to {_describe(tp)} (qops targets --json lists every recipe field).") from None
