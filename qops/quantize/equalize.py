"""Cross-layer equalization of conv/linear chains before static INT8 (Nagel et al. 2019, "Data-Free Quantization").

A chain is ``A -> act -> B``: a Conv (dense or depthwise) or Gemm ``A`` whose only consumer is an activation
``act`` (Relu, Clip(0, c) such as ReLU6, or none), whose only consumer is a Conv/Gemm ``B``. Scaling output
channel ``i`` of ``A`` (its weights and bias) by ``t_i > 0`` and input channel ``i`` of ``B`` by ``1 / t_i`` leaves
the chain's function unchanged when ``act`` is positively homogeneous (Relu, none). Clip(0, c) is not: scaled by
``t_i`` it clips at ``c / t_i`` instead of ``c``. Here a channel may then only grow (``t_i >= 1``) up to
``margin * c / p_i``, ``p_i`` being its largest pre-activation value on the calibration rows, and a channel that
reaches ``c`` is left alone — so on every calibration row the equalized FP32 model computes what the original
did, and a new row differs only where a channel exceeds ``1 / margin`` times its calibrated maximum while staying
below ``c`` (the :func:`equalize` report says how often that happened on the calibration rows: never).

Why it helps a static INT8 graph: activations are quantized **per tensor**, so a channel whose range is a tenth
of the tensor's gets a tenth of the 256 levels. Weights are quantized per output channel, so growing ``A``'s
rows costs nothing; shrinking ``B``'s input columns costs weight precision in a dense ``B`` (nothing in a
depthwise one). The scale balances the two as Nagel et al. do with weight ranges (the geometric mean of the
activation's and the weight's relative ranges), from activation statistics collected once, batch by batch.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from qops.calibration.collect import AbsMax, MinMax, tap
from qops.quantize.graph import clip_bounds, consumers_of, node_attrs

log = logging.getLogger(__name__)

_ACTS = ("Relu", "Clip")


class Pair:
    """One equalizable chain: producer ``a``, its activation (or None) and consumer ``b``; ``tensor`` is the
    producer's output (whose per-channel statistics set the scales)."""

    def __init__(self, a, act, b, clip: tuple):
        self.a, self.act, self.b, self.clip = a, act, b, clip
        self.tensor = a.output[0]

    def __repr__(self) -> str:  # for logs and tests
        return f"Pair({self.a.name} -> {self.act.op_type if self.act is not None else '-'} -> {self.b.name})"


def _kind(node, inits) -> str | None:
    """"dense" / "depthwise" for a Conv, "gemm" for a Gemm, with constant weights; None otherwise."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = inits[node.input[1]]
    if node.op_type == "Gemm":
        a = node_attrs(node)
        if a.get("transA", 0) or len(w.dims) != 2:
            return None
        return "gemm"
    if node.op_type != "Conv":
        return None
    g = node_attrs(node).get("group", 1)
    if g == 1:
        return "dense"
    if g == w.dims[0] and w.dims[1] == 1:
        return "depthwise"
    return None


def find_pairs(model, nodes_to_exclude=(), clip: bool = True) -> list[Pair]:
    """Every ``A -> (Relu | Clip(0, c) | nothing) -> B`` chain with single consumers and constant weights
    (without Clip chains when ``clip`` is false: then every chain is exactly function-preserving)."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers = consumers_of(model)
    outputs = {o.name for o in model.graph.output}
    skip = set(nodes_to_exclude)
    clip_chains = clip
    pairs = []
    for a in model.graph.node:
        if a.name in skip or _kind(a, inits) is None or a.output[0] in outputs:
            continue
        nxt = consumers.get(a.output[0], [])
        if len(nxt) != 1:
            continue
        act, clip = None, (None, None)
        if nxt[0].op_type in _ACTS:
            act = nxt[0]
            clip = clip_bounds(model, act)
            if act.op_type == "Clip" and not clip_chains:
                continue
            if clip[0] != 0.0 or (act.op_type == "Clip" and (clip[1] is None or clip[1] <= 0)):
                continue  # only Relu and Clip(0, c): positively homogeneous below c
            if act.output[0] in outputs:
                continue
            nxt = consumers.get(act.output[0], [])
            if len(nxt) != 1:
                continue
        b = nxt[0]
        kb = _kind(b, inits)
        if b.name in skip or kb is None or b.input[0] != (act.output[0] if act is not None else a.output[0]):
            continue
        if kb == "gemm" and _kind(a, inits) != "gemm":
            continue  # a Conv feeding a Gemm goes through a flatten/pool in real graphs: not a direct chain
        wa, wb = inits[a.input[1]], inits[b.input[1]]
        out_a = wa.dims[0] if _kind(a, inits) != "gemm" else wa.dims[0 if node_attrs(a).get("transB", 0) else 1]
        in_b = (wb.dims[1] if kb == "dense" else wb.dims[0] if kb == "depthwise"
                else wb.dims[1 if node_attrs(b).get("transB", 0) else 0])
        if out_a != in_b:
            continue
        pairs.append(Pair(a, act, b, clip))
    return pairs


