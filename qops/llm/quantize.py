"""Decoder-LLM quantization per target.

CPU, ONNX Runtime (the exported FP32 graph with its KV cache):
- INT4 weight-only ``MatMulNBits`` with ``rtn``, ``gptq`` (calibrated on windows of the calibration set, fed with
  the graph's empty ``past_key_values`` inputs), ``hqq`` or ``k_quant``; block size and ``accuracy_level`` from the
  recipe;
- ``lm_head`` as the recipe says: ``int8`` (8-bit ``MatMulNBits``, the default: the output projection is the most
  quantization-sensitive matrix, as llama.cpp's Q4_K_M and ONNX Runtime GenAI's ``k_quant_last`` also keep it at
  higher precision), ``int4`` (with the body) or ``fp32``;
- embeddings as ``GatherBlockQuantized`` (4-bit RTN, block-wise per row) whatever the MatMul algorithm: ONNX
  Runtime's GPTQ, HQQ and k-quant quantize MatMul weights only;
- NF4 (``MatMulBnb4``, the bitsandbytes 4-bit NormalFloat code, block 64; absmax kept in FP32, so no double
  quantization in this format).

GPU, PyTorch + torchao (``queue: gpu``): INT4 weight-only (``Int4WeightOnlyConfig``) and FP8
(``Float8DynamicActivationFloat8WeightConfig``) applied to the BF16 checkpoint at load, as ``transformers``'
``TorchAoConfig`` does; the target's artifact is the checkpoint folder plus ``qops_torchao.json`` naming the config.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from qops.artifacts import atomic_dir, atomic_path, sha256_file, write_json_atomic
from qops.errors import QopsError
from qops.llm.embeddings import int8_embeddings
from qops.llm.sensitivity import override_modules, override_nodes, read_overrides
from qops.llm.torch_quant import gptq, group_size_for
from qops.llm.torch_target import load_torch_target, require_cuda
from qops.quantize.awq import apply_awq
from qops.quantize.smoothquant import smooth

log = logging.getLogger(__name__)

LM_HEAD = "/lm_head/MatMul"


def _matmul_weights(model) -> dict[str, tuple]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def _check_blocks(model, recipe, skip: set[str]) -> None:
    """ONNX Runtime 1.31's k-quant (Intel Neural Compressor code) packs zero points two per byte per column and
    fails on an odd number of blocks; say so before a cryptic reshape error."""
    if recipe.algorithm != "k_quant":
        return
    bad = {n: k for n, (k, _) in _matmul_weights(model).items() if n not in skip and -(-k // recipe.block_size) % 2}
    if bad:
        name, k = next(iter(bad.items()))
        raise QopsError(f"Target {recipe.target!r}: {recipe.algorithm} in ONNX Runtime cannot pack {len(bad)} MatMul "
                        f"weight(s) whose input size splits into an odd number of {recipe.block_size}-blocks (e.g. "
                        f"{name}: {k} rows).", "set target_options block_size so that every input size divides into "
                        "an even number of blocks (e.g. 32 for sizes that are multiples of 64), or use algorithm rtn "
                        "or hqq.")


def _nbits_pass(model, recipe, bits: int, algo, include: list[str] | None = None, exclude: list[str] | None = None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    class _Quantizer(MatMulNBitsQuantizer):
        def _generate_q4_node_config(self):  # GPTQ/k-quant ignore nodes_to_exclude: honour it here
            cfg = super()._generate_q4_node_config()
            for n in exclude or []:
                cfg[n] = "fp32"  # Neural Compressor's marker for "leave this node alone"
            return cfg

    q = _Quantizer(model, bits=bits, block_size=recipe.block_size, is_symmetric=recipe.symmetric_weights,
                   accuracy_level=recipe.accuracy_level, nodes_to_exclude=list(exclude or []),
                   nodes_to_include=include, algo_config=algo)
    q.process()
    return q.model.model if hasattr(q.model, "model") else q.model


def _op_counts(model) -> dict:
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "MatMulNBits", "MatMulBnb4", "Gather", "GatherBlockQuantized"):
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def quantize_onnx_llm(src: str | os.PathLike, recipe, out_path: str | os.PathLike, reader=None,
                      on_grid: bool = False) -> dict:
    """Quantize the exported decoder ``src`` for an ONNX ``int4`` or ``nf4`` recipe into ``out_path``.
    ``on_grid``: ``src``'s weights already lie on a 4-bit grid (GPTQ's output): its codes are written exactly."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.matmul_bnb4_quantizer",
                 "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    model = onnx.load(str(src))
    untied = untie_embeddings(model) if recipe.precision == "int4" and "Gather" in recipe.op_types else None
    weights = _matmul_weights(model)
    if LM_HEAD not in weights:
        raise QopsError(f"{src} has no {LM_HEAD} node: it is not a decoder exported by qops.",
                        "use the source stage's export (onnxruntime-genai builder) as the FP32 model.")
    head = recipe.lm_head
    body_exclude = [] if head == ("nf4" if recipe.precision == "nf4" else "int4") else [LM_HEAD]
    overrides = read_overrides(recipe.tensor_overrides) if recipe.tensor_overrides else {}
    eight_bit = override_nodes(overrides, weights) if overrides else []
    body_exclude += eight_bit
    if recipe.precision == "int8":  # W8A8: SmoothQuant, then dynamic INT8 (activations per tensor at run time)
        return quantize_w8a8_llm(model, src, recipe, out_path, reader)
    if recipe.precision == "nf4":
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        log.info("NF4 (MatMulBnb4, block %d) for %s", recipe.block_size, recipe.target)
        q = MatMulBnb4Quantizer(model, quant_type=MatMulBnb4Quantizer.NF4, block_size=recipe.block_size,
                                nodes_to_exclude=body_exclude)
        q.process()
        model = q.model.model
        method = {"algorithm": "nf4 (bitsandbytes NormalFloat-4 code)", "block_size": recipe.block_size,
                  "absmax": "fp32 per block (MatMulBnb4 has no double quantization)"}
    else:
        _check_blocks(model, recipe, set(body_exclude))
        fmt = QuantFormat.QOperator
        if recipe.algorithm in ("gptq", "awq") and (reader is None or not len(reader)):
            raise QopsError(f"Target {recipe.target!r} ({recipe.algorithm.upper()}) needs calibration windows.",
                            "run the calibrate stage first (its set feeds the activation statistics).")
        awq = None
        if recipe.algorithm == "awq":  # scale the salient input channels, then round-to-nearest below
            awq = apply_awq(model, reader, recipe.block_size, recipe.symmetric_weights, nodes_to_exclude=body_exclude)
        if recipe.algorithm == "gptq":
            # block_size here is GPTQ's lazy-update column batch; the quantization groups are recipe.block_size
            algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128, percdamp=0.01,
                                             actorder=False, mse=False, perchannel=True)
        elif recipe.algorithm == "hqq":
            algo = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=4)
        elif recipe.algorithm == "k_quant":
            algo = KQuantWeightOnlyQuantConfig()
        else:
            algo = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric_weights,
                                                accuracy_level=recipe.accuracy_level, quant_format=fmt,
                                                op_types_to_quantize=("MatMul",), bits=4)
        log.info("INT4 %s (block %d, accuracy_level %s) for %s%s", recipe.algorithm, recipe.block_size,
                 recipe.accuracy_level, recipe.target,
                 f" on {len(reader)} calibration windows" if recipe.algorithm == "gptq" else "")
        model = _nbits_pass(model, recipe, 4, algo, exclude=body_exclude)
        if on_grid:
            write_grid_blobs(model, onnx.load(str(src)))
        method = {"algorithm": recipe.algorithm, "block_size": recipe.block_size,
                  "accuracy_level": recipe.accuracy_level, "symmetric": recipe.symmetric_weights}
        if recipe.algorithm in ("gptq", "awq"):
            method["calibration_windows"] = len(reader)
        if awq is not None:
            method["awq"] = {k: awq[k] for k in ("scaled", "activations", "mean_relative_error_rtn",
                                                 "mean_relative_error") if k in awq}
    if head == "int8" or eight_bit:
        algo8 = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=True,
                                             accuracy_level=recipe.accuracy_level, op_types_to_quantize=("MatMul",),
                                             bits=8)
        model = _nbits_pass(model, recipe, 8, algo8, include=[LM_HEAD] * (head == "int8") + eight_bit)
    embeddings = "fp32"
    if "Gather" in recipe.op_types and recipe.precision == "int4" and recipe.embeddings == "int8":
        heads = [n.name for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(LM_HEAD)]
        embeddings = int8_embeddings(model, recipe.block_size, heads[0] if untied and heads else None)
    elif "Gather" in recipe.op_types:
        algo_g = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric_weights,
                                              op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),), bits=4)
        model = _nbits_pass(model, recipe, 4, algo_g)
        embeddings = "int4 block-wise RTN (GatherBlockQuantized)" if _op_counts(model).get(
            "GatherBlockQuantized") else "fp32 (the embedding Gather was not quantizable)"
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    copy_genai_files(src, out)
    if untied and "sharing" not in embeddings:
        embeddings += f" (its own table: the export tied it to {untied} through a Transpose)"
    if eight_bit:
        method["eight_bit_layers"] = sorted(overrides["overrides"])
        method["eight_bit_nodes"] = len(eight_bit)
    return {**method, "lm_head": head, "embeddings": embeddings, "ops": _op_counts(model)}


