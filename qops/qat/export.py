"""Deployment formats of a QAT model: ONNX QDQ from a PT2E-converted graph, ONNX ``MatMulNBits`` from torchao's
int4 weights, or a ``.pt2`` program.

``MatMulNBits`` stores, per output row ``n`` and block ``b`` of ``block_size`` inputs, unsigned 4-bit values
``u`` (two per byte, the even element in the low nibble), one float scale and a zero point (8 when the input is
omitted): ``W[n, k] = (u - zp) * scale``. torchao's ``IntxUnpackedToInt8Tensor`` holds ``q`` in [-8, 7] with a
scale and zero point per group; ``u = q + 8`` and ``zp = torchao's zero point + 8`` give exactly torchao's
dequantized weight, which is checked layer by layer.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from qops.artifacts import atomic_path
from qops.data import onnx_io
from qops.errors import ModelError
from qops.programs import save_program
from qops.quantize.int4 import quantize_nbits
from qops.quantize.result import copy_metadata

log = logging.getLogger(__name__)


def _dynamic_shapes(examples: dict[str, np.ndarray], source_onnx: str | None):
    """Dim.AUTO for the batch dimension and for every dimension the ONNX source leaves symbolic."""
    import torch

    dyn = {}
    shapes = {}
    if source_onnx:
        shapes = {i.name: i.shape for i in onnx_io(source_onnx)[0]}
    for k, v in examples.items():
        s = shapes.get(k) or (None,) + tuple(v.shape[1:])
        dyn[k] = {i: torch.export.Dim.AUTO for i in range(v.ndim)
                  if i == 0 or (i < len(s) and not isinstance(s[i], int))}
    return tuple(dyn[k] for k in examples)


def _export(module, examples: dict[str, np.ndarray], source_onnx: str | None):
    import torch

    dev = next(iter(module.parameters()), torch.empty(0)).device  # a GPU-trained module exports on its device
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)).to(dev) for v in examples.values())
    return torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(examples, source_onnx), strict=False)


def pt2e_to_onnx(converted, examples: dict[str, np.ndarray], source_onnx: str, dst: str | os.PathLike) -> Path:
    """Export a ``convert_pt2e`` graph to ONNX QDQ with the source model's input and output names and metadata."""
    import onnx
    import torch

    dst = Path(dst)
    src = onnx.load(str(source_onnx), load_external_data=False)
    in_names = [i.name for i in src.graph.input if i.name not in {t.name for t in src.graph.initializer}]
    out_names = [o.name for o in src.graph.output]
    ep = _export(converted, examples, source_onnx)
    try:
        prog = torch.onnx.export(ep, dynamo=True, input_names=in_names, output_names=out_names, verbose=False)
    except Exception as e:
        raise ModelError(f"Exporting the QAT model to ONNX QDQ failed: {str(e).splitlines()[0][:300]}",
                         "use a .pt2 target for this model (torch_x86_int8), or report the operator it names.") from None
    with atomic_path(dst) as tmp:
        prog.save(str(tmp))
        copy_metadata(Path(source_onnx), tmp)
    return dst


def save_program_any(module, examples: dict[str, np.ndarray], meta: dict, dst: str | os.PathLike) -> Path:
    """Export a (torchao-converted) module with dynamic batch (and sequence) dimensions as a ``.pt2``."""
    return save_program(_export(module, examples, None), dst, meta)


def _key(w: np.ndarray) -> tuple:
    w = np.ascontiguousarray(w, dtype=np.float32)
    return w.shape, hashlib.sha256(w.tobytes()).hexdigest()


