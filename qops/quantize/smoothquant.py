"""SmoothQuant (Xiao et al., 2023) for ONNX graphs, and activation statistics from calibration data.

Activation outliers concentrate in a few input channels; per-tensor activation scales then waste most of the
INT8 range. SmoothQuant divides each input channel j of a linear layer's activation by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies row j of the weight by s_j: the product is unchanged, the activation is easier to quantize
and the weight (quantized per output channel) absorbs the difficulty. Here the division is a ``Mul`` node
inserted before the layers that share the activation; every scaled weight is rewritten in place.

``alpha="auto"`` picks the strength per activation (as Intel Neural Compressor's auto-alpha does): on a sample of
the calibration activations, each alpha of a grid (and no smoothing) is scored by the relative error of the
layers' outputs with the activation quantized per tensor (uint8, asymmetric: ONNX Runtime's dynamic and static
activation scheme) and the weights per output channel (int8, symmetric), and the best one is used.
"""

from __future__ import annotations

import logging

import numpy as np

from qops.calibration.collect import AbsMax, reader_feeds, tap
from qops.quantize.graph import initializers, weighted_nodes

log = logging.getLogger(__name__)


def activation_absmax(model, tensors: list[str], reader) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of ``tensors`` over all batches of a calibration ``reader``."""
    stats = {t: AbsMax() for t in tensors}
    tap(model, stats.items(), reader_feeds(reader))
    return {t: c.result() for t, c in stats.items() if c.rows}


AUTO_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


class RowSample:
    """Up to ``max_rows`` rows (all leading axes flattened) drawn uniformly from every batch, and as many drawn
    from those at the end: a collector (:mod:`qops.calibration.collect`) whose memory is ``max_rows`` rows per
    batch. Samplers sharing one ``rng`` draw in the order they are fed."""

    def __init__(self, rng, max_rows: int):
        self.rng, self.max_rows, self.parts = rng, max_rows, []

    def collect(self, x) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.parts.append(x[self.rng.choice(len(x), size=min(len(x), self.max_rows), replace=False)])

    def result(self) -> np.ndarray:
        x = np.concatenate(self.parts) if self.parts else np.zeros((0, 1), np.float32)
        return x[self.rng.choice(len(x), size=min(len(x), self.max_rows), replace=False)] if len(x) else x


def activation_samples(model, tensors: list[str], reader, max_rows: int = 1024, seed: int = 0) -> dict:
    """Per tensor: up to ``max_rows`` rows (all leading axes flattened) sampled uniformly from every batch of a
    calibration reader, and the per-channel max |x| over all rows."""
    rng = np.random.default_rng(seed)
    absmax = {t: AbsMax() for t in tensors}
    rows = {t: RowSample(rng, max_rows) for t in tensors}
    tap(model, [p for t in tensors for p in ((t, absmax[t]), (t, rows[t]))], reader_feeds(reader))
    return {"samples": {t: c.result() for t, c in rows.items()},
            "absmax": {t: c.result() for t, c in absmax.items() if c.rows}}


def _fake_quant_act(x: np.ndarray) -> np.ndarray:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:  # w: [in, out], one scale per output column
    scale = np.abs(w).max(axis=0, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def best_alpha(x: np.ndarray, weights: list[np.ndarray], xmax: np.ndarray, wmax: np.ndarray,
               grid=AUTO_ALPHAS) -> tuple[float | None, dict]:
    """The alpha (None: no smoothing) whose smoothed, quantized layers reproduce ``x @ W`` best on the sample."""
    ref = [x @ w for w in weights]
    den = sum(float(np.sum(r**2)) for r in ref) or 1.0
    errors = {}
    for a in (None, *grid):
        s = np.ones_like(xmax) if a is None else np.clip(
            np.power(np.maximum(xmax, 1e-5), a) / np.power(np.maximum(wmax, 1e-5), 1 - a), 1e-4, 1e4)
        xq = _fake_quant_act(x / s)
        err = sum(float(np.sum((xq @ _fake_quant_weight(w * s[:, None]) - r) ** 2)) for w, r in zip(weights, ref))
        errors["none" if a is None else a] = err / den
    best = min(errors, key=errors.get)
    return (None if best == "none" else float(best)), errors


def insert_after_producers(model, new_nodes: list) -> None:
    """Insert each ``(activation, node)`` right after the node producing ``activation`` (graph inputs: first),
    keeping the graph topologically sorted."""
    producers = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    nodes = list(model.graph.node)
    after: dict[int, list] = {}
    for act, n in new_nodes:
        after.setdefault(producers.get(act, -1), []).append(n)
    ordered = after.get(-1, [])
    for i, n in enumerate(nodes):
        ordered.append(n)
        ordered += after.get(i, [])
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def smooth(model, reader, alpha: float | str = 0.5, op_types=("MatMul", "Gemm"), nodes_to_exclude=()) -> dict:
    """Apply SmoothQuant to ``model`` in place. Returns a report (activations smoothed, scale ranges)."""
    from onnx import helper, numpy_helper

    inits = initializers(model)
    exclude = set(nodes_to_exclude)
    groups: dict[str, list] = {}
    for node, wname in weighted_nodes(model, set(op_types)):
        if node.name in exclude or node.input[0] in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        if numpy_helper.to_array(inits[wname]).ndim != 2:
            continue
        groups.setdefault(node.input[0], []).append((node, wname, bool(attrs.get("transB", 0))))
    if not groups:
        return {"smoothed": 0, "alpha": alpha}
    auto = alpha == "auto"
    if auto:
        captured = activation_samples(model, list(groups), reader)
        stats, samples = captured["absmax"], captured["samples"]
    else:
        stats = activation_absmax(model, list(groups), reader)
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    report = {"smoothed": 0, "alpha": alpha, "scales": {}}
    if auto:
        report["alphas"] = {}
    new_nodes = []
    for act, layers in groups.items():
        # a weight shared with another consumer cannot be rescaled for this activation alone
        if any(consumers.get(w, 0) > 1 for _, w, _ in layers):
            continue
        ws = {w: numpy_helper.to_array(inits[w]).astype(np.float32) for _, w, _ in layers}
        wmax = np.max([np.abs(ws[w].T if tb else ws[w]).max(axis=1) for _, w, tb in layers], axis=0)
        xmax = stats[act]
        if xmax.shape != wmax.shape:
            continue
        a = alpha
        if auto:
            mats = [(ws[w].T if tb else ws[w]) for _, w, tb in layers]  # [in, out]
            a, errors = best_alpha(samples[act].astype(np.float32), mats, xmax, wmax)
            report["alphas"][act] = {"alpha": a, "relative_error": {str(k): round(v, 7) for k, v in errors.items()}}
            if a is None:
                continue
        s = np.power(np.maximum(xmax, 1e-5), a) / np.power(np.maximum(wmax, 1e-5), 1 - a)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        for node, w, tb in layers:
            scaled = ws[w] * (s[None, :] if tb else s[:, None])  # W[k, n] rows (or W^T columns) times s
            inits[w].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), w))
        inv = act.replace("/", "_").replace(":", "_") + "_smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        out = act + "_smoothed"
        new_nodes.append((act, helper.make_node("Mul", [act, inv], [out], name=inv + "_mul")))
        for node, _, _ in layers:
            node.input[0] = out
        report["smoothed"] += 1
        report["scales"][act] = [float(s.min()), float(s.max())]
    insert_after_producers(model, new_nodes)
    log.info("SmoothQuant (alpha=%s): %d activations smoothed", alpha, report["smoothed"])
    return report