def quantize_w8a8_llm(model, src, recipe, out_path, reader) -> dict:
    """W8A8 for the exported decoder: SmoothQuant on the calibration windows (with the KV-cache inputs; the
    inverse scales become a ``Mul`` after each RMSNorm output, the weights' rows are scaled), then ONNX Runtime's
    dynamic INT8 (int8 weights per channel, uint8 activations quantized per tensor at run time by
    ``DynamicQuantizeMatMul``) on the MatMuls with constant weights, lm_head included; embeddings stay FP32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sq = None
    if recipe.smooth_quant_alpha is not None:
        if reader is None or not len(reader):
            raise QopsError(f"Target {recipe.target!r} (SmoothQuant) needs calibration windows.",
                            "run the calibrate stage first (its set feeds the activation maxima).")
        sq = smooth(model, reader, recipe.smooth_quant_alpha, op_types=("MatMul",))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if recipe.activation_granularity == "per-block":
        return w8a8_per_block(model, src, recipe, out, sq, reader)
    with atomic_path(out) as tmp:
        staged = Path(str(tmp) + ".fp32.onnx")
        onnx.save(model, str(staged))
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # ONNX Runtime's quantizer logs every tensor on the root logger
        try:
            quantize_dynamic(str(staged), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
            staged.unlink(missing_ok=True)
    copy_genai_files(src, out)
    quantized = onnx.load(str(out), load_external_data=False)
    ops = {}
    for n in quantized.graph.node:
        if n.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "Gather"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"algorithm": ("SmoothQuant (alpha %s) + " % recipe.smooth_quant_alpha if sq else "")
            + "dynamic INT8 (ONNX Runtime quantize_dynamic)", "smoothquant": {k: sq[k] for k in ("smoothed", "alpha")}
            if sq else None, "calibration_windows": len(reader) if sq else 0, "lm_head": "int8 (dynamic)",
            "embeddings": "fp32", "ops": ops}


def untie_embeddings(model) -> str | None:
    """Give the token-embedding ``Gather`` a table of its own where the export ties it to the output projection
    (``Gather(Transpose(lm_head weight))``, tied embeddings: the rule in small decoders), so the table is quantized
    as a ``GatherBlockQuantized`` and the FP32 weight does not stay in the file only to be transposed at run time
    (it held the quantized model of SmolLM2-135M at 2.5x smaller than FP32). Returns the tied weight's name."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for gather in model.graph.node:
        t = producers.get(gather.input[0]) if gather.op_type == "Gather" else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        table = numpy_helper.to_array(inits[t.input[0]]).T.copy()
        name = t.input[0].replace("lm_head", "model.embed_tokens").replace("MatMul.", "") + ".untied"
        model.graph.initializer.append(numpy_helper.from_array(table, name))
        gather.input[0] = name
        if not any(t.output[0] in n.input for n in model.graph.node):
            model.graph.node.remove(t)
        return t.input[0]
    return None