def pack_matmulnbits(q: np.ndarray, zero_point: np.ndarray, block_size: int):
    """torchao's int4 ``q`` [N, K] (values -8..7) and zero points [N, K/block] -> MatMulNBits ``B``
    [N, K/block, block/2] and ``zero_points`` (None when all are torchao's 0, i.e. MatMulNBits' default 8)."""
    n, k = q.shape
    if k % block_size or block_size % 2:
        raise ModelError(f"A layer of width {k} does not split into blocks of {block_size}.",
                         "set the target's block_size to a divisor of every linear layer's input width.")
    u = (q.astype(np.int16) + 8).astype(np.uint8).reshape(n, k // block_size, block_size)
    packed = (u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)
    zp = None
    if np.any(zero_point != 0):
        z = (zero_point.astype(np.int16) + 8).astype(np.uint8)  # [N, n_blocks]
        if z.shape[1] % 2:
            z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
        zp = ((z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)).reshape(-1)
    return packed.astype(np.uint8), zp


def unpack_matmulnbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, n: int, k: int, block_size: int):
    """The float weight [N, K] a MatMulNBits node computes with (for the layer-by-layer check)."""
    nb = k // block_size
    u = np.empty((n, nb, block_size), np.float32)
    u[..., 0::2], u[..., 1::2] = b & 0x0F, b >> 4
    if zp is None:
        z = np.full((n, nb), 8, np.float32)
    else:
        zz = np.empty((n, (nb + 1) // 2 * 2), np.float32)
        zr = zp.reshape(n, -1)
        zz[:, 0::2], zz[:, 1::2] = zr & 0x0F, zr >> 4
        z = zz[:, :nb]
    return ((u - z[..., None]) * scales.reshape(n, nb, 1)).reshape(n, k)


def torchao_int4_to_matmulnbits(quantized, fp32_weights: dict, source_onnx: str, dst: str | os.PathLike,
                                block_size: int, accuracy_level: int | None) -> tuple[Path, dict]:
    """Replace each MatMul/Gemm of the FP32 ONNX model whose weight is one of ``quantized``'s torchao int4 Linear
    layers by a ``MatMulNBits`` node holding torchao's integers and scales. Layers are matched to ONNX weights by
    their FP32 values (``fp32_weights``: module name -> weight before training), so names need not agree."""
    import onnx
    from onnx import helper, numpy_helper

    layers = {}
    for name, mod in quantized.named_modules():
        w = getattr(mod, "weight", None)
        if name in fp32_weights and hasattr(w, "qdata"):
            layers[_key(fp32_weights[name].numpy())] = (name, mod)
    model = onnx.load(str(source_onnx))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, used, max_diff, replaced = [], set(), 0.0, 0
    for node in g.node:
        wname = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if wname not in inits or (node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0)
                                                              != 1.0 or attrs.get("transA", 0))):
            new_nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[wname])
        w_nk = b if (node.op_type == "Gemm" and attrs.get("transB", 0)) else b.T
        hit = layers.get(_key(w_nk))
        if hit is None:
            new_nodes.append(node)
            continue
        lname, mod = hit
        t = mod.weight
        q = t.qdata.detach().cpu().numpy()
        n, k = q.shape
        if tuple(t.block_size) != (1, block_size):
            raise ModelError(f"Layer {lname} was quantized in groups {tuple(t.block_size)}, the target wants "
                             f"blocks of {block_size}.", "set qat group_size to the target's block_size.")
        scale = t.scale.detach().float().cpu().numpy().reshape(n, k // block_size)
        zp_t = t.zero_point.detach().cpu().numpy().reshape(n, k // block_size)
        packed, zp = pack_matmulnbits(q, zp_t, block_size)
        dq = unpack_matmulnbits(packed, scale, zp, n, k, block_size)
        ref = t.dequantize().detach().float().cpu().numpy()
        max_diff = max(max_diff, float(np.abs(dq - ref).max()))
        if not np.allclose(dq, ref, rtol=1e-6, atol=1e-7):
            raise ModelError(f"MatMulNBits weights of layer {lname} differ from torchao's dequantized weight.",
                             "report this: the packing does not reproduce torchao's integers.")
        base = f"{lname}.qat_int4"
        g.initializer.extend([numpy_helper.from_array(packed, base + ".B"),
                              numpy_helper.from_array(scale.reshape(-1).astype(np.float32), base + ".scales")])
        ins = [node.input[0], base + ".B", base + ".scales"]
        if zp is not None:
            g.initializer.append(numpy_helper.from_array(zp, base + ".zero_points"))
            ins.append(base + ".zero_points")
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            ins += [""] * (5 - len(ins)) + [node.input[2]]  # MatMulNBits' bias is input 5
        kw = {"K": k, "N": n, "bits": 4, "block_size": block_size}
        if accuracy_level is not None:
            kw["accuracy_level"] = accuracy_level
        new_nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=(node.name or base) + "_Q4",
                                          domain="com.microsoft", **kw))
        used.add(wname)
        replaced += 1
    if replaced == 0:
        raise ModelError("No linear layer of the QAT model matched a MatMul/Gemm weight of the ONNX source model.",
                         "give qat.program the program the ONNX model was exported from.")
    del g.node[:]
    g.node.extend(new_nodes)
    still = {i for nd in g.node for i in nd.input}
    keep = [t for t in g.initializer if t.name not in used or t.name in still]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
        copy_metadata(Path(source_onnx), tmp)
    log.info("MatMulNBits from torchao's int4 weights: %d of %d layers (largest difference %.2e)", replaced,
             len(layers), max_diff)
    return dst, {"layers": replaced, "torch_layers": len(layers), "max_abs_diff": max_diff, "block_size": block_size}


def quantize_embeddings(path: str | os.PathLike, recipe) -> Path:
    """INT4 block-wise embedding tables (``GatherBlockQuantized``) on a model whose MatMuls are already
    ``MatMulNBits``: ONNX Runtime's quantizer restricted to Gather, as the ``int4_weight_only`` recipe does."""

    import onnx

    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    if not any(n.op_type == "Gather" and n.input and n.input[0] in inits for n in m.graph.node):
        return path  # no embedding table
    with atomic_path(path) as tmp:
        quantize_nbits(path, tmp, recipe.with_options(op_types=("Gather",), algorithm="rtn"), 4, None, False)
        copy_metadata(path, tmp)
    return path
