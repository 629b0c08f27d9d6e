"""Per-layer precision of a static QDQ model: what each weighted node really runs in, and keeping the layers that a
recipe leaves out of INT8 (tuning fallback, mixed precision) out of INT8 for real.

ONNX Runtime (1.20 and later) has a graph optimization, ``WeightBiasQuantization``, that runs in every session at
the default optimization level: a Conv/ConvTranspose/Gemm whose input comes from a DequantizeLinear and whose output
goes to a QuantizeLinear but whose weight is a float initializer gets its weight quantized **per tensor** to INT8
when the model is loaded. A layer kept in FP32 inside a static QDQ graph — exactly what node fallback and mixed
precision produce — is then silently run with the coarsest INT8 weights there are (measured on EfficientNet-Lite0:
keeping the 16 depthwise convolutions "in FP32" dropped top-1 agreement with FP32 from 0.91 to 0.67).

:func:`protect_wide_layers` stores such a layer's weight as INT16 per output channel behind a DequantizeLinear
(ONNX Runtime's ``com.microsoft`` domain, which takes 16-bit types at any opset): the optimization leaves a
quantized weight alone, no INT8 kernel takes a 16-bit weight, so the layer runs in float with weights within
2^-16 of their FP32 values. :func:`precision_map` reads what every weighted node ends up with.
"""

from __future__ import annotations

import numpy as np

from qops.quantize.graph import consumers_of, node_attrs, replace_nodes

WEIGHTED = ("Conv", "ConvTranspose", "Gemm")
MS_DOMAIN = "com.microsoft"


def _leads_to_quantize(node, consumers) -> bool:
    """ONNX Runtime's test: a single path, through Relu/Clip only, to a QuantizeLinear."""
    cur = node
    while True:
        if len(cur.output) != 1:
            return False
        nxt = consumers.get(cur.output[0], [])
        if len(nxt) != 1:
            return False
        if nxt[0].op_type == "QuantizeLinear":
            return True
        if nxt[0].op_type not in ("Relu", "Clip"):
            return False
        cur = nxt[0]


def with_activations(model, names) -> list[str]:
    """``names`` plus the Relu/Clip that is the only consumer of each: kept out of INT8 together, so the layer's
    output is not quantized before its activation clips it (a pre-activation range is far wider than a
    post-activation one, and quantizing both costs twice)."""
    consumers = consumers_of(model)
    by_name = {n.name: n for n in model.graph.node}
    out = list(names)
    for name in names:
        n = by_name.get(name)
        while n is not None and len(n.output) == 1:
            nxt = consumers.get(n.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Relu", "Clip") or nxt[0].name in out:
                break
            out.append(nxt[0].name)
            n = nxt[0]
    return out


def at_risk(model) -> list:
    """Weighted nodes with a float weight initializer that ONNX Runtime would quantize per tensor at load time."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = consumers_of(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in WEIGHTED or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if inits[n.input[1]].data_type != TensorProto.FLOAT:
            continue
        p = producer.get(n.input[0])
        if p is None or p.op_type != "DequantizeLinear" or not _leads_to_quantize(n, consumers):
            continue
        out.append(n)
    return out


def _weight_axis(node) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node_attrs(node).get("transB", 0) else 1
    return 0


def protect_wide_layers(model) -> list[str]:
    """Give every at-risk node (see :func:`at_risk`) an INT16 per-channel weight; returns their names."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = []
    new_nodes = []
    for n in at_risk(model):
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        axis = _weight_axis(n) if n.op_type != "ConvTranspose" or node_attrs(n).get("group", 1) == 1 else None
        if axis is None:  # grouped transposed convolution: one scale for the tensor
            scale = np.array(max(float(np.abs(w).max()), 1e-12) / 32767.0)
        else:
            red = tuple(d for d in range(w.ndim) if d != axis)
            scale = np.maximum(np.abs(w).max(axis=red), 1e-12) / 32767.0
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -32767, 32767).astype(np.int16)
        base = f"{n.name}_w16".replace("/", "_").lstrip("_")
        model.graph.initializer.extend([
            numpy_helper.from_array(q, base + "_q"),
            numpy_helper.from_array(scale.astype(np.float32), base + "_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int16), base + "_zp"),
        ])
        attrs = {"axis": axis} if scale.ndim else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zp"],
                                          [base + "_dq"], name=base + "_DequantizeLinear", domain=MS_DOMAIN, **attrs))
        n.input[1] = base + "_dq"
        done.append(n.name)
    if not done:
        return done
    replace_nodes(model, new_nodes + list(model.graph.node))  # DequantizeLinear first: still topologically sorted
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return done


def precision_map(model) -> dict[str, str]:
    """Weighted node -> what its weight is stored as: ``int8``/``uint8``/``int16``/``int4``... (with
    ``per-channel`` or ``per-tensor``) behind a DequantizeLinear, ``fp32``/``fp16`` for a float initializer, or the
    kernel name for fused integer ops (QLinearConv, MatMulInteger, MatMulNBits...)."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits", "QGemm",
                         "DynamicQuantizeMatMul"):
            out[n.name] = n.op_type
            continue
        if n.op_type not in WEIGHTED + ("MatMul",) or len(n.input) < 2:
            continue
        w = n.input[1]
        if w in inits:
            if n.op_type == "MatMul" and len(inits[w].dims) < 2:
                continue
            out[n.name] = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}.get(inits[w].data_type, "other")
            continue
        p = producer.get(w)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
            t = inits[p.input[0]]
            s = inits.get(p.input[1])
            per = "per-channel" if s is not None and len(s.dims) and int(np.prod(s.dims)) > 1 else "per-tensor"
            out[n.name] = f"{helper.tensor_dtype_to_np_dtype(t.data_type).name} {per}"
    return out


def summarize(pmap: dict[str, str]) -> dict[str, int]:
    """Count of weighted nodes per precision."""
    counts: dict[str, int] = {}
    for v in pmap.values():
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
