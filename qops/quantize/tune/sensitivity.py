"""Node sensitivity for the fallback phase: each quantized node's lost signal-to-quantization-noise ratio
(SQNR of its output against FP32 minus that of its input), streamed over the ranking rows in chunks of bounded
memory, overall and on the slices that fail."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qops.calibration.collect import tap_session
from qops.data import read_table
from qops.quantize.graph import name_nodes
from qops.quantize.readers import TableCalibrationReader
from qops.targets import Recipe


def stream_sqnr_sums(fm, qm, pairs: list[tuple[str, str]], weights: list[str], reader, max_batches: int,
                     memory_budget: int) -> dict:
    """Run the float and the quantized model on the same rows, chunk by chunk, and keep per tensor pair
    (float tensor, quantized tensor) of ``pairs`` only the sums SQNR needs: ``{(f, q): [sum f^2, sum (f - q)^2,
    shapes differ]}``, plus ``{("weight", q): array}`` for the quantized model's dequantized ``weights``
    (constants, kept once).
    Each reader batch is split into chunks of as many rows as fit ``memory_budget`` bytes of tapped tensors
    (measured on a first one-row chunk), so a CNN's intermediate maps never pile up over the rows."""
    f_wanted = sorted({f for f, _ in pairs})
    q_wanted = sorted({q for _, q in pairs} | set(weights))
    fs, f_names = tap_session(fm, f_wanted)
    qs, q_names = tap_session(qm, q_wanted)
    sums: dict = {}
    chunk = 1
    reader.rewind()
    for _ in range(max_batches):
        feed = reader.get_next()
        if feed is None:
            break
        rows = len(next(iter(feed.values())))
        start = 0
        while start < rows:
            part = {k: v[start:start + chunk] for k, v in feed.items()}
            start += chunk
            fo = dict(zip(f_names, fs.run(None, part)))
            qo = dict(zip(q_names, qs.run(None, part)))
            if chunk == 1:  # size the next chunks from what one row's tensors take
                per_row = sum(np.asarray(a).nbytes for a in fo.values()) + sum(
                    np.asarray(a).nbytes for a in qo.values())
                chunk = max(1, int(memory_budget // max(per_row, 1)))
            for f, q in pairs:
                if f not in fo or q not in qo:
                    continue
                a, b = np.asarray(fo[f], np.float64), np.asarray(qo[q], np.float64)
                acc = sums.setdefault((f, q), [0.0, 0.0, False])
                if a.shape != b.shape:
                    acc[2] = True
                    continue
                acc[0] += float(np.sum(a * a))
                acc[1] += float(np.sum((a - b) ** 2))
            for q in weights:
                if ("weight", q) not in sums and q in qo:
                    sums[("weight", q)] = np.asarray(qo[q])
    reader.rewind()
    return sums


def rank_nodes(float_model: str | os.PathLike, quantized_model: str | os.PathLike, reader, op_types,
               max_batches: int = 8, memory_budget: int = 256 << 20) -> list[dict]:
    """Every quantized node ranked by the signal-to-quantization-noise ratio it loses (worst first).

    For each node of the float model that the quantized model changed (its op type is among ``op_types``, or
    any op when ``op_types`` is empty; it was replaced, or reads a DequantizeLinear output), as ONNX Runtime's
    ``qdq_loss_debug`` matches them: the node's output in the quantized model, before and after its own
    QuantizeLinear/DequantizeLinear pair, against the float output, minus the SQNR of its activation inputs;
    the SQNR of its dequantized weights is reported beside it. Over up to ``max_batches`` batches of ``reader``,
    streamed (:func:`stream_sqnr_sums`): memory is bounded by ``memory_budget``, not by the number of rows.
    """
    import onnx

    fm = onnx.load(str(float_model))
    name_nodes(fm)
    qm = onnx.load(str(quantized_model))
    producer = {o: n for n in qm.graph.node for o in n.output}
    by_name = {n.name: n for n in qm.graph.node}
    consumers: dict[str, list] = {}
    for n in qm.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    f_inits = {i.name for i in fm.graph.initializer}
    graph_inputs = {i.name for i in fm.graph.input}
    wanted_ops = set(op_types or ())

    def dq_of(t: str) -> str | None:
        """The dequantized copy of tensor ``t`` in the quantized model (QuantizeLinear -> DequantizeLinear)."""
        for qn in consumers.get(t, []):
            if qn.op_type == "QuantizeLinear":
                for dn in consumers.get(qn.output[0], []):
                    if dn.op_type == "DequantizeLinear":
                        return dn.output[0]
        return None

    layers = []
    for n in fm.graph.node:
        if not n.output or (wanted_ops and n.op_type not in wanted_ops) or n.output[0] not in producer:
            continue
        qn = by_name.get(n.name)
        changed = qn is None or qn.op_type != n.op_type or any(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in qn.input)
        if not changed:
            continue
        acts = [i for i in n.input if i and i not in f_inits]
        weights = []
        if qn is not None:
            for i in qn.input:
                p = producer.get(i)
                if p is not None and p.op_type == "DequantizeLinear" and p.input[0] not in producer:
                    weights.append(i)  # DequantizeLinear of a constant: a quantized weight
        layers.append({"node": n.name, "op_type": n.op_type, "acts": acts, "out": n.output[0],
                       "out_dq": dq_of(n.output[0]), "weights": weights,
                       "float_weights": [i for i in n.input if i in f_inits]})
    if not layers:
        return []
    f_wanted = sorted({t for L in layers for t in L["acts"] + [L["out"]]} - graph_inputs)
    q_have = set(producer) | {i.name for i in qm.graph.input}
    f_have = set(f_wanted)
    pairs = sorted({(L["out"], t) for L in layers for t in (L["out"], L["out_dq"]) if t and t in q_have}
                   | {(a, a) for L in layers for a in L["acts"] if a in f_have and a in q_have})
    weights = sorted({w for L in layers for w in L["weights"] if w in q_have})
    sums = stream_sqnr_sums(fm, qm, [p for p in pairs if p[0] in f_have], weights, reader, max_batches,
                            memory_budget)

    def sqnr(pair: tuple[str, str]) -> float:
        """SQNR (dB) of quantized tensor pair[1] against float tensor pair[0], from the streamed sums."""
        got = sums.get(pair)
        if got is None or got[2]:  # never seen, or shapes differ
            return float("nan")
        signal, noise, _ = got
        return float("inf") if noise == 0 else float(10 * np.log10(max(signal, 1e-30) / noise))

    f_weights = {i.name: onnx.numpy_helper.to_array(i) for i in fm.graph.initializer}
    ranked = []
    for L in layers:
        outs = [sqnr((L["out"], t)) for t in (L["out"], L["out_dq"]) if t]
        outs = [v for v in outs if not np.isnan(v)]
        if not outs:
            continue
        s_out = min(outs)
        ins = [sqnr((a, a)) for a in L["acts"]]
        ins = [v for v in ins if not np.isnan(v)]
        s_in = min(ins) if ins else float("inf")  # graph inputs reach both models unchanged
        if np.isfinite(s_in):
            lost = s_in - s_out
        else:
            lost = 60.0 - s_out if np.isfinite(s_out) else 0.0
        w_sqnr = None
        for wq, wf in zip(L["weights"], L["float_weights"]):
            w = sums.get(("weight", wq))
            if w is not None and wf in f_weights and w.shape == f_weights[wf].shape:
                ref = np.asarray(f_weights[wf], np.float64).ravel()
                noise = float(np.sum((ref - np.asarray(w, np.float64).ravel()) ** 2))
                v = float("inf") if noise == 0 else float(10 * np.log10(max(float(np.sum(ref**2)), 1e-30) / noise))
                w_sqnr = v if w_sqnr is None else min(w_sqnr, v)
        ranked.append({"node": L["node"], "op_type": L["op_type"],
                       "sqnr_out_db": round(s_out, 2) if np.isfinite(s_out) else None,
                       "sqnr_in_db": round(s_in, 2) if np.isfinite(s_in) else None,
                       "sqnr_lost_db": round(lost, 2),
                       "weight_sqnr_db": None if w_sqnr is None or not np.isfinite(w_sqnr) else round(w_sqnr, 2)})
    ranked.sort(key=lambda r: (-r["sqnr_lost_db"], r["sqnr_out_db"] if r["sqnr_out_db"] is not None else 1e9))
    return ranked


def merge_rankings(rankings: dict[str, list[dict]]) -> list[dict]:
    """One ranking from several row sets (overall, failing slices): each node at its worst loss, worst first."""
    best: dict[str, dict] = {}
    for rows, ranking in rankings.items():
        for r in ranking:
            cur = best.get(r["node"])
            if cur is None or r["sqnr_lost_db"] > cur["sqnr_lost_db"]:
                best[r["node"]] = dict(r, worst_on=f"{r['worst_on']} rows of {rows}" if "worst_on" in r else rows)
    return sorted(best.values(), key=lambda r: -r["sqnr_lost_db"])


def _slice_table(validation, key: str, work: Path) -> Path | None:
    """Rows of ``validation`` in slice ``key`` ('col=value & col2=value2'), written to a parquet file."""
    df = read_table(validation, "validation set")
    mask = np.ones(len(df), dtype=bool)
    for part in key.split(" & "):
        col, _, value = part.partition("=")
        if col not in df.columns:
            return None
        mask &= (df[col].astype("string").fillna("missing") == value).to_numpy()
    if not mask.any():
        return None
    import hashlib

    path = work / f"slice-{hashlib.sha1(key.encode()).hexdigest()[:12]}.parquet"
    df[mask].to_parquet(path)
    return path


RANK_BATCH, RANK_BATCHES = 32, 64  # node ranking reads up to 2,048 rows, 32 at a time (32 images: 19 MB)


def rank_for(model, quantized_path, recipe: Recipe, features, data, validation, slices: list[str],
              work: Path) -> list[dict]:
    """Node ranking of one base candidate, over the ranking rows and over the rows of each failing slice."""
    feats = features  # None: the reader takes the kind from the data (.npz) or the model's metadata
    sets: dict[str, list[dict]] = {}
    # INT4 falls back layer by layer to INT8 (MatMul); embedding tables stay INT4
    ops = ("MatMul",) if recipe.precision == "int4" else recipe.op_types
    if data is not None:
        sets["overall"] = rank_nodes(model, quantized_path, TableCalibrationReader(str(data), str(model), feats,
                                                                                    RANK_BATCH), ops, RANK_BATCHES)
    for key in slices[:3]:
        path = _slice_table(validation, key, work) if validation is not None else None
        if path is not None:
            sets[key] = rank_nodes(model, quantized_path, TableCalibrationReader(str(path), str(model), feats,
                                                                                 RANK_BATCH), ops, RANK_BATCHES)
    return merge_rankings(sets)