def w8a8_per_block(model, src, recipe, out: Path, sq: dict | None, reader) -> dict:
    """W8A8 with activations quantized per block at run time: every constant-weight MatMul (lm_head included) as an
    8-bit ``MatMulNBits`` (int8 weights, one scale per block of ``block_size`` input rows) with ``accuracy_level``
    4, whose CPU kernels quantize each activation row to int8 per block of the same size and multiply in int8. One
    scale per token and block, instead of one per tensor (``DynamicQuantizeMatMul``), which real decoders' outlier
    channels defeat; still int8 x int8 products."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    algo8 = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=True, accuracy_level=4,
                                         op_types_to_quantize=("MatMul",), bits=8)
    model = _nbits_pass(model, recipe, 8, algo8)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    copy_genai_files(src, out)
    ops = _op_counts(model)
    return {"algorithm": ("SmoothQuant (alpha %s) + " % recipe.smooth_quant_alpha if sq else "")
            + f"int8 weights (blocks of {recipe.block_size}) x int8 activations per token and block at run time "
            "(MatMulNBits bits=8, accuracy_level 4)", "smoothquant": {k: sq[k] for k in ("smoothed", "alpha")}
            if sq else None, "calibration_windows": len(reader) if sq else 0,
            "lm_head": f"int8 (blocks of {recipe.block_size}, activations per block)", "embeddings": "fp32",
            "ops": ops}


def copy_genai_files(src, out: Path) -> None:
    for f in ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json"):
        if (Path(src).parent / f).is_file():
            shutil.copy2(Path(src).parent / f, out.parent / f)


def gptq_checkpoint(hf_dir: str | os.PathLike, windows, block_size: int, out_dir: str | os.PathLike,
                    symmetric: bool = True, act_order: bool = False, clip_search: bool = False,
                    overrides: dict | None = None) -> dict:
    """qops' sequential GPTQ (:func:`qops.llm.torch_quant.gptq`) on the checkpoint, on ONNX Runtime's signed-scale
    grid, saved as a checkpoint whose weights lie exactly on that grid: exported to ONNX, ONNX Runtime's
    round-to-nearest then re-derives GPTQ's own scales and integers (instead of ONNX Runtime's GPTQ, which takes
    about half an hour on a 135 M model here). lm_head is left to the recipe's lm_head setting, and the modules of a
    tensor-override document (``overrides``) stay FP32 for the 8-bit pass (rounding them to the 4-bit grid first
    would make their 8-bit codes hold 4-bit values); the layers after them are fitted to their FP32 outputs."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    group = group_size_for(model, block_size)
    eight_bit = override_modules(overrides, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)])
    gptq(model, windows, 4, group, grid="ort", symmetric=symmetric, act_order=act_order, mse=clip_search,
         skip=("lm_head", *eight_bit))
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in Path(hf_dir).iterdir():  # tokenizer, chat template: everything the weights and config are not
            if f.is_file() and not (tmp / f.name).exists() and f.suffix not in (".safetensors", ".bin"):
                shutil.copy2(f, tmp / f.name)
    return {"hf_dir": str(out), "group": group, "windows": len(windows), "seconds": round(time.perf_counter() - t0, 1),
            "fp32_for_8_bit": len(eight_bit),
            "symmetric": symmetric, "act_order": act_order, "clip_search": clip_search,
            "implementation": "qops PyTorch GPTQ (sequential, layer inputs carried forward, damp 0.01"
            + (", activation order with static groups" if act_order else "")
            + (", ranges searched for the least rounding error" if clip_search else "") + "), "
            + ("on ONNX Runtime's signed-scale grid" if symmetric else "asymmetric (integer zero points)")
            + "; the exact codes, scales and zero points written into ONNX Runtime's MatMulNBits"}