def channel_stats(model, tensors: list[str], batches) -> dict[str, dict]:
    """Per-channel max and max |x| of ``tensors`` (channel = axis 1) over ``batches`` (feeds), one batch at a
    time: memory is one batch's tapped tensors, whatever the number of rows."""
    top = {t: MinMax(axis=1, dtype="float32") for t in tensors}
    absmax = {t: AbsMax(axis=1, dtype="float32") for t in tensors}
    rows = tap(model, [p for t in tensors for p in ((t, top[t]), (t, absmax[t]))], batches)
    return {t: {"max": top[t].max, "absmax": absmax[t].result(), "rows": rows} for t in tensors if top[t].rows}


def _b_column_range(wb: np.ndarray, kind: str, trans_b: bool) -> np.ndarray | None:
    """Per input channel of B: the largest |w| of that column relative to the largest |w| of each output row it
    belongs to (how much of its row's quantization range the column uses); None for depthwise (free to scale)."""
    if kind == "depthwise":
        return None
    if kind == "gemm":
        w = wb.T if not trans_b else wb  # [out, in]
    else:
        w = wb.reshape(wb.shape[0], wb.shape[1], -1)  # [out, in, k]
        w = np.abs(w).max(axis=2)
    w = np.abs(w)
    row = w.max(axis=1, keepdims=True)
    row[row == 0] = 1.0
    return (w / row).max(axis=0)


def scales_for(pair: Pair, stats: dict, wb: np.ndarray, kind_b: str, trans_b: bool, *, margin: float,
               max_scale: float) -> np.ndarray:
    """The per-channel scale ``t`` for one chain (see the module's docstring)."""
    s = stats[pair.tensor]
    lo, hi = pair.clip
    pre = s["max"].astype(np.float64)
    if pair.act is None:
        post = s["absmax"].astype(np.float64)
    else:
        post = np.maximum(pre, 0.0) if hi is None else np.clip(pre, 0.0, hi)
    top = float(post.max())
    if top <= 0:
        return np.ones_like(pre)
    alpha = np.maximum(post / top, 1e-6)  # the channel's share of the tensor's quantization range
    col = _b_column_range(wb, kind_b, trans_b)
    if col is None:
        t = 1.0 / alpha  # depthwise consumer: fill the range
    else:
        t = np.sqrt(np.maximum(col, 1e-6) / alpha)  # balance activation and weight precision
    t = np.clip(t, 1.0, max_scale)
    t = np.minimum(t, 1.0 / alpha)  # never beyond the tensor's present range
    if hi is not None:  # Clip(0, c): grow only channels that stay below c on every calibration row, with a margin
        ok = pre < hi * margin
        cap = np.where(pre > 0, hi * margin / np.maximum(pre, 1e-12), max_scale)
        t = np.where(ok, np.minimum(t, cap), 1.0)
    dead = post <= 0  # a channel that is never positive: leave it
    t[dead] = 1.0
    return np.maximum(t, 1.0)


