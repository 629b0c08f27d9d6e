"""NVIDIA targets (FP16 and INT8 with TensorRT through ONNX Runtime, FP8 on Hopper through torchao) and the
torchao targets that write ``.pt2`` programs."""

from __future__ import annotations

from qops.targets.configs import OrtConfig, TorchaoConfig
from qops.targets.placement import Placement
from qops.targets.recipe import Recipe
from qops.targets.registry import register_target


@register_target("nvidia_fp16")
def _nvidia_fp16() -> Recipe:
    return Recipe(
        target="nvidia_fp16",
        description="NVIDIA GPUs: FP16 weights and activations (inputs and outputs stay FP32), ONNX Runtime "
        "CUDA execution provider.",
        placement=Placement(hardware="NVIDIA GPU, compute capability >= 7.0 (Volta+)",
                            execution_provider="CUDAExecutionProvider", runtime="onnxruntime-gpu", device="cuda",
                            min_compute_capability=(7, 0), queue="gpu", arch=None),
        config=OrtConfig(mode="cast", precision="fp16"),
    )


@register_target("nvidia_tensorrt_int8")
def _nvidia_trt() -> Recipe:
    return Recipe(
        target="nvidia_tensorrt_int8",
        description="NVIDIA TensorRT INT8: explicit-quantization QDQ model, symmetric s8 activations and "
        "per-channel symmetric s8 weights (TensorRT requires zero point 0), static calibration.",
        placement=Placement(hardware="NVIDIA GPU with INT8 tensor cores (Turing+), TensorRT >= 8.6",
                            execution_provider="TensorrtExecutionProvider", runtime="onnxruntime-gpu with TensorRT",
                            device="cuda", min_compute_capability=(7, 5), queue="gpu", arch=None),
        config=OrtConfig(mode="static", activation_type="int8", symmetric_activations=True, calibration_method="minmax",
                         op_types=("MatMul", "Gemm", "Conv")),
    )


@register_target("nvidia_hopper_fp8")
def _nvidia_fp8() -> Recipe:
    return Recipe(
        target="nvidia_hopper_fp8",
        description="NVIDIA Hopper/Ada FP8 (e4m3): torchao Float8DynamicActivationFloat8WeightConfig, per-row "
        "scales, FP8 tensor-core matmuls (torch._scaled_mm); PyTorch serving.",
        placement=Placement(hardware="NVIDIA H100/H200 (sm_90) or Ada (sm_89)", runtime="torch+torchao",
                            execution_provider="CUDA", device="cuda", min_compute_capability=(8, 9), queue="gpu",
                            arch=None),
        config=TorchaoConfig(mode="dynamic", precision="fp8", torch_method="float8_dynamic"),
    )


@register_target("torch_x86_int8")
def _torch_x86() -> Recipe:
    return Recipe(
        target="torch_x86_int8",
        description="PyTorch serving on x86-64: static INT8 via torchao PT2E with the X86 Inductor quantizer "
        "(u8 activations, s8 per-channel weights), run through torch.compile (Inductor, oneDNN).",
        placement=Placement(hardware="x86-64 AVX512-VNNI / AMX (oneDNN)", runtime="torch+torchao",
                            execution_provider="Inductor", required_isa=("avx512_vnni",)),
        config=TorchaoConfig(mode="static", torch_method="pt2e_x86_inductor"),
    )


@register_target("torch_int8_dynamic")
def _torch_dyn() -> Recipe:
    return Recipe(
        target="torch_int8_dynamic",
        description="PyTorch serving: torchao quantize_ with Int8DynamicActivationInt8WeightConfig (dynamic "
        "per-token activations, per-channel weights), CPU or CUDA. On x86 CPUs without VNNI/AMX oneDNN's u8 x s8 "
        "kernels can saturate (measured: 11 dB output SQNR vs 47 dB with VNNI on an MLP): gate on fidelity.",
        placement=Placement(hardware="x86-64 / ARM64 CPU or NVIDIA GPU", runtime="torch+torchao",
                            execution_provider="Inductor", arch=None),
        config=TorchaoConfig(mode="dynamic", torch_method="int8_dynamic"),
    )
