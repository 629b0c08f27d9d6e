"""Hardware-target registry.

A target is a named recipe: what to quantize to, how, and for which runtime, execution provider and
worker queue. Recipes are plain frozen dataclasses validated in ``__post_init__`` with messages that say
how to fix the input (the shape of torchao's configs); each target is registered by a function (decorator
:func:`register_target`) and can also come from the ``qops.targets`` entry-point group, so users add their
own without patching qops. A spec can override any recipe field per target (``target_options``) through
:meth:`Recipe.with_options`, which re-validates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Literal

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
    engine: Literal["onnxruntime", "torchao"] = "onnxruntime"
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
    model_kind: Literal["any", "causal_lm"] = "any"  # causal_lm: only for decoder LLM pipelines
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
        if self.embedding_granularity == "per-row" and self.precision != "int8":
            bad("per-row embedding quantization is an INT8 technique.", "drop embedding_granularity.")
        if self.lm_head == "nf4" and self.precision != "nf4" or self.lm_head == "int4" and self.precision == "nf4":
            bad(f"lm_head {self.lm_head!r} does not fit precision {self.precision!r}.",
                "use lm_head int8 or fp32, or the recipe's own 4-bit format.")
        if self.precision == "nf4" and self.engine != "onnxruntime":
            bad("NF4 targets are written as ONNX MatMulBnb4 in qops.", "set engine='onnxruntime'.")
        if self.algorithm in ("hqq", "k_quant") and self.model_kind != "causal_lm":
            bad(f"algorithm {self.algorithm!r} is served for decoder LLM targets (model_kind causal_lm).",
                "use rtn or gptq, or an llm_* target.")
        if self.engine == "torchao" and self.torch_method is None:
            bad("a torchao recipe needs torch_method.", "set torch_method, e.g. 'pt2e_x86_inductor'.")
        if self.engine == "onnxruntime" and self.precision == "fp8":
            bad("FP8 is served through torchao on Hopper GPUs in qops.", "set engine='torchao', "
                "torch_method='float8_dynamic'.")
        if self.device == "cuda" and self.queue != "gpu":
            bad("a CUDA recipe must run on the 'gpu' worker queue.", "set queue='gpu'.")

    @property
    def needs_calibration(self) -> bool:
        if self.model_kind == "causal_lm":
            return self.algorithm == "gptq" and self.precision == "int4"
        if self.engine == "torchao":
            return self.torch_method == "pt2e_x86_inductor"
        return self.mode in ("static", "auto") or (self.precision == "int4" and self.algorithm in ("gptq", "awq")) \
            or self.smooth_quant_alpha is not None

    @property
    def granularity(self) -> str:
        if self.precision in ("int4", "nf4"):
            return f"block-wise ({self.block_size})"
        if self.precision == "fp16":
            return "n/a (cast)"
        return "per-channel" if self.per_channel else "per-tensor"

    @property
    def output_suffix(self) -> str:
        if self.model_kind == "causal_lm" and self.engine == "torchao":
            return ""  # a checkpoint folder
        return ".pt2" if self.engine == "torchao" else ".onnx"

    def with_options(self, **options) -> "Recipe":
        """A copy with fields overridden (e.g. from the spec's ``target_options``), re-validated."""
        names = {f.name for f in dataclasses.fields(self)} - {"target", "version"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TargetError(f"Target {self.target!r}: unknown recipe option(s) {unknown}.",
                              f"use recipe fields: {sorted(names)}.")
        hints = _field_types()
        options = {k: _coerce(self.target, k, v, hints[k]) for k, v in options.items()}
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


def _field_types() -> dict:
    import typing

    return typing.get_type_hints(Recipe)


def _describe(tp) -> str:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])} (YAML list or comma-separated)"
        return f"a list of {len(args)} " + "/".join(_describe(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


def _coerce(target: str, name: str, value, tp):
    """Check one recipe option against its field type; lists accept YAML lists or comma-separated strings."""
    import typing

    def bad():
        raise TargetError(f"Target {target!r}: option {name}={value!r} is not {_describe(tp)}.",
                          f"set {name} to {_describe(tp)} (qops targets --json lists every recipe field).")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(target, name, value, a)
            except TargetError:
                continue
        bad()
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        bad()
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if args and args[-1] is Ellipsis else \
                [v for v in value.replace(",", ".").split(".") if v]
        if not isinstance(value, (list, tuple)):
            bad()
        if args and args[-1] is Ellipsis:
            try:
                return tuple(_coerce(target, name, v, args[0]) for v in value)
            except TargetError:
                bad()
        if len(value) != len(args):
            bad()
        out = []
        for v, a in zip(value, args):
            if a is int and isinstance(v, str) and v.strip().lstrip("-").isdigit():
                v = int(v)
            out.append(_coerce(target, name, v, a))
        return tuple(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string, in specs and --option alike
            try:
                f = float(value.strip())
            except ValueError:
                bad()
            if math.isfinite(f):
                return f
        bad()
    if tp is str:
        if isinstance(value, str):
            return value
        bad()
    if tp is dict:
        if isinstance(value, dict):
            return value
        bad()
    return value


_REGISTRY: dict[str, Callable[[], Recipe]] = {}
_ENTRY_POINTS_LOADED = False


def register_target(name: str) -> Callable[[Callable[[], Recipe]], Callable[[], Recipe]]:
    """Decorator: register a function returning the :class:`Recipe` of target ``name``."""

    def deco(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="qops.targets"):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def list_targets() -> dict[str, Recipe]:
    _load_entry_points()
    return {name: fn() for name, fn in sorted(_REGISTRY.items())}


def get_target(name: str, options: dict | None = None) -> Recipe:
    """The recipe of target ``name``, with ``options`` (recipe fields) overridden when given."""
    _load_entry_points()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise TargetError(
            f"Unknown hardware target {name!r}.",
            f"use one of: {known} (run `qops targets`), or register your own with "
            "qops.targets.register_target / the 'qops.targets' entry-point group.",
        )
    recipe = _REGISTRY[name]()
    if not isinstance(recipe, Recipe) or recipe.target != name:
        raise TargetError(f"Target function for {name!r} returned {getattr(recipe, 'target', recipe)!r}, "
                          "not a Recipe of that name.", "make the function return Recipe(target=<its name>, ...).")
    return recipe.with_options(**options) if options else recipe


@register_target("x86_64_vnni_int8")
def _x86_vnni() -> Recipe:
    return Recipe(
        target="x86_64_vnni_int8",
        description="x86-64 CPUs with AVX512-VNNI/AMX: INT8 QDQ, u8 activations x s8 per-channel weights; "
        "static (calibrated) for convolutional and MLP graphs, dynamic for attention/recurrent graphs.",
        hardware="x86-64 AVX512-VNNI / AMX (Intel Cascade Lake+, Sapphire Rapids+, AMD Zen 4+)",
        mode="auto",
        required_isa=("avx512_vnni",),
    )


@register_target("x86_64_avx2_int8")
def _x86_avx2() -> Recipe:
    return Recipe(
        target="x86_64_avx2_int8",
        description="x86-64 CPUs with AVX2 but no VNNI: INT8 with 7-bit weights (reduce_range) so that "
        "u8 x s8 multiply-adds (vpmaddubsw) cannot saturate; static or dynamic by graph structure.",
        hardware="x86-64 AVX2 without VNNI (Intel Haswell..Skylake, AMD Zen 1-3)",
        mode="auto",
        reduce_range=True,
        required_isa=("avx2",),
    )


@register_target("x86_64_int8_dynamic")
def _x86_dynamic() -> Recipe:
    return Recipe(
        target="x86_64_int8_dynamic",
        description="Any x86-64 CPU: dynamic INT8 (weights quantized offline, activations at run time); "
        "suited to transformer-like and recurrent graphs, needs no calibration.",
        hardware="x86-64 (AVX2 or better)",
        mode="dynamic",
        op_types=("MatMul", "Gemm", "Gather", "Attention", "LSTM", "GRU"),
    )


@register_target("arm64_int8")
def _arm64() -> Recipe:
    return Recipe(
        target="arm64_int8",
        description="ARM64 CPUs (NEON/XNNPACK-friendly): static INT8 QDQ, symmetric s8 activations and "
        "per-channel symmetric s8 weights.",
        hardware="ARM64 (NEON dot-product, e.g. Graviton, Ampere, Apple M)",
        mode="static",
        activation_type="int8",
        symmetric_activations=True,
        arch="aarch64",
        required_isa=("asimddp",),
    )


@register_target("int4_weight_only")
def _int4() -> Recipe:
    return Recipe(
        target="int4_weight_only",
        description="Any CPU or GPU with ONNX Runtime >= 1.17: INT4 block-wise weights (MatMulNBits, block 128, "
        "RTN or GPTQ), activations FP32 (int8 compute where accuracy_level=4). For large MatMul-heavy models.",
        hardware="any (ONNX Runtime MatMulNBits kernels: x86-64, ARM64, CUDA)",
        mode="weight_only",
        precision="int4",
        weight_type="int4",
        op_types=("MatMul", "Gather"),  # Gather: embedding tables (GatherBlockQuantized)
        quant_format="QOperator",
        arch=None,
    )


@register_target("codebook_4bit")
def _codebook() -> Recipe:
    return Recipe(
        target="codebook_4bit",
        description="Non-uniform weights: a 16-entry codebook per weight (k-means, or powers of two with "
        "codebook='pow2'), stored as 4-bit indices. Saves size (~7-8x), NOT time: weights are decoded to FP32 "
        "at run time.",
        hardware="any (size-oriented: storage, download, edge flash)",
        mode="weight_only",
        precision="codebook",
        weight_type="uint4",
        op_types=("MatMul", "Gemm", "Conv", "Gather"),
        arch=None,
    )


@register_target("nvidia_fp16")
def _nvidia_fp16() -> Recipe:
    return Recipe(
        target="nvidia_fp16",
        description="NVIDIA GPUs: FP16 weights and activations (inputs and outputs stay FP32), ONNX Runtime "
        "CUDA execution provider.",
        hardware="NVIDIA GPU, compute capability >= 7.0 (Volta+)",
        mode="cast",
        precision="fp16",
        execution_provider="CUDAExecutionProvider",
        runtime="onnxruntime-gpu",
        device="cuda",
        min_compute_capability=(7, 0),
        queue="gpu",
        arch=None,
    )


@register_target("nvidia_tensorrt_int8")
def _nvidia_trt() -> Recipe:
    return Recipe(
        target="nvidia_tensorrt_int8",
        description="NVIDIA TensorRT INT8: explicit-quantization QDQ model, symmetric s8 activations and "
        "per-channel symmetric s8 weights (TensorRT requires zero point 0), static calibration.",
        hardware="NVIDIA GPU with INT8 tensor cores (Turing+), TensorRT >= 8.6",
        mode="static",
        activation_type="int8",
        symmetric_activations=True,
        calibration_method="minmax",
        op_types=("MatMul", "Gemm", "Conv"),
        execution_provider="TensorrtExecutionProvider",
        runtime="onnxruntime-gpu with TensorRT",
        device="cuda",
        min_compute_capability=(7, 5),
        queue="gpu",
        arch=None,
    )


@register_target("nvidia_hopper_fp8")
def _nvidia_fp8() -> Recipe:
    return Recipe(
        target="nvidia_hopper_fp8",
        description="NVIDIA Hopper/Ada FP8 (e4m3): torchao Float8DynamicActivationFloat8WeightConfig, per-row "
        "scales, FP8 tensor-core matmuls (torch._scaled_mm); PyTorch serving.",
        hardware="NVIDIA H100/H200 (sm_90) or Ada (sm_89)",
        mode="dynamic",
        precision="fp8",
        engine="torchao",
        torch_method="float8_dynamic",
        weight_type="float8e4m3fn",
        activation_type="float8e4m3fn",
        symmetric_activations=True,
        op_types=("Linear",),
        runtime="torch+torchao",
        execution_provider="CUDA",
        device="cuda",
        min_compute_capability=(8, 9),
        queue="gpu",
        arch=None,
    )


@register_target("torch_x86_int8")
def _torch_x86() -> Recipe:
    return Recipe(
        target="torch_x86_int8",
        description="PyTorch serving on x86-64: static INT8 via torchao PT2E with the X86 Inductor quantizer "
        "(u8 activations, s8 per-channel weights), run through torch.compile (Inductor, oneDNN).",
        hardware="x86-64 AVX512-VNNI / AMX (oneDNN)",
        mode="static",
        engine="torchao",
        torch_method="pt2e_x86_inductor",
        op_types=("Linear", "Conv2d"),
        runtime="torch+torchao",
        execution_provider="Inductor",
        required_isa=("avx512_vnni",),
    )


@register_target("torch_int8_dynamic")
def _torch_dyn() -> Recipe:
    return Recipe(
        target="torch_int8_dynamic",
        description="PyTorch serving: torchao quantize_ with Int8DynamicActivationInt8WeightConfig (dynamic "
        "per-token activations, per-channel weights), CPU or CUDA. On x86 CPUs without VNNI/AMX oneDNN's u8 x s8 "
        "kernels can saturate (measured: 11 dB output SQNR vs 47 dB with VNNI on an MLP): gate on fidelity.",
        hardware="x86-64 / ARM64 CPU or NVIDIA GPU",
        mode="dynamic",
        engine="torchao",
        torch_method="int8_dynamic",
        activation_type="int8",
        op_types=("Linear",),
        runtime="torch+torchao",
        execution_provider="Inductor",
        arch=None,
    )


# ---- decoder LLMs (data.kind causal_lm, docs/llm.md) ----------------------------------------------------------------

def _llm_int4(name: str, algorithm: str, what: str) -> Recipe:
    return Recipe(
        target=name,
        description=f"Decoder LLMs on CPUs: INT4 weight-only MatMulNBits ({what}), block 32, accuracy_level 4 "
        "(int8 compute), lm_head 8-bit, embeddings 4-bit GatherBlockQuantized; ONNX Runtime (GenAI-compatible "
        "folder).",
        hardware="x86-64 / ARM64 CPUs (ONNX Runtime MatMulNBits kernels)",
        mode="weight_only", precision="int4", weight_type="int4", algorithm=algorithm, block_size=32,
        op_types=("MatMul", "Gather"), quant_format="QOperator", model_kind="causal_lm", arch=None,
    )


@register_target("llm_int4_rtn")
def _llm_rtn() -> Recipe:
    return _llm_int4("llm_int4_rtn", "rtn", "round-to-nearest, symmetric")


@register_target("llm_int4_gptq")
def _llm_gptq() -> Recipe:
    return _llm_int4("llm_int4_gptq", "gptq", "GPTQ on calibration windows with the KV-cache inputs")


@register_target("llm_int4_hqq")
def _llm_hqq() -> Recipe:
    return _llm_int4("llm_int4_hqq", "hqq", "HQQ, calibration-free half-quadratic zero points and scales")


@register_target("llm_int4_kquant")
def _llm_kquant() -> Recipe:
    return _llm_int4("llm_int4_kquant", "k_quant", "k-quant, llama.cpp-style scale search")


@register_target("llm_nf4")
def _llm_nf4() -> Recipe:
    return Recipe(
        target="llm_nf4",
        description="Decoder LLMs: NF4 (the bitsandbytes/QLoRA 4-bit NormalFloat code) as ONNX MatMulBnb4, block 64, "
        "FP32 absmax per block (no double quantization in this format), lm_head 8-bit; ONNX Runtime CPU or CUDA.",
        hardware="any (ONNX Runtime MatMulBnb4 kernels: CPU, CUDA)",
        mode="weight_only", precision="nf4", weight_type="uint4", block_size=64, op_types=("MatMul",),
        quant_format="QOperator", model_kind="causal_lm", arch=None,
    )


@register_target("llm_gpu_int4")
def _llm_gpu_int4() -> Recipe:
    return Recipe(
        target="llm_gpu_int4",
        description="Decoder LLMs on NVIDIA GPUs: torchao Int4WeightOnlyConfig (group 128) on the BF16 checkpoint, "
        "PyTorch serving (transformers TorchAoConfig).",
        hardware="NVIDIA GPU, compute capability >= 8.0 (Ampere+)",
        mode="weight_only", precision="int4", weight_type="int4", engine="torchao", torch_method="int4_weight_only",
        block_size=128, op_types=("Linear",), lm_head="int8", runtime="torch+torchao", execution_provider="CUDA",
        device="cuda", min_compute_capability=(8, 0), queue="gpu", model_kind="causal_lm", arch=None,
    )


@register_target("llm_gpu_fp8")
def _llm_gpu_fp8() -> Recipe:
    return Recipe(
        target="llm_gpu_fp8",
        description="Decoder LLMs on Hopper/Ada: torchao Float8DynamicActivationFloat8WeightConfig (per-row "
        "scales, e4m3) on the BF16 checkpoint, PyTorch serving.",
        hardware="NVIDIA H100/H200 (sm_90) or Ada (sm_89)",
        mode="dynamic", precision="fp8", engine="torchao", torch_method="float8_dynamic",
        weight_type="float8e4m3fn", activation_type="float8e4m3fn", symmetric_activations=True,
        op_types=("Linear",), runtime="torch+torchao", execution_provider="CUDA", device="cuda",
        min_compute_capability=(8, 9), queue="gpu", model_kind="causal_lm", arch=None,
    )
