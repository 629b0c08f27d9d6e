"""CPU targets served by ONNX Runtime: x86-64 (VNNI, AVX2, dynamic), ARM64, INT4 weight-only, codebooks."""

from __future__ import annotations

from qops.targets.configs import OrtConfig
from qops.targets.placement import Placement
from qops.targets.recipe import Recipe
from qops.targets.registry import register_target


@register_target("x86_64_vnni_int8")
def _x86_vnni() -> Recipe:
    return Recipe(
        target="x86_64_vnni_int8",
        description="x86-64 CPUs with AVX512-VNNI/AMX: INT8 QDQ, u8 activations x s8 per-channel weights; "
        "static (calibrated) for convolutional and MLP graphs, dynamic for attention/recurrent graphs.",
        placement=Placement(hardware="x86-64 AVX512-VNNI / AMX (Intel Cascade Lake+, Sapphire Rapids+, AMD Zen 4+)",
                            required_isa=("avx512_vnni",)),
        config=OrtConfig(mode="auto"),
    )


@register_target("x86_64_avx2_int8")
def _x86_avx2() -> Recipe:
    return Recipe(
        target="x86_64_avx2_int8",
        description="x86-64 CPUs with AVX2 but no VNNI: INT8 with 7-bit weights (reduce_range) so that "
        "u8 x s8 multiply-adds (vpmaddubsw) cannot saturate; static or dynamic by graph structure.",
        placement=Placement(hardware="x86-64 AVX2 without VNNI (Intel Haswell..Skylake, AMD Zen 1-3)",
                            required_isa=("avx2",)),
        config=OrtConfig(mode="auto", reduce_range=True),
    )


@register_target("x86_64_int8_dynamic")
def _x86_dynamic() -> Recipe:
    return Recipe(
        target="x86_64_int8_dynamic",
        description="Any x86-64 CPU: dynamic INT8 (weights quantized offline, activations at run time); "
        "suited to transformer-like and recurrent graphs, needs no calibration.",
        placement=Placement(hardware="x86-64 (AVX2 or better)"),
        config=OrtConfig(mode="dynamic", op_types=("MatMul", "Gemm", "Gather", "Attention", "LSTM", "GRU")),
    )


@register_target("arm64_int8")
def _arm64() -> Recipe:
    return Recipe(
        target="arm64_int8",
        description="ARM64 CPUs (NEON/XNNPACK-friendly): static INT8 QDQ, symmetric s8 activations and "
        "per-channel symmetric s8 weights.",
        placement=Placement(hardware="ARM64 (NEON dot-product, e.g. Graviton, Ampere, Apple M)", arch="aarch64",
                            required_isa=("asimddp",)),
        config=OrtConfig(mode="static", activation_type="int8", symmetric_activations=True),
    )


@register_target("int4_weight_only")
def _int4() -> Recipe:
    return Recipe(
        target="int4_weight_only",
        description="Any CPU or GPU with ONNX Runtime >= 1.17: INT4 block-wise weights (MatMulNBits, block 128, "
        "RTN or GPTQ), activations FP32 (int8 compute where accuracy_level=4). For large MatMul-heavy models.",
        placement=Placement(hardware="any (ONNX Runtime MatMulNBits kernels: x86-64, ARM64, CUDA)", arch=None),
        config=OrtConfig(mode="weight_only", precision="int4", weight_type="int4", op_types=("MatMul", "Gather"),
                         quant_format="QOperator"),
    )


@register_target("codebook_4bit")
def _codebook() -> Recipe:
    return Recipe(
        target="codebook_4bit",
        description="Non-uniform weights: a 16-entry codebook per weight (k-means, or powers of two with "
        "codebook='pow2'), stored as 4-bit indices. Saves size (~7-8x), NOT time: weights are decoded to FP32 "
        "at run time.",
        placement=Placement(hardware="any (size-oriented: storage, download, edge flash)", arch=None),
        config=OrtConfig(mode="weight_only", precision="codebook", weight_type="uint4",
                         op_types=("MatMul", "Gemm", "Conv", "Gather")),
    )
