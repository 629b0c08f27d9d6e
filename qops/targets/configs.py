"""One typed config per engine (the shape of torchao's configs): a frozen pydantic model holding only the options
its engine reads, with a ``VERSION`` checked on load, cross-field checks that say how to fix the input
(:meth:`EngineConfig.problems`), and the facts that follow from the options (calibration need, granularity,
artifact suffix). Configs are registered by engine and model kind with :func:`register_config`; a
:class:`qops.targets.Recipe` pairs one with a :class:`qops.targets.placement.Placement`.

Graph targets (ONNX graphs and ``.pt2`` programs): :class:`OrtConfig`, :class:`TorchaoConfig`. Decoder LLMs
(``model_kind causal_lm``): :class:`OrtDecoderConfig` (ONNX Runtime GenAI folders), :class:`GgufConfig`
(llama.cpp), :class:`CompressedTensorsConfig` (vLLM), :class:`BitsAndBytesConfig` (Transformers + bitsandbytes),
:class:`TorchaoDecoderConfig` (Transformers + torchao on CUDA)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from qops.errors import TargetError

Mode = Literal["static", "dynamic", "auto", "weight_only", "cast"]
QType = Literal["int8", "uint8", "int4", "uint4", "float8e4m3fn"]
Precision = Literal["int8", "fp16", "int4", "codebook", "fp8", "nf4"]
TorchMethod = Literal["pt2e_x86_inductor", "int8_dynamic", "int8_weight_only", "int4_weight_only", "float8_dynamic"]

MODES_BY_PRECISION = {
    "int8": ("static", "dynamic", "auto", "weight_only"),
    "fp16": ("cast",),
    "int4": ("weight_only",),
    "codebook": ("weight_only",),
    "fp8": ("dynamic", "static"),
    "nf4": ("weight_only",),
}

Problems = list[tuple[str, str]]  # (what is wrong, how to fix it)


class EngineConfig(BaseModel):
    """What every engine config has: a precision and a mode (which must fit each other)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    ENGINE: ClassVar[str] = ""
    MODEL_KIND: ClassVar[str] = "any"
    VERSION: ClassVar[int] = 1
    SUFFIX: ClassVar[str] = ""  # the artifact's suffix ("" = a checkpoint folder)

    mode: Mode
    precision: Precision = "int8"

    def problems(self) -> Problems:
        if self.mode not in MODES_BY_PRECISION[self.precision]:
            return [(f"mode {self.mode!r} does not apply to precision {self.precision!r}.",
                     f"use mode one of {list(MODES_BY_PRECISION[self.precision])}.")]
        return []

    @property
    def needs_calibration(self) -> bool:
        return False

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        """The card's one-line method ("static INT8 PTQ (onnxruntime, QDQ)"); ``technique``: what the engine
        recorded at quantize time."""
        return f"{mode} {self.precision.upper()} PTQ ({runtime})"

    def card_facts(self) -> dict:
        """The number formats a model card states, for every engine: an engine's own option where it has one, else
        what its format implies (weight-only formats keep activations in floating point)."""
        weights = {"int8": "int8", "int4": "int4", "nf4": "nf4", "fp8": "float8e4m3fn", "fp16": "float16",
                   "codebook": "uint4"}[self.precision]
        weight_only = self.mode in ("weight_only", "cast")
        return {"weight_type": getattr(self, "weight_type", weights),
                "activation_type": getattr(self, "activation_type", "float" if weight_only else weights),
                "symmetric_weights": getattr(self, "symmetric_weights", True),
                "symmetric_activations": getattr(self, "symmetric_activations", not weight_only),
                "calibration_method": getattr(self, "calibration_method", self.calibration_use)}

    @property
    def calibration_use(self) -> str:
        """What the calibration data is for (error messages, the card)."""
        algorithm = getattr(self, "algorithm", "rtn")
        if algorithm in ("gptq", "awq"):
            return algorithm.upper()
        if getattr(self, "smooth_quant_alpha", None) is not None:
            return "SmoothQuant"
        return "activation ranges"

    @property
    def granularity(self) -> str:
        return "per-channel"


CONFIGS: dict[tuple[str, str], type[EngineConfig]] = {}


