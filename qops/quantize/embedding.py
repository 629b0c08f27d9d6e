"""Embedding tables quantized per row: INT8 codes with one scale per token.

ONNX Runtime's dynamic quantizer gives a ``Gather`` weight one scale for the whole table, so a few large rows
set the step for every token; its blockwise ``GatherBlockQuantized`` takes only 4 bits. Here each row of a
large table gets its own symmetric scale and stays INT8 (the same bytes as per-tensor INT8, 1/4 of FP32):

    Gather(W, ids)  ->  Cast(Gather(W_int8, ids), float) * Gather(scale, ids)

Only the rows a batch uses are dequantized, so the cost is the Gather of a few rows, not of the table.
"""

from __future__ import annotations

import logging

import numpy as np

from qops.quantize.graph import initializers

log = logging.getLogger(__name__)


def quantize_embeddings(model, min_rows: int = 256, nodes_to_exclude=()) -> dict:
    """Rewrite every ``Gather`` on a 2-D float initializer with at least ``min_rows`` rows (axis 0) in place.
    Returns a report: the tables rewritten, their shapes, and the worst row's relative error."""
    from onnx import TensorProto, helper, numpy_helper

    inits = initializers(model)
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    report = {"tables": [], "scheme": "INT8 symmetric, one scale per row (token)"}
    new_nodes, done = [], {}
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.name in set(nodes_to_exclude) or node.input[0] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_name = node.input[0]
        w = numpy_helper.to_array(inits[w_name])
        if attrs.get("axis", 0) != 0 or w.ndim != 2 or w.shape[0] < min_rows or w.dtype != np.float32:
            continue
        if w_name not in done:
            amax = np.abs(w).max(axis=1, keepdims=True)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            err = np.abs(q * scale - w).max(axis=1) / np.maximum(amax[:, 0], 1e-12)
            inits[w_name].CopyFrom(numpy_helper.from_array(q, w_name + "_int8"))
            model.graph.initializer.append(numpy_helper.from_array(scale, w_name + "_row_scale"))
            done[w_name] = (w_name + "_int8", w_name + "_row_scale")
            report["tables"].append({"weight": w_name, "shape": list(w.shape), "max_rel_error": float(err.max())})
        qw, sc = done[w_name]
        out = node.output[0]
        base = node.name or out
        node.input[0] = qw
        node.output[0] = out + "_int8_rows"
        new_nodes.append((node, [
            helper.make_node("Gather", [sc, node.input[1]], [out + "_row_scales"], name=base + "_scales", axis=0),
            helper.make_node("Cast", [out + "_int8_rows"], [out + "_rows_f"], name=base + "_cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Mul", [out + "_rows_f", out + "_row_scales"], [out], name=base + "_dequant"),
        ]))
    if not new_nodes:
        return {**report, "tables": []}
    nodes = list(model.graph.node)
    extra = {id(n): more for n, more in new_nodes}
    ordered = []
    for n in nodes:
        ordered.append(n)
        ordered += extra.get(id(n), [])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    log.info("embeddings: %d table(s) quantized to INT8 per row", len(report["tables"]))
    return report