def grid_codes(w, block: int) -> tuple:
    """4-bit codes and one scale per block of ``block`` input rows for weights ``w`` ([N, K]) that already lie on a
    symmetric 4-bit grid (GPTQ's dequantized output): per block, the scale is the block's largest-magnitude value
    divided by the code it holds (-8, -7, 7, ... tried in that order) — exact where round-to-nearest's absmax/8 is
    not (a block whose largest value was rounded to -7 after GPTQ's error feedback). Returns (codes + 8 as uint8
    [N, blocks, block], scales [N, blocks])."""
    g = _blocks(w, block)
    vmax = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    scales = np.zeros(vmax.shape)
    for c in (-8, -7, 7, -6, 6, -5, 5, -4, 4, -3, 3, -2, 2, -1, 1):
        s = np.where(vmax != 0, vmax / c, 1.0)
        scales = np.where((scales == 0) & _on_grid(g, s, -8, 7), s, scales)
    _check_grid(scales, "symmetric")
    codes = np.clip(np.round(g / scales[..., None]), -8, 7) + 8
    return codes.astype(np.uint8), scales.astype(np.float32)


def grid_codes_asymmetric(w, block: int) -> tuple:
    """As :func:`grid_codes` for weights on an asymmetric 4-bit grid ((code - zero) x scale, codes 0..15, an integer
    zero point: GPTQ with ``symmetric=False``). Zero lies on such a grid, so the span from min(w, 0) to max(w, 0) is
    k steps for some k <= 15: the first k (from 15 down) whose step holds every value is a scale that reproduces the
    block exactly. Returns (codes uint8 [N, blocks, block], scales [N, blocks], zero points uint8 [N, blocks])."""
    g = _blocks(w, block)
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    scales = np.zeros(lo.shape)
    for k in range(15, 0, -1):
        s = np.where(hi > lo, (hi - lo) / k, 1.0)
        scales = np.where((scales == 0) & _on_grid(g, s, -15, 15), s, scales)
    _check_grid(scales, "asymmetric")
    zeros = np.round(-lo / scales)
    codes = np.clip(np.round(g / scales[..., None]) + zeros[..., None], 0, 15)
    return codes.astype(np.uint8), scales.astype(np.float32), zeros.astype(np.uint8)