def register_config(cls: type[EngineConfig]) -> type[EngineConfig]:
    """Class decorator: register ``cls`` as the config of its ``ENGINE`` for its ``MODEL_KIND``."""
    key = (cls.ENGINE, cls.MODEL_KIND)
    if key in CONFIGS and CONFIGS[key] is not cls:
        raise TargetError(f"Two configs for engine {cls.ENGINE!r} ({cls.MODEL_KIND}): {CONFIGS[key].__name__} and "
                          f"{cls.__name__}.", "register one config class per engine and model kind.")
    CONFIGS[key] = cls
    return cls


def config_class(engine: str, model_kind: str = "any") -> type[EngineConfig]:
    cls = CONFIGS.get((engine, model_kind))
    if cls is None:
        known = sorted(f"{e} ({k})" for e, k in CONFIGS)
        raise TargetError(f"No engine config for engine {engine!r} with model_kind {model_kind!r}.",
                          f"use one of: {', '.join(known)}.")
    return cls


def config_named(name: str) -> type[EngineConfig]:
    for cls in CONFIGS.values():
        if cls.__name__ == name:
            return cls
    raise TargetError(f"Unknown engine config {name!r}.", f"use one of {sorted(c.__name__ for c in CONFIGS.values())}.")


def block_problem(block_size: int) -> Problems:
    if block_size < 16 or block_size & (block_size - 1):
        return [(f"block_size {block_size} is not a power of two >= 16.", "use 16, 32, 64 or 128.")]
    return []


def smooth_problems(alpha, mode: str) -> Problems:
    out = []
    if isinstance(alpha, (int, float)) and not 0.0 < alpha < 1.0:
        out.append((f"smooth_quant_alpha {alpha} is outside (0, 1).", "use 0.5 (the paper's default)."))
    if alpha is not None and mode not in ("static", "dynamic", "auto"):
        out.append(("SmoothQuant migrates activation outliers into weights before activation quantization; it does "
                    "nothing for a weight-only recipe.", "set mode='static' or 'dynamic', or drop smooth_quant_alpha."))
    return out


