"""Non-uniform (codebook) weight quantization for ONNX models.

Each weight tensor of the chosen ops gets its own codebook of ``2**bits`` FP32 values — k-means centroids
(fitted by 1-D Lloyd iterations from quantile seeds) or signed powers of two scaled to the tensor's range —
and is stored as ``bits``-wide indices (UINT4 for 4 bits, two per byte). The graph decodes them with
``Cast(indices -> int64) -> Gather(codebook)``, which ONNX Runtime constant-folds when the session
loads: the file is ~8x smaller than FP32, but the model in memory and its speed are FP32's.
This is a size-oriented technique (storage, download, flash), and reports itself as such.
"""

from __future__ import annotations

import numpy as np

from qops.quantize.graph import default_opset, weighted_nodes


def kmeans_codebook(w: np.ndarray, k: int, iters: int = 25, sample: int = 200_000, seed: int = 0) -> np.ndarray:
    """Sorted 1-D k-means centroids of ``w`` (Lloyd, quantile initialisation, sample for large tensors)."""
    x = w.ravel().astype(np.float64)
    if x.size > sample:
        x = np.random.default_rng(seed).choice(x, sample, replace=False)
    x = np.sort(x)
    c = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        c = np.unique(c)
        edges = (c[1:] + c[:-1]) / 2
        idx = np.searchsorted(edges, x)
        sums = np.bincount(idx, weights=x, minlength=len(c))
        cnt = np.bincount(idx, minlength=len(c))
        new = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    c = np.unique(c)
    if len(c) < k:  # fewer distinct values than centroids: pad (never selected)
        c = np.concatenate([c, np.full(k - len(c), c[-1])])
    return np.sort(c).astype(np.float32)


def pow2_codebook(w: np.ndarray, k: int) -> np.ndarray:
    """0 and ±scale·2^-e for e = 0..(k/2 - 2): a logarithmic codebook (shifts instead of multiplies)."""
    half = k // 2 - 1
    scale = float(np.max(np.abs(w))) or 1.0
    # round the scale itself to a power of two so every entry is an exact power of two
    scale = float(2.0 ** np.ceil(np.log2(scale)))
    mags = scale * 2.0 ** -np.arange(half, dtype=np.float64)
    book = np.concatenate([-mags, [0.0], mags[::-1]])
    if len(book) < k:
        book = np.concatenate([book, np.full(k - len(book), book[-1])])
    return np.sort(book).astype(np.float32)


def assign(w: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry for every weight."""
    edges = (book[1:] + book[:-1]) / 2
    return np.searchsorted(edges, w.ravel()).reshape(w.shape).astype(np.uint8)


def _channel_axis(node) -> int:
    """Output-channel axis of a node's weight: 0 for Conv and Gemm(transB=1), the last for MatMul/Gemm."""
    from onnx import helper

    if node.op_type == "Gather":
        return 0  # embedding rows
    if node.op_type in ("Conv", "ConvTranspose"):
        return 0 if node.op_type == "Conv" else 1
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else -1


def quantize_model(model, op_types, kind: str = "kmeans", bits: int = 4, nodes_to_exclude=(),
                   min_elements: int = 256, per_channel: bool = True):
    """Replace the weights of ``op_types`` nodes by codebook indices: per tensor, or (``per_channel``) one codebook
    over the channel-normalised weights plus one FP32 scale per output channel.

    Returns ``(model, report)``: the model is converted to opset 21 (UINT4 tensors and Cast) when the
    indices are 4-bit; the report lists weights replaced, per-weight SQNR (dB) and nodes skipped.
    """
    from onnx import TensorProto, helper, numpy_helper, version_converter

    if bits <= 4 and default_opset(model) < 21:
        model = version_converter.convert_version(model, 21)
    k = 2**bits
    itype = TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8
    inits = {i.name: i for i in model.graph.initializer}
    done, sqnr, new_nodes, skipped = {}, {}, [], []
    exclude = set(nodes_to_exclude)
    gathers = [(n, n.input[0]) for n in model.graph.node
               if n.op_type == "Gather" and "Gather" in op_types and n.input[0] in inits]
    for node, wname in weighted_nodes(model, set(op_types) - {"Gather"}) + gathers:
        if node.name in exclude:
            skipped.append(node.name)
            continue
        if wname in done:
            continue
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        if w.size < min_elements:
            skipped.append(node.name)
            continue
        base = wname.replace("/", "_").replace(":", "_")
        make = kmeans_codebook if kind == "kmeans" else pow2_codebook
        if per_channel and w.ndim >= 2:
            # one shared codebook over channel-normalised weights, times a scale per output channel: channels of
            # very different ranges (e.g. BatchNorm folded into a conv) each keep 16 usable levels
            axis = _channel_axis(node) % w.ndim
            red = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.max(np.abs(w), axis=red, keepdims=True).astype(np.float32)
            scale[scale == 0] = 1.0
            norm = w / scale
            book = make(norm, k)
            idx = assign(norm, book)
            err = w - book[idx] * scale
            t_idx = _index_tensor(base + "_cb_idx", itype, idx)
            t_book = numpy_helper.from_array(book, base + "_codebook")
            t_scale = numpy_helper.from_array(scale, base + "_cb_scale")
            model.graph.initializer.extend([t_idx, t_book, t_scale])
            new_nodes += [
                helper.make_node("Cast", [t_idx.name], [base + "_cb_i"], to=TensorProto.INT64, name=base + "_cb_cast"),
                helper.make_node("Gather", [t_book.name, base + "_cb_i"], [base + "_cb_n"], axis=0,
                                 name=base + "_cb_gather"),
                helper.make_node("Mul", [base + "_cb_n", t_scale.name], [wname], name=base + "_cb_scale_mul"),
            ]
            sig = w
        else:
            book = make(w, k)
            idx = assign(w, book)
            err = w - book[idx]
            t_idx = _index_tensor(base + "_cb_idx", itype, idx)
            t_book = numpy_helper.from_array(book, base + "_codebook")
            model.graph.initializer.extend([t_idx, t_book])
            new_nodes += [
                helper.make_node("Cast", [t_idx.name], [base + "_cb_i"], to=TensorProto.INT64, name=base + "_cb_cast"),
                helper.make_node("Gather", [t_book.name, base + "_cb_i"], [wname], axis=0, name=base + "_cb_gather"),
            ]
            sig = w
        sqnr[node.name] = float(10 * np.log10((sig**2).sum() / max((err**2).sum(), 1e-30)))
        done[wname] = node.name
    # the decoded weight keeps the initializer's name, so consumers are untouched; drop the FP32 original
    keep = [t for t in model.graph.initializer if t.name not in done]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + nodes)  # decoders first: topological order holds
    return model, {"weights": len(done), "sqnr_db": sqnr, "skipped": skipped, "codebook": kind, "bits": bits,
                   "granularity": "per-channel" if per_channel else "per-tensor"}


def _index_tensor(name: str, itype: int, idx: np.ndarray):
    """Indices as a raw tensor: UINT4 packed two per byte (low nibble first), else UINT8."""
    from onnx import TensorProto, helper

    flat = idx.ravel().astype(np.uint8)
    if itype == TensorProto.UINT4:
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        flat = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, itype, list(idx.shape), flat.tobytes(), raw=True)
