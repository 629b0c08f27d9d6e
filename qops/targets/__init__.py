"""Hardware-target registry.

A target is a named recipe: what to quantize to, how, and for which runtime and worker queue.
Recipes are plain frozen dataclasses validated in ``__post_init__``; each target is registered by a
function (decorator :func:`register_target`) and can also come from the ``qops.targets`` entry-point
group, so users add their own without patching qops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Literal

from qops.errors import TargetError

Mode = Literal["static", "dynamic"]
QType = Literal["int8", "uint8"]


@dataclass(frozen=True)
class Recipe:
    """How to quantize for one hardware target (ONNX Runtime engine)."""

    target: str
    description: str
    hardware: str
    mode: Mode
    weight_type: QType = "int8"
    activation_type: QType = "uint8"
    per_channel: bool = True
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    quant_format: Literal["QDQ", "QOperator"] = "QDQ"
    calibration_method: Literal["minmax", "entropy", "percentile", "distribution"] = "minmax"
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    runtime: str = "onnxruntime"
    execution_provider: str = "CPUExecutionProvider"
    queue: Literal["cpu", "gpu"] = "cpu"
    precision: str = "int8"
    arch: str | None = "x86_64"  # platform.machine() of the target hardware
    required_isa: tuple[str, ...] = ()  # CPU flags the recipe assumes (for the "not on target hardware" note)
    version: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode == "dynamic" and self.activation_type != "uint8":
            raise TargetError(
                f"Target {self.target!r}: ONNX Runtime dynamic quantization computes activations as uint8 "
                f"only, not {self.activation_type}.",
                "set activation_type='uint8' for a dynamic recipe.",
            )
        if self.quant_format == "QOperator" and self.mode == "static" and self.activation_type == "int8":
            raise TargetError(
                f"Target {self.target!r}: QOperator format with int8 activations is not supported by the CPU EP.",
                "use quant_format='QDQ' or activation_type='uint8'.",
            )

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static"

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["op_types"] = list(self.op_types)
        d["required_isa"] = list(self.required_isa)
        d["granularity"] = self.granularity
        return d


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


def get_target(name: str) -> Recipe:
    _load_entry_points()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise TargetError(
            f"Unknown hardware target {name!r}.",
            f"use one of: {known} (run `qops targets`), or register your own with "
            "qops.targets.register_target / the 'qops.targets' entry-point group.",
        )
    recipe = _REGISTRY[name]()
    if recipe.target != name:
        raise TargetError(f"Target function for {name!r} returned a recipe named {recipe.target!r}.",
                          "make the recipe's target field match its registered name.")
    return recipe


@register_target("x86_64_vnni_int8")
def _x86_vnni() -> Recipe:
    return Recipe(
        target="x86_64_vnni_int8",
        description="x86-64 CPUs with AVX512-VNNI/AMX: static INT8 QDQ, u8 activations x s8 per-channel weights.",
        hardware="x86-64 AVX512-VNNI / AMX (Intel Cascade Lake+, AMD Zen 4+)",
        mode="static",
        weight_type="int8",
        activation_type="uint8",
        per_channel=True,
        calibration_method="minmax",
        required_isa=("avx512_vnni",),
    )


@register_target("x86_64_int8_dynamic")
def _x86_dynamic() -> Recipe:
    return Recipe(
        target="x86_64_int8_dynamic",
        description="Any x86-64 CPU: dynamic INT8 (weights quantized offline, activations at run time); "
        "suited to transformer-like and recurrent graphs, needs no calibration.",
        hardware="x86-64 (AVX2 or better)",
        mode="dynamic",
        weight_type="int8",
        activation_type="uint8",
        per_channel=True,
        op_types=("MatMul", "Gemm", "Attention", "LSTM", "GRU"),
    )


@register_target("arm64_int8")
def _arm64() -> Recipe:
    return Recipe(
        target="arm64_int8",
        description="ARM64 CPUs (NEON/XNNPACK-friendly): static INT8 QDQ, symmetric s8 activations and "
        "per-channel symmetric s8 weights.",
        hardware="ARM64 (NEON dot-product, e.g. Graviton, Ampere, Apple M)",
        mode="static",
        weight_type="int8",
        activation_type="int8",
        per_channel=True,
        symmetric_activations=True,
        calibration_method="minmax",
        arch="aarch64",
    )
