"""ONNX graph inspection and small rewrites used by the recipes.

- :func:`graph_kind` / :func:`choose_mode`: dynamic quantization for attention and recurrent graphs (activation
  ranges vary per input, so calibrated ranges clip), static for convolutional and MLP graphs.
- :func:`check_model`: opset, external data (> 2 GB), and which ops no recipe quantizes (reported, left FP32).
- :func:`name_nodes`, :func:`gemm_to_matmul`: make node names stable (node fallback refers to them) and turn
  ``Gemm`` into ``MatMul + Add`` for quantizers that only handle MatMul (INT4 MatMulNBits).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qops.data.kinds.base import dynamic_batch_fix
from qops.errors import ModelError

log = logging.getLogger(__name__)

MIN_OPSET = 10  # QuantizeLinear/DequantizeLinear exist from opset 10; ORT quantization wants >= 10
TARGET_OPSET = 17  # what an old model is upgraded to
PROTOBUF_LIMIT = 2 * 1024**3
RECURRENT_OPS = {"LSTM", "GRU", "RNN"}
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}
# ops ONNX Runtime's quantizers have kernels for; anything else in a graph stays FP32 by design
QUANTIZABLE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather", "EmbedLayerNormalization"}
# ops that carry no weights and cost little: not worth reporting as "left in FP32"
_TRIVIAL = {"Relu", "Add", "Mul", "Sub", "Div", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
            "Concat", "Slice", "Shape", "Cast", "Identity", "Constant", "Gather", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Softmax", "Sigmoid", "Tanh", "Clip", "BatchNormalization", "Split",
            "LayerNormalization", "Erf", "Pow", "Sqrt", "ReduceMean", "Where", "Equal", "Expand", "Gelu",
            "ConstantOfShape", "Range", "Neg", "Exp", "Log", "Max", "Min", "Dropout"}


@dataclass
class ModelReport:
    path: str
    opset: int
    upgraded_from: int | None
    external_data: bool
    size_bytes: int
    kind: str
    op_counts: dict = field(default_factory=dict)
    unquantizable: dict = field(default_factory=dict)  # op type -> count, ops with no quantized kernel

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load(path: str | os.PathLike, external: bool = True):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=external)
    except Exception as e:
        raise ModelError(f"{path} is not a readable ONNX model: {e}", "pass an .onnx file.") from None


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def uses_external_data(model) -> bool:
    from onnx.external_data_helper import uses_external_data as _uses

    return any(_uses(t) for t in model.graph.initializer)


def save_model(model, path: str | os.PathLike, external: bool = False) -> None:
    """Write ``model``; with ``external``, its tensors go to one ``<name>.data`` file beside it (> 2 GB models)."""
    import onnx

    path = Path(path)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def model_size(path: str | os.PathLike) -> int:
    """Bytes of the model file plus its external data files."""
    p = Path(path)
    total = p.stat().st_size
    m = load(p, external=False)
    seen = set()
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                f = p.parent / e.value
                if f.is_file():
                    total += f.stat().st_size
    return total


def graph_kind(model) -> str:
    """``recurrent``, ``attention``, ``convolutional`` or ``mlp``."""
    ops = Counter(n.op_type for n in model.graph.node)
    if RECURRENT_OPS & set(ops):
        return "recurrent"
    if ATTENTION_OPS & set(ops):
        return "attention"
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    # scaled dot-product attention: MatMul of two activations feeding (maybe via Div/Add) a Softmax
    act_matmul_out = {n.output[0] for n in model.graph.node
                      if n.op_type == "MatMul" and not (set(n.input) & consts)}
    if act_matmul_out and ops.get("Softmax"):
        producers = {o: n for n in model.graph.node for o in n.output}
        for n in model.graph.node:
            if n.op_type != "Softmax":
                continue
            frontier, depth = [n.input[0]], 0
            while frontier and depth < 4:
                if any(t in act_matmul_out for t in frontier):
                    return "attention"
                frontier = [i for t in frontier if t in producers for i in producers[t].input if i not in consts]
                depth += 1
    if ops.get("Conv") or ops.get("ConvTranspose"):
        return "convolutional"
    return "mlp"


def choose_mode(kind: str) -> str:
    return "dynamic" if kind in ("attention", "recurrent") else "static"


def check_model(path: str | os.PathLike, upgraded_path: str | os.PathLike | None = None) -> ModelReport:
    """Inspect (and if needed upgrade) a model before quantization. Writes ``upgraded_path`` when the opset
    was upgraded and returns a report whose ``path`` is the model to quantize."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Model file {p} does not exist.", "pass the path of an FP32 .onnx model.")
    m = load(p, external=False)
    external = uses_external_data(m)
    size = model_size(p)
    if not external and size >= PROTOBUF_LIMIT:  # cannot happen for a valid file, but be explicit
        raise ModelError(f"{p} is {size / 1e9:.1f} GB in one protobuf (limit 2 GB).",
                         "re-save it with onnx.save(..., save_as_external_data=True).")
    inits = {i.name for i in m.graph.initializer}
    fixed = [(i.name, i.type.tensor_type.shape.dim[0].dim_value) for i in m.graph.input if i.name not in inits
             and i.type.HasField("tensor_type") and len(i.type.tensor_type.shape.dim)
             and i.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if fixed:
        name, n = fixed[0]
        raise ModelError(f"{p}: input {name!r} has its batch dimension fixed at {n}, but qops calibrates and "
                         "evaluates rows in batches.",
                         dynamic_batch_fix(name))
    opset = default_opset(m)
    upgraded_from = None
    if opset < MIN_OPSET:
        if upgraded_path is None:
            raise ModelError(f"{p} uses opset {opset}; quantization needs opset >= {MIN_OPSET}.",
                             f"upgrade it: onnx.version_converter.convert_version(model, {TARGET_OPSET}).")
        try:
            from onnx import version_converter

            full = load(p, external=True)
            up = version_converter.convert_version(full, TARGET_OPSET)
            onnx.checker.check_model(up)
        except Exception as e:
            raise ModelError(
                f"{p} uses opset {opset} (quantization needs >= {MIN_OPSET}) and the automatic upgrade to "
                f"opset {TARGET_OPSET} failed: {str(e).splitlines()[0][:200]}",
                f"re-export the model with opset_version >= {TARGET_OPSET} (torch.onnx.export(..., "
                f"opset_version={TARGET_OPSET})).") from None
        onnx.save(up, str(upgraded_path))
        log.warning("model %s upgraded from opset %d to %d before quantization", p.name, opset, TARGET_OPSET)
        upgraded_from, opset, p, m = opset, TARGET_OPSET, Path(upgraded_path), up
    ops = Counter(n.op_type for n in m.graph.node)
    unq = {op: c for op, c in sorted(ops.items()) if op not in QUANTIZABLE_OPS and op not in _TRIVIAL}
    return ModelReport(path=str(p), opset=opset, upgraded_from=upgraded_from, external_data=external,
                       size_bytes=size, kind=graph_kind(m), op_counts=dict(sorted(ops.items())), unquantizable=unq)


def name_nodes(model) -> int:
    """Give every unnamed node a unique, stable name (``<op>_<index>``); returns how many were named."""
    names = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            base = f"{n.op_type}_{i}"
            name, k = base, 0
            while name in names:
                k += 1
                name = f"{base}_{k}"
            n.name = name
            names.add(name)
            count += 1
    return count


def node_attrs(node) -> dict:
    """A node's attributes by name, as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def const_value(model, name: str):
    """An initializer's or Constant node's value, or None."""
    from onnx import numpy_helper

    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(node_attrs(n)["value"])
    return None


def clip_bounds(model, node) -> tuple[float | None, float | None]:
    """(min, max) of a Clip node (attributes before opset 11, inputs after); None where absent or not constant."""
    if node.op_type == "Relu":
        return 0.0, None
    a = node_attrs(node)
    if "min" in a or "max" in a:
        return a.get("min"), a.get("max")
    lo = const_value(model, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    hi = const_value(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def initializers(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def weighted_nodes(model, op_types) -> list:
    """(node, weight initializer name) for nodes of ``op_types`` whose weight input is a constant."""
    inits = initializers(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in op_types:
            continue
        w = n.input[1] if len(n.input) > 1 else None
        if w in inits:
            out.append((n, w))
    return out


def gemm_to_matmul(model) -> int:
    """Rewrite ``Gemm(A, B[, C])`` with a constant B, alpha=beta=1, transA=0 as ``MatMul(A, B') (+ C)``.

    MatMulNBits (INT4) and other MatMul-only quantizers then see the weights of linear layers exported as Gemm.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits = initializers(model)
    new_nodes, changed = [], 0
    for n in model.graph.node:
        attrs = node_attrs(n)
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(n)
            continue
        b = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            b = np.ascontiguousarray(b.T)
        wname = n.input[1] + "_kn"
        model.graph.initializer.append(numpy_helper.from_array(b, wname))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = n.output[0] + "_mm" if has_bias else n.output[0]
        new_nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name + "_matmul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "_bias"))
        changed += 1
    if changed:
        replace_nodes(model, new_nodes)
        onnx.checker.check_model(model)
    return changed


def replace_nodes(model, nodes) -> None:
    """Make ``nodes`` the graph's node list and drop the initializers no node reads any more."""
    nodes = list(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def consumers_of(model) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def strip_debug_metadata(model) -> int:
    """Drop per-node debug metadata (``torch.onnx`` stores stack traces and FX node text on every node) and node
    doc strings; returns the bytes removed. Inference ignores them; they can be 1-2% of an INT8 file."""
    before = sum(n.ByteSize() for n in model.graph.node)
    for n in model.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    return before - sum(n.ByteSize() for n in model.graph.node)
