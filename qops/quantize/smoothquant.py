"""SmoothQuant (Xiao et al., 2023) for ONNX graphs, and activation statistics from calibration data.

Activation outliers concentrate in a few input channels; per-tensor activation scales then waste most of the
INT8 range. SmoothQuant divides each input channel j of a linear layer's activation by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies row j of the weight by s_j: the product is unchanged, the activation is easier to quantize
and the weight (quantized per output channel) absorbs the difficulty. Here the division is a ``Mul`` node
inserted before the layers that share the activation; every scaled weight is rewritten in place.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def activation_absmax(model, tensors: list[str], reader) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of ``tensors`` over all batches of a calibration ``reader``."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    stats: dict[str, np.ndarray] = {}
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        outs = dict(zip(names, sess.run(None, feed)))
        for t in tensors:
            a = np.abs(outs[t]).reshape(-1, outs[t].shape[-1]).max(axis=0)
            stats[t] = a if t not in stats else np.maximum(stats[t], a)
    reader.rewind()
    return stats


def smooth(model, reader, alpha: float = 0.5, op_types=("MatMul", "Gemm"), nodes_to_exclude=()) -> dict:
    """Apply SmoothQuant to ``model`` in place. Returns a report (activations smoothed, scale ranges)."""
    from onnx import helper, numpy_helper

    from qops.quantize.graph import initializers, weighted_nodes

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
    stats = activation_absmax(model, list(groups), reader)
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    report = {"smoothed": 0, "alpha": alpha, "scales": {}}
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
        s = np.power(np.maximum(xmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
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
    # insert each Mul right after the producer of its activation (graph inputs: at the front)
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
    log.info("SmoothQuant (alpha=%.2f): %d activations smoothed", alpha, report["smoothed"])
    return report
