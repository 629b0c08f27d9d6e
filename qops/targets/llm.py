"""Decoder-LLM targets (``model_kind: causal_lm``): INT4 (RTN, GPTQ, HQQ, k-quant) and NF4 as ONNX Runtime
GenAI models; NF4 and LLM.int8() as Transformers folders that bitsandbytes loads (the guide's
``BitsAndBytesConfig`` workflow); GGUF (Q8_0, Q4_K_M, Q4_0) for llama.cpp; torchao's INT4/FP8 on CUDA."""

from __future__ import annotations

from qops.targets.llm_configs import (
    BitsAndBytesConfig,
    CompressedTensorsConfig,
    GgufConfig,
    OrtDecoderConfig,
    TorchaoDecoderConfig,
)
from qops.targets.placement import Placement
from qops.targets.recipe import Recipe
from qops.targets.registry import register_target


def _llm_int4(name: str, algorithm: str, what: str, **kw) -> Recipe:
    return Recipe(
        target=name,
        description=f"Decoder LLMs on CPUs: INT4 weight-only MatMulNBits ({what}), block 32, accuracy_level 4 "
        "(int8 compute), lm_head 8-bit, embeddings 8-bit GatherBlockQuantized (a tied model: the lm_head's table, "
        "stored once); ONNX Runtime (GenAI-compatible folder).",
        placement=Placement(hardware="x86-64 / ARM64 CPUs (ONNX Runtime MatMulNBits kernels)", arch=None),
        config=OrtDecoderConfig(mode="weight_only", precision="int4", algorithm=algorithm, block_size=32,
                                op_types=("MatMul", "Gather"), **kw),
    )


@register_target("llm_int4_rtn")
def _llm_rtn() -> Recipe:
    return _llm_int4("llm_int4_rtn", "rtn", "round-to-nearest, symmetric")


@register_target("llm_int4_gptq")
def _llm_gptq() -> Recipe:
    return _llm_int4("llm_int4_gptq", "gptq", "qops' sequential GPTQ on the checkpoint and the calibration windows: "
                     "asymmetric, in activation order, ranges searched for the least rounding error; codes written "
                     "exactly", symmetric_weights=False, act_order=True, clip_search=True)


@register_target("llm_int4_awq")
def _llm_awq() -> Recipe:
    return _llm_int4("llm_int4_awq", "awq", "AWQ: activation-aware per-channel scales and clipping searched on "
                     "calibration windows, then round-to-nearest")


@register_target("llm_int4_hqq")
def _llm_hqq() -> Recipe:
    return _llm_int4("llm_int4_hqq", "hqq", "HQQ, calibration-free half-quadratic zero points and scales")


@register_target("llm_int4_kquant")
def _llm_kquant() -> Recipe:
    return _llm_int4("llm_int4_kquant", "k_quant", "k-quant, llama.cpp-style scale search")


@register_target("llm_w8a8_sq")
def _llm_w8a8() -> Recipe:
    return Recipe(
        target="llm_w8a8_sq",
        description="Decoder LLMs on CPUs: W8A8 — SmoothQuant (alpha 0.5, calibration windows with the KV-cache "
        "inputs), then int8 weights in blocks of 32 and int8 activations quantized per token and block of 32 at run "
        "time (8-bit MatMulNBits, accuracy_level 4: int8 x int8 products), lm_head included, embeddings FP32; "
        "ONNX Runtime (GenAI-compatible folder). activation_granularity per-tensor gives the DynamicQuantizeMatMul "
        "form (one activation scale per tensor), which real decoders' outlier channels defeat.",
        placement=Placement(hardware="x86-64 with AVX-512 VNNI / AMX or AVX2, ARM64 with dot-product (MLAS int8 "
                            "kernels)", arch=None),
        config=OrtDecoderConfig(mode="dynamic", precision="int8", smooth_quant_alpha=0.5,
                                activation_granularity="per-block", block_size=32, op_types=("MatMul",)),
    )


@register_target("llm_nf4")
def _llm_nf4() -> Recipe:
    return Recipe(
        target="llm_nf4",
        description="Decoder LLMs: NF4 (the bitsandbytes/QLoRA 4-bit NormalFloat code) as ONNX MatMulBnb4, block 64, "
        "FP32 absmax per block (no double quantization in this format), lm_head 8-bit; ONNX Runtime CPU or CUDA.",
        placement=Placement(hardware="any (ONNX Runtime MatMulBnb4 kernels: CPU, CUDA)", arch=None),
        config=OrtDecoderConfig(mode="weight_only", precision="nf4", block_size=64, op_types=("MatMul",)),
    )


@register_target("llm_gpu_int4")
def _llm_gpu_int4() -> Recipe:
    return Recipe(
        target="llm_gpu_int4",
        description="Decoder LLMs on NVIDIA GPUs: torchao Int4WeightOnlyConfig (group 128) on the BF16 checkpoint, "
        "PyTorch serving (transformers TorchAoConfig).",
        placement=Placement(hardware="NVIDIA GPU, compute capability >= 8.0 (Ampere+)", runtime="torch+torchao",
                            execution_provider="CUDA", device="cuda", min_compute_capability=(8, 0), queue="gpu",
                            arch=None),
        config=TorchaoDecoderConfig(mode="weight_only", precision="int4", torch_method="int4_weight_only",
                                    block_size=128),
    )


