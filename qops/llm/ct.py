"""compressed-tensors checkpoints for vLLM and SGLang: W4A16 (GPTQ or AWQ, groups of 128), W8A8 INT8 (SmoothQuant +
GPTQ, int8 weights per channel, int8 activations per token at run time) and FP8 dynamic (e4m3 weights per channel,
activations per token at run time), written by the ``compressed-tensors`` library from qops' own algorithms
(:mod:`qops.llm.torch_quant`) on the drift-checked calibration windows.

Why not llm-compressor's ``oneshot``: llm-compressor 0.14.0.1 (the newest in the registry) requires
``transformers<=5.17`` and qops pins 5.23 for the rest of its LLM stack; the format itself comes from
``compressed-tensors`` (the library llm-compressor and vLLM use to write and read it): the schemes are its presets
(``W4A16``, ``W8A8``, ``FP8_DYNAMIC``), the layout its ``ModelCompressor`` (``pack-quantized``, ``int-quantized``,
``float-quantized``), ``config.json`` its ``quantization_config``. The folder reloads with
``AutoModelForCausalLM.from_pretrained`` (Transformers' compressed-tensors integration: on CPU the weights are
decompressed and activation quantization is emulated) and serves with ``vllm serve FOLDER``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qops.artifacts import atomic_dir
from qops.errors import QopsError
from qops.llm.bnb import KEEP
from qops.llm.sensitivity import activation_sensitivity
from qops.llm.torch_quant import awq, gptq, group_size_for, rtn, smoothquant
from qops.llm.torch_target import load_torch_target

PRESETS = {"int4": "W4A16", "int8": "W8A8", "fp8": "FP8_DYNAMIC"}
FALLBACK_WINDOWS = 8  # calibration windows the activation-sensitivity pass measures


def _scheme(recipe, group: int | None):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(PRESETS[recipe.precision], ["Linear"])
    if recipe.precision == "int4":
        scheme.weights.group_size = group
    return scheme


def _set_scales(model, scales: dict) -> None:
    """Each quantized module's ``weight_scale`` from the algorithm (FP8: per-channel absmax / 448, as
    compressed-tensors computes it); symmetric, so zero points stay 0."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized

    with torch.no_grad():
        for name, mod in model.named_modules():
            if not is_module_quantized(mod):
                continue
            args = mod.quantization_scheme.weights
            if name in scales:
                s = scales[name]
            else:  # FP8: round-to-nearest on the e4m3 grid with the library's scale
                w = mod.weight
                s, _ = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
            mod.weight_scale.copy_(s.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.zero_()


def quantize_ct_llm(hf_dir: str | os.PathLike, recipe, out_dir: str | os.PathLike, windows=None) -> dict:
    """Quantize the checkpoint at ``hf_dir`` for a compressed-tensors recipe into ``out_dir`` (atomically, with the
    tokenizer); the folder is reloaded once through Transformers, so a checkpoint it cannot load fails here."""
    from importlib.metadata import version

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    if recipe.needs_calibration and not windows:
        raise QopsError(f"Target {recipe.target!r} ({recipe.algorithm.upper()}) needs calibration windows.",
                        "run the calibrate stage first (its set feeds the activation statistics).")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    technique: dict = {}
    bits = {"int4": 4, "int8": 8}.get(recipe.precision)
    group = group_size_for(model, recipe.block_size) if recipe.precision == "int4" else None
    if group is not None and group != recipe.block_size:
        technique["group_size"] = (f"{group} (the recipe's {recipe.block_size} does not divide every layer's input "
                                   f"size; {group} is the largest power of two below it that does)")
    if recipe.smooth_quant_alpha is not None:
        alpha = 0.5 if recipe.smooth_quant_alpha == "auto" else float(recipe.smooth_quant_alpha)
        technique["smoothquant"] = smoothquant(model, windows, alpha, linear_sites=recipe.smooth_sites == "all")
    kept: list[str] = []
    if recipe.activation_fallback and recipe.precision == "int8":
        fallback = activation_sensitivity(model, windows[:FALLBACK_WINDOWS], recipe.activation_fallback)
        technique["activation_fallback"] = fallback
        kept = fallback["kept_modules"]
    skip = ("lm_head", *kept)
    if recipe.algorithm == "awq":
        technique["awq"] = awq(model, windows, bits, group)
    if recipe.precision == "fp8":
        scales = {}
    elif recipe.algorithm == "gptq":
        scales = gptq(model, windows, bits, group, skip=skip, act_order=recipe.act_order, mse=recipe.clip_search)
    else:  # rtn, and AWQ's scaled weights
        scales = rtn(model, bits, group, skip=skip)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": _scheme(recipe, group)},
                                                        ignore=list(skip)))
    _set_scales(model, scales)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
        for name in KEEP:
            if (Path(hf_dir) / name).is_file():
                shutil.copy(Path(hf_dir) / name, Path(tmp) / name)
    load_torch_target(out, recipe.to_dict())
    fmt = getattr(compressor.quantization_config.format, "value", compressor.quantization_config.format)
    what = {"int4": f"W4A16 (int4 weights, groups of {group}, symmetric"
            + (", activation order" if recipe.act_order and recipe.algorithm == "gptq" else "")
            + (", clip search" if recipe.clip_search and recipe.algorithm == "gptq" else "") + ")",
            "int8": "W8A8 (int8 weights per channel, int8 activations per token, dynamic)",
            "fp8": "FP8 dynamic (e4m3 weights per channel, e4m3 activations per token)"}[recipe.precision]
    algo = {"gptq": "GPTQ", "awq": "AWQ + round-to-nearest", "rtn": "round-to-nearest"}[recipe.algorithm]
    if recipe.smooth_quant_alpha is not None:
        algo = f"SmoothQuant + {algo}"
    return {**technique, "algorithm": f"{algo}; {what}",
            "serving_format": f"compressed-tensors {version('compressed-tensors')} {fmt} ({PRESETS[recipe.precision]}) "
            "for vLLM / SGLang", "scheme": PRESETS[recipe.precision], "format": fmt,
            "compressed_tensors": version("compressed-tensors"), "transformers": version("transformers"),
            "calibration_windows": len(windows) if recipe.needs_calibration else 0,
            "lm_head": "fp32 (ignored by the scheme)", "embeddings": "fp32",
            "kept_unquantized": kept,
            "load": "vllm serve FOLDER (compressed-tensors), or AutoModelForCausalLM.from_pretrained(FOLDER)"}