def apply_scales(model, pair: Pair, t: np.ndarray) -> None:
    """Scale A's output channels by ``t`` and B's input channels by ``1 / t`` (in place)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1

    def put(name: str, value: np.ndarray, node, slot: int) -> None:
        if uses.get(name, 0) > 1:  # a shared initializer: give this node its own copy
            new = f"{name}_eq_{node.name}".replace("/", "_")
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), new))
            node.input[slot] = new
        else:
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    ka, kb = _kind(pair.a, inits), _kind(pair.b, inits)
    wa = numpy_helper.to_array(inits[pair.a.input[1]]).astype(np.float64)
    if ka == "gemm" and not node_attrs(pair.a).get("transB", 0):
        wa = wa * t[None, :]
    else:
        wa = wa * t.reshape((-1,) + (1,) * (wa.ndim - 1))
    put(pair.a.input[1], wa, pair.a, 1)
    if len(pair.a.input) > 2 and pair.a.input[2] in inits:
        put(pair.a.input[2], numpy_helper.to_array(inits[pair.a.input[2]]).astype(np.float64) * t, pair.a, 2)
    wb = numpy_helper.to_array(inits[pair.b.input[1]]).astype(np.float64)
    if kb == "depthwise":
        wb = wb / t.reshape((-1,) + (1,) * (wb.ndim - 1))
    elif kb == "dense":
        wb = wb / t.reshape((1, -1) + (1,) * (wb.ndim - 2))
    elif node_attrs(pair.b).get("transB", 0):
        wb = wb / t[None, :]
    else:
        wb = wb / t[:, None]
    put(pair.b.input[1], wb, pair.b, 1)


def equalize(model, batches_fn, *, mode: str = "exact", margin: float = 0.5, max_scale: float = 32.0,
             nodes_to_exclude=()) -> dict:
    """Equalize the chains of ``model`` (a float ONNX ModelProto, changed in place): ``mode`` ``exact`` — Relu and
    linear chains only, FP32 outputs unchanged for every input — or ``calibrated`` — Clip(0, c) chains too, unchanged
    on the calibration rows. ``batches_fn()`` yields calibration feeds batch by batch (statistics are collected
    in one pass, one batch at a time). Returns a report: chains, channels scaled, median and largest scale."""
    t0 = time.perf_counter()
    pairs = find_pairs(model, nodes_to_exclude, clip=mode == "calibrated")
    report = {"mode": mode, "chains": len(pairs), "channels_scaled": 0, "channels": 0}
    if not pairs:
        return report
    from onnx import numpy_helper

    stats = channel_stats(model, [p.tensor for p in pairs], batches_fn())
    inits = {i.name: i for i in model.graph.initializer}
    all_t = []
    for p in pairs:
        kb = _kind(p.b, inits)
        wb = numpy_helper.to_array(inits[p.b.input[1]])
        t = scales_for(p, stats, wb, kb, bool(node_attrs(p.b).get("transB", 0)), margin=margin, max_scale=max_scale)
        if np.any(t != 1.0):
            apply_scales(model, p, t)
            inits = {i.name: i for i in model.graph.initializer}
        all_t.append(t)
    t = np.concatenate(all_t)
    report.update(channels=int(t.size), channels_scaled=int((t > 1.0).sum()),
                  median_scale=round(float(np.median(t[t > 1.0])), 2) if (t > 1.0).any() else 1.0,
                  max_scale=round(float(t.max()), 2), rows=int(next(iter(stats.values()))["rows"]),
                  seconds=round(time.perf_counter() - t0, 1))
    log.info("equalization: %d of %d channels in %d chains scaled (median x%.2f, max x%.2f)",
             report["channels_scaled"], report["channels"], report["chains"], report["median_scale"],
             report["max_scale"])
    return report