def _blocks(w, block: int):
    n, k = w.shape
    return np.pad(w, ((0, 0), (0, -k % block))).reshape(n, -1, block).astype(np.float64)


def _on_grid(g, s, lo: int, hi: int):
    r = g / s[..., None]
    return (np.abs(r - np.round(r)) < 1e-3).all(-1) & (np.round(r) >= lo).all(-1) & (np.round(r) <= hi).all(-1)


def _check_grid(scales, kind: str) -> None:
    if (scales == 0).any():
        raise QopsError(f"GPTQ's weights are not on a {kind} 4-bit grid (an internal error).",
                        "report it with the model; use llm_int4_rtn meanwhile.")


def _pack4(codes):
    """Two 4-bit values per byte, the first in the low nibble (MatMulNBits' layout)."""
    codes = np.concatenate([codes, np.zeros_like(codes[..., :1])], -1) if codes.shape[-1] % 2 else codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def write_grid_blobs(model, fp32_model) -> int:
    """Overwrite the blobs, scales (and zero points, for asymmetric nodes) of each 4-bit ``MatMulNBits`` of
    ``model`` (written by round-to-nearest from ``fp32_model``'s on-grid weights) with the grid's exact values;
    returns the number of nodes."""
    from onnx import numpy_helper

    weights = {i.name: i for i in fp32_model.graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    done = 0

    def put(name, array):
        old = inits[name]
        old.CopyFrom(numpy_helper.from_array(array.reshape(numpy_helper.to_array(old).shape), old.name))

    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs.get("bits") != 4:
            continue
        source = weights.get(node.input[1][: -len("_Q4")] if node.input[1].endswith("_Q4") else None)
        if source is None:
            continue
        w = numpy_helper.to_array(source).T
        zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if zp is None:
            codes, scales = grid_codes(w, attrs["block_size"])
        else:
            codes, scales, zeros = grid_codes_asymmetric(w, attrs["block_size"])
            put(zp, _pack4(zeros))
        put(node.input[1], _pack4(codes))
        put(node.input[2], scales)
        done += 1
    return done


# ---- GPU targets (PyTorch + torchao) -------------------------------------------------------------------------------

def quantize_torch_llm(hf_dir: str | os.PathLike, recipe, out_dir: str | os.PathLike) -> dict:
    """A torchao GPU target: check the device, apply the config once to prove it loads, and write the folder."""
    require_cuda(recipe)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        shutil.copytree(hf_dir, tmp, dirs_exist_ok=True)
        write_json_atomic(tmp / "qops_torchao.json", {"torch_method": recipe.torch_method,
                                                      "block_size": recipe.block_size, "dtype": "bfloat16",
                                                      "target": recipe.target})
    load_torch_target(out, recipe.to_dict())  # fails here, not in evaluate, when the config cannot apply
    return {"algorithm": recipe.torch_method, "block_size": recipe.block_size, "lm_head": "bf16 (torchao skips it)",
            "embeddings": "bf16"}


def model_digest(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
