"""Activation-aware weight scaling for INT4 weight-only layers (AWQ, Lin et al. 2024) in ONNX graphs.

A few input channels of a linear layer carry most of its activation magnitude; rounding the weights of those
channels to 4 bits costs the output far more than rounding the others. AWQ multiplies row j of the weight by

    s_j = (mean |X_j|)^alpha   (normalised so that sqrt(max s * min s) = 1)

before block-wise quantization, and divides the activation by s_j: the float product is unchanged, and the salient
channels get a finer grid. Here ``alpha`` is searched per activation on a sample of the calibration activations:
each alpha of a grid (0 = plain round-to-nearest) is scored by the relative error of every layer that reads the
activation, with its weights quantized exactly as ONNX Runtime's MatMulNBits quantizer does (blocks along the
input dimension; symmetric: the block's largest magnitude maps to -8; asymmetric: min..max over 0..15). The
division is a ``Mul`` inserted after the activation's producer (one per activation, shared by the layers reading
it, e.g. Q, K and V); the scaled weights are then quantized by the recipe's round-to-nearest.
"""

from __future__ import annotations

import logging

import numpy as np

from qops.quantize.graph import initializers, weighted_nodes
from qops.quantize.smoothquant import activation_samples, insert_after_producers

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` ([in, out]) as ``[in/block, block, out]`` (zero-padded)."""
    return np.pad(w, ((0, (-w.shape[0]) % block), (0, 0))).reshape(-1, block, w.shape[1])


def clipped(w: np.ndarray, block: int, ratio=1.0) -> np.ndarray:
    """``w`` with each block's range shrunk by ``ratio`` (a scalar or ``[in/block, 1, out]``): what
    round-to-nearest then quantizes."""
    b = _blocks(w, block)
    b = np.clip(b, b.min(axis=1, keepdims=True) * ratio, b.max(axis=1, keepdims=True) * ratio)
    return b.reshape(-1, w.shape[1])[:w.shape[0]]


def fake_quant_blockwise(w: np.ndarray, block: int, symmetric: bool, ratio=1.0) -> np.ndarray:
    """``w`` ([in, out]) quantized to 4 bits in blocks of ``block`` input rows per output column, dequantized;
    ``ratio`` shrinks each block's range first (:func:`clipped`)."""
    b = _blocks(clipped(w, block, ratio) if np.any(np.asarray(ratio) != 1.0) else w, block)
    if symmetric:
        mx, mn = b.max(axis=1, keepdims=True), b.min(axis=1, keepdims=True)
        peak = np.where(np.abs(mx) > np.abs(mn), mx, mn)
        scale = peak / -8.0
        scale = np.where(scale != 0, scale, 1.0)
        q = np.clip(np.round(b / scale), -8, 7) * scale
    else:
        mn, mx = np.minimum(b.min(axis=1, keepdims=True), 0), np.maximum(b.max(axis=1, keepdims=True), 0)
        scale = (mx - mn) / 15.0
        scale = np.where(scale > 0, scale, 1.0)
        zp = np.round(-mn / scale)
        q = (np.clip(np.round(b / scale) + zp, 0, 15) - zp) * scale
    return q.reshape(-1, w.shape[1])[:w.shape[0]]


def awq_scales(x: np.ndarray, weights: list[np.ndarray], block: int, symmetric: bool,
               grid=ALPHAS) -> tuple[np.ndarray | None, float, dict]:
    """The per-input-channel scales (None: alpha 0, plain rounding is best) whose quantized layers reproduce
    ``x @ W`` best on the sample ``x``; the chosen alpha and the relative error of each alpha."""
    ref = [x @ w for w in weights]
    den = sum(float(np.sum(r**2)) for r in ref) or 1.0
    mean = np.maximum(np.abs(x).mean(axis=0), 1e-8)
    errors, scales = {}, {}
    for a in grid:
        s = np.power(mean, a)
        scales[a] = s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        errors[a] = sum(float(np.sum(((x / s) @ fake_quant_blockwise(w * s[:, None], block, symmetric) - r) ** 2))
                        for w, r in zip(weights, ref)) / den
    best = min(errors, key=errors.get)
    return (None if best == 0.0 else scales[best]), float(best), errors


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def clip_ratios(x: np.ndarray, w: np.ndarray, block: int, symmetric: bool, grid=CLIP_RATIOS) -> np.ndarray:
    """AWQ's weight clipping: per block and output column, the share of the block's range (``[in/block, 1, out]``)
    whose quantized weights reproduce ``x @ w`` best on the sample (blocks are independent: block g of the
    output error is ``x[:, g] @ (w_g - q(w_g))``)."""
    xb = _blocks(x.T, block).transpose(2, 0, 1)  # [rows, in/block, block]
    errs = []
    for r in grid:
        d = _blocks(w - fake_quant_blockwise(w, block, symmetric, r), block)
        errs.append(np.stack([np.sum((xb[:, g] @ d[g]) ** 2, axis=0) for g in range(d.shape[0])]))  # [blocks, out]
    best = np.argmin(np.stack(errs), axis=0)  # [blocks, out]
    return np.asarray(grid, dtype=np.float32)[best][:, None, :]


def apply_awq(model, reader, block: int, symmetric: bool, nodes_to_exclude=(), max_rows: int = 512,
              clip: bool = True) -> dict:
    """Scale the MatMul weights of ``model`` (in place) for INT4 block quantization, per activation, then (``clip``)
    shrink each block's range where that lowers the layer's output error. Returns a report: activations scaled,
    the alpha of each, the relative output error of plain rounding, after scaling, and after clipping."""
    from onnx import helper, numpy_helper

    inits = initializers(model)
    exclude = set(nodes_to_exclude)
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    groups: dict[str, list] = {}
    for node, wname in weighted_nodes(model, {"MatMul"}):
        if node.name in exclude or node.input[0] in inits or uses.get(wname, 0) > 1:
            continue
        w = numpy_helper.to_array(inits[wname])
        if w.ndim != 2 or w.shape[0] < block:
            continue
        groups.setdefault(node.input[0], []).append((node, wname))
    report: dict = {"scaled": 0, "activations": len(groups), "alphas": {}}
    if not groups:
        return report
    samples = activation_samples(model, list(groups), reader, max_rows=max_rows)["samples"]
    new_nodes, before, after = [], 0.0, 0.0
    for act, layers in groups.items():
        ws = [numpy_helper.to_array(inits[w]).astype(np.float32) for _, w in layers]
        x = samples[act].astype(np.float32)
        if x.shape[-1] != ws[0].shape[0]:
            continue
        s, alpha, errors = awq_scales(x, ws, block, symmetric)
        xs = x if s is None else x / s
        ref = [x @ w for w in ws]
        den = sum(float(np.sum(r**2)) for r in ref) or 1.0
        final, err = [], 0.0
        for (node, wname), w, r in zip(layers, ws, ref):
            w = w if s is None else w * s[:, None]
            ratio = clip_ratios(xs, w, block, symmetric) if clip else np.ones((1, 1, 1), np.float32)
            w = clipped(w, block, ratio)
            err += float(np.sum((xs @ fake_quant_blockwise(w, block, symmetric) - r) ** 2))
            final.append(w)
            if s is not None or bool(np.any(ratio < 1)):
                inits[wname].CopyFrom(numpy_helper.from_array(w.astype(np.float32), wname))
        err /= den
        report["alphas"][act] = {"alpha": alpha, "relative_error": round(err, 7),
                                 "relative_error_scaled": round(errors[alpha], 7),
                                 "relative_error_rtn": round(errors[0.0], 7)}
        before, after = before + errors[0.0], after + err
        if s is None:
            continue
        inv = act.replace("/", "_").replace(":", "_") + "_awq_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        out = act + "_awq"
        new_nodes.append((act, helper.make_node("Mul", [act, inv], [out], name=inv + "_mul")))
        for node, _ in layers:
            node.input[0] = out
        report["scaled"] += 1
    insert_after_producers(model, new_nodes)
    n = max(len(report["alphas"]), 1)
    report["mean_relative_error_rtn"], report["mean_relative_error"] = round(before / n, 7), round(after / n, 7)
    log.info("AWQ: %d of %d activations scaled; mean relative layer error %.3g -> %.3g", report["scaled"],
             len(groups), before / n, after / n)
    return report