@register_target("llm_gpu_fp8")
def _llm_gpu_fp8() -> Recipe:
    return Recipe(
        target="llm_gpu_fp8",
        description="Decoder LLMs on Hopper/Ada: torchao Float8DynamicActivationFloat8WeightConfig (per-row "
        "scales, e4m3) on the BF16 checkpoint, PyTorch serving.",
        placement=Placement(hardware="NVIDIA H100/H200 (sm_90) or Ada (sm_89)", runtime="torch+torchao",
                            execution_provider="CUDA", device="cuda", min_compute_capability=(8, 9), queue="gpu",
                            arch=None),
        config=TorchaoDecoderConfig(mode="dynamic", precision="fp8", torch_method="float8_dynamic"),
    )


def _hf_bnb(name: str, precision: str, what: str) -> Recipe:
    return Recipe(
        target=name,
        description=f"Decoder LLMs as a Hugging Face Transformers folder quantized by bitsandbytes ({what}); "
        "from_pretrained reloads it from its quantization_config. Compute dtype FP32 on CPU workers; with "
        "device cuda (queue gpu) BF16.",
        placement=Placement(hardware="CPUs (bitsandbytes' CPU backend) or NVIDIA GPUs",
                            runtime="transformers+bitsandbytes", execution_provider="torch", arch=None),
        config=BitsAndBytesConfig(mode="weight_only", precision=precision),
    )


@register_target("hf_bnb_nf4")
def _hf_bnb_nf4() -> Recipe:
    return _hf_bnb("hf_bnb_nf4", "nf4", "NF4 with double quantization, blocks of 64: QLoRA's format")


@register_target("hf_bnb_int8")
def _hf_bnb_int8() -> Recipe:
    return _hf_bnb("hf_bnb_int8", "int8", "LLM.int8(): int8 weights per row, outlier features in 16-bit")


def _gguf(name: str, gguf_type: str, precision: str, what: str) -> Recipe:
    return Recipe(
        target=name,
        description=f"Decoder LLMs as GGUF {gguf_type} for llama.cpp ({what}), converted and quantized by llama.cpp's "
        "own converter and quantizer" + (" with an importance matrix from the calibration set" if gguf_type != "Q8_0"
                                            else "") + "; serve with llama-server or llama-cpp-python. KV cache f16 "
        "(target option kv_cache_type: q8_0).",
        placement=Placement(hardware="x86-64 / ARM64 CPUs (llama.cpp's ggml kernels; the same file runs on llama.cpp's "
                            "GPU backends)",
                            runtime="llama.cpp", execution_provider="llama.cpp CPU", arch=None),
        config=GgufConfig(mode="weight_only", precision=precision, gguf_type=gguf_type, imatrix=gguf_type != "Q8_0"),
    )


@register_target("gguf_q8_0")
def _gguf_q8_0() -> Recipe:
    return _gguf("gguf_q8_0", "Q8_0", "int8", "8-bit blocks of 32 with one FP16 scale")


@register_target("gguf_q4_k_m")
def _gguf_q4_k_m() -> Recipe:
    return _gguf("gguf_q4_k_m", "Q4_K_M", "int4", "4-bit k-quants with 6-bit block scales; attn_v, ffn_down and "
                 "the output in Q6_K where llama.cpp's mix says")


@register_target("gguf_q4_0")
def _gguf_q4_0() -> Recipe:
    return _gguf("gguf_q4_0", "Q4_0", "int4", "4-bit blocks of 32 with one FP16 scale: the floor")


def _ct(name: str, precision: str, mode: str, algorithm: str, what: str, **kw) -> Recipe:
    return Recipe(
        target=name,
        description=f"Decoder LLMs as a compressed-tensors checkpoint for vLLM / SGLang ({what}), written by the "
        "compressed-tensors library from qops' calibrated weights; lm_head kept in the checkpoint's dtype. "
        "Transformers reloads it (on CPU: weights decompressed, activation quantization emulated).",
        placement=Placement(hardware="NVIDIA GPUs under vLLM/SGLang (Marlin / CUTLASS kernels; FP8 compute on "
                            "sm_89+); evaluated here through Transformers", runtime="vllm (compressed-tensors)",
                            execution_provider="torch", arch=None),
        config=CompressedTensorsConfig(mode=mode, precision=precision, algorithm=algorithm, block_size=128, **kw),
    )


@register_target("ct_w4a16_gptq")
def _ct_w4a16_gptq() -> Recipe:
    return _ct("ct_w4a16_gptq", "int4", "weight_only", "gptq", "W4A16: int4 weights in groups of 128 by GPTQ in "
               "activation order with the ranges searched for the least rounding error", act_order=True,
               clip_search=True)


@register_target("ct_w4a16_awq")
def _ct_w4a16_awq() -> Recipe:
    return _ct("ct_w4a16_awq", "int4", "weight_only", "awq", "W4A16: int4 weights in groups of 128 by AWQ")


@register_target("ct_w8a8_int8")
def _ct_w8a8() -> Recipe:
    return _ct("ct_w8a8_int8", "int8", "dynamic", "gptq", "W8A8 INT8: SmoothQuant at the norms and at up -> down, "
               "then GPTQ int8 weights per channel; int8 activations per token at run time; the input sites whose int8 "
               "activations cost the most (measured, a third of the summed KL, at most 10% of the sites) left in "
               "16-bit", smooth_quant_alpha=0.5, smooth_sites="all", activation_fallback=0.33)


@register_target("ct_fp8_dynamic")
def _ct_fp8() -> Recipe:
    return _ct("ct_fp8_dynamic", "fp8", "dynamic", "rtn", "FP8 dynamic: e4m3 weights per channel, e4m3 "
               "activations per token at run time; no calibration")