@register_config
class OrtConfig(EngineConfig):
    """ONNX Runtime on ONNX graphs: static/dynamic INT8 (QDQ or QOperator), FP16 casts, INT4 weight-only
    (MatMulNBits: RTN, GPTQ, AWQ), codebooks; plus qops' graph techniques (equalization, bias correction, learned
    rounding, fine-tuning of the QDQ graph)."""

    ENGINE: ClassVar[str] = "onnxruntime"
    SUFFIX: ClassVar[str] = ".onnx"

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
    # activation ranges searched per scale by the model's output error (qops.quantize.rangesearch) on refine_rows
    # rows, after bias correction: "auto" = on for convolutional graphs; range_sweeps passes over the scales
    range_search: Literal["auto", "on", "off"] = "auto"
    range_sweeps: int = 1
    # block reconstruction (qops.quantize.blockrec, BRECQ): 0 iterations per block = off
    block_iters: int = 0
    block_rows: int = 128  # calibration rows the blocks are fitted on (held in memory, one block at a time)
    block_rounding: Literal["ste", "adaround"] = "ste"
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
    algorithm: Literal["rtn", "gptq", "awq"] = "rtn"
    block_size: int = 128
    embedding_block_size: int | None = None  # INT4 embedding tables (GatherBlockQuantized); None: block_size
    # weight-only INT4: the precision of the layers kept out of it (nodes_to_exclude; the tuner's fallback)
    fallback_precision: Literal["int8", "fp32"] = "int8"  # int8: dynamic INT8 per channel (MatMulInteger)
    accuracy_level: int | None = 4  # MatMulNBits compute type: 4 = int8 activations (fast on CPUs)
    # non-uniform (codebook) weights
    codebook: Literal["kmeans", "pow2"] = "kmeans"
    codebook_bits: int = 4

    def problems(self) -> Problems:
        out = super().problems()
        if self.precision == "int8" and self.mode == "dynamic" and self.activation_type != "uint8":
            out.append((f"ONNX Runtime dynamic quantization computes activations as uint8 only, not "
                        f"{self.activation_type}.", "set activation_type='uint8' for a dynamic recipe."))
        if self.precision == "int8" and self.weight_type not in ("int8", "uint8"):
            out.append((f"INT8 recipes take int8/uint8 weights, not {self.weight_type}.", "set weight_type='int8'."))
        if self.quant_format == "QOperator" and self.mode == "static" and self.activation_type == "int8":
            out.append(("QOperator format with int8 activations is not supported by the CPU EP.",
                        "use quant_format='QDQ' or activation_type='uint8'."))
        if not self.op_types and self.precision != "int8":
            out.append(("an empty op_types list (every op) applies to ONNX Runtime INT8 recipes only.",
                        "list the op types to quantize, e.g. ['MatMul']."))
        if self.precision == "int4":
            out += block_problem(self.block_size)
        if self.precision == "codebook" and not 2 <= self.codebook_bits <= 8:
            out.append((f"codebook_bits {self.codebook_bits} is outside 2..8.", "use 4 (16 centroids) or 8."))
        if self.precision == "fp8":
            out.append(("FP8 is served through torchao on Hopper GPUs in qops.",
                        "use a torchao target (nvidia_hopper_fp8)."))
        if self.precision == "nf4":
            out.append(("NF4 on ONNX graphs is a decoder-LLM format in qops (MatMulBnb4).",
                        "use llm_nf4 or hf_bnb_nf4 for decoders, int4_weight_only for graphs."))
        if self.finetune_steps < 0 or self.finetune_lr <= 0 or self.finetune_batch < 1 or self.finetune_rows < 2:
            out.append(("finetune_steps must be >= 0, finetune_lr > 0, finetune_batch >= 1 and finetune_rows >= 2.",
                        "use e.g. finetune_steps=300, finetune_lr=1e-5, finetune_batch=8, finetune_rows=512."))
        if self.block_iters < 0 or self.block_rows < 2:
            out.append(("block_iters must be >= 0 and block_rows >= 2.", "use e.g. block_iters=300, block_rows=128."))
        if self.range_sweeps < 1:
            out.append(("range_sweeps must be at least 1.", "use range_sweeps=1, or range_search=off."))
        if min(self.refine_rows, self.rounding_rows, self.calibration_batch, self.rounding_iters) < 1:
            out.append(("refine_rows, rounding_rows, calibration_batch and rounding_iters must be at least 1.",
                        "use e.g. refine_rows=128, rounding_rows=32, calibration_batch=16, rounding_iters=200."))
        if not 90.0 <= self.percentile < 100.0:
            out.append((f"percentile {self.percentile} is outside [90, 100).", "use e.g. 99.99 or 99.999."))
        if self.embedding_granularity == "per-row" and self.precision != "int8":
            out.append(("per-row embedding quantization is an INT8 technique.", "drop embedding_granularity."))
        return out + smooth_problems(self.smooth_quant_alpha, self.mode)

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        what = {"int8": f"{mode} INT8 PTQ", "fp16": "FP16 cast",
                "int4": f"INT4 weight-only ({self.algorithm.upper()}, block {self.block_size})",
                "codebook": f"non-uniform {self.codebook} codebook ({self.codebook_bits}-bit indices)"}
        fmt = f", {self.quant_format}" if self.precision == "int8" and mode == "static" else ""
        return f"{what.get(self.precision, mode)} ({runtime}{fmt})"

    @property
    def needs_calibration(self) -> bool:
        return self.mode in ("static", "auto") or (self.precision == "int4" and self.algorithm in ("gptq", "awq")) \
            or self.smooth_quant_alpha is not None

    @property
    def granularity(self) -> str:
        if self.precision == "int4":
            return f"block-wise ({self.block_size})"
        if self.precision == "fp16":
            return "n/a (cast)"
        return "per-channel" if self.per_channel else "per-tensor"


@register_config
class TorchaoConfig(EngineConfig):
    """torchao on a graph model, written as a ``.pt2`` program: PT2E static INT8 with the X86 Inductor quantizer,
    or ``quantize_`` with one of torchao's configs (:func:`qops.quantize.torch_engine.torchao_config`)."""

    ENGINE: ClassVar[str] = "torchao"
    SUFFIX: ClassVar[str] = ".pt2"

    torch_method: TorchMethod
    torch_compile: bool = True
    reduce_range: bool = False  # PT2E: 7-bit activations for CPUs without VNNI
    block_size: int = 128  # int4_weight_only: the group size

    def method(self, mode: str, technique: dict, runtime: str) -> str:
        what = {"int8": f"{mode} INT8 PTQ", "int4": f"INT4 weight-only (RTN, block {self.block_size})",
                "fp8": f"FP8 {mode} ({self.torch_method})"}
        return f"{what.get(self.precision, mode)} ({runtime})"

    @property
    def needs_calibration(self) -> bool:
        return self.torch_method == "pt2e_x86_inductor"

    @property
    def calibration_use(self) -> str:
        return "PT2E observers"

    @property
    def granularity(self) -> str:
        return f"block-wise ({self.block_size})" if self.precision == "int4" else "per-channel"
