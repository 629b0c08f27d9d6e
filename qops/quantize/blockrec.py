"""Block reconstruction of a static QDQ model (BRECQ, Li et al. 2021): each block's weights and quantization step
sizes are fitted to reproduce the FP32 block's *output*, not one layer's.

Layer-wise refinement (:mod:`qops.quantize.refine`) makes each layer match its FP32 output alone, so errors that
only cancel across layers — a depthwise convolution's rounding undone by the projection after it, a residual
branch against its skip — are out of its reach. A block here is the stretch of the graph between two points
where a single activation tensor carries everything forward (the input and output of a residual block, or a run
of plain layers), merged until it holds at least ``min_layers`` weighted layers. For each block in graph order:

- its input is the **quantized** model's own tensor there (every earlier block already reconstructed), its
  target the FP32 model's tensor at the block's output (ONNX Runtime, the tensor tapped as an output);
- the block runs as a differentiable function (:class:`~qops.quantize.qdq_sim.QdqModule`): its INT8 weights as
  float parameters rounded by the straight-through estimator, its weight and activation scales as learned step
  sizes (LSQ); Adam minimises the block output's squared error over ``iters`` steps of ``batch_size`` rows;
- if the fitted block is not better on all rows than the block as it was, it is left as it was.

The graph, zero points and tied scales do not change, so the model fuses and runs like the unreconstructed one.
Memory: ``rows`` rows of one block's input and output at a time (the rows are the first calibration rows).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from qops.calibration.collect import run_batched, tap_session
from qops.quantize.qdq_sim import QdqModule, UnsupportedGraph, write_initializers

log = logging.getLogger(__name__)
_WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def find_blocks(model, fp32_tensors: set[str], sim: QdqModule, min_layers: int = 2) -> list[dict]:
    """The blocks of ``model`` (a static QDQ graph): ``{"input", "output", "nodes": [indices], "layers"}``, in
    graph order. Boundaries are float tensors that alone are live at that point of the graph, that the FP32 model
    has too (``fp32_tensors``), and that a QuantizeLinear reads (or the graph's output)."""
    nodes = list(model.graph.node)
    consts = set(sim.const)
    const_nodes = {}  # output -> index of a node that depends on constants alone (weight DequantizeLinear...)
    for i, n in enumerate(nodes):
        if all(not t or t in consts for t in n.input):
            consts.update(n.output)
            const_nodes.update({o: i for o in n.output})

    def with_constants(idx: list[int]) -> list[int]:
        need, todo = set(), [t for j in idx for t in nodes[j].input]
        while todo:
            t = todo.pop()
            if t in const_nodes and const_nodes[t] not in need:
                need.add(const_nodes[t])
                todo.extend(nodes[const_nodes[t]].input)
        return sorted(need) + idx
    last_use: dict[str, int] = {}
    consumers: dict[str, list] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t and t not in consts:
                last_use[t] = i
                consumers.setdefault(t, []).append(n)
    outputs = [o.name for o in model.graph.output]
    for o in outputs:
        last_use[o] = len(nodes)
    inputs = [i.name for i in model.graph.input if i.name not in consts]
    live = set(inputs)

    def boundary(t: str) -> bool:
        return t in fp32_tensors and bool(consumers.get(t)) and all(c.op_type == "QuantizeLinear" for c in consumers[t])

    cuts = [(-1, inputs[0])] if len(inputs) == 1 and boundary(inputs[0]) else []
    if not cuts:
        return []
    for i, n in enumerate(nodes):
        live -= {t for t in n.input if last_use.get(t) == i}
        live |= {t for t in n.output if t in last_use}
        if len(live) == 1:
            t = next(iter(live))
            if t in n.output and (boundary(t) or (t in outputs and t in fp32_tensors)):
                cuts.append((i, t))
    blocks, start = [], 0
    for k in range(1, len(cuts)):
        idx = [j for j in range(cuts[start][0] + 1, cuts[k][0] + 1) if j not in const_nodes.values()]
        layers = sum(1 for j in idx if nodes[j].op_type in _WEIGHTED and len(nodes[j].input) > 1
                     and nodes[j].input[1] in sim.weight_dq)
        if layers >= min_layers or k == len(cuts) - 1:
            if layers:
                blocks.append({"input": cuts[start][1], "output": cuts[k][1], "nodes": with_constants(idx),
                               "layers": layers})
            start = k
    return blocks


def _block_params(sim: QdqModule, nodes) -> tuple[list, list]:
    """The block's weight and bias parameters, and its step-size parameters (weights' and activations')."""
    weights, ranges = [], []
    for n in nodes:
        for t in n.input:
            spec = sim.weight_dq.get(t)
            if spec is not None:
                weights.append(sim.params[spec["key"]])
                if "range" in spec:
                    ranges.append(sim.ranges[spec["range"]])
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in sim.act_scales:
            ranges.append(sim.ranges[sim.act_scales[n.input[1]][0]])
    uniq = lambda ps: list({id(p): p for p in ps}.values())  # noqa: E731
    return uniq(weights), uniq(ranges)


def fp32_weights(qmodel, fmodel, sim: QdqModule) -> dict[str, np.ndarray]:
    """Weight DequantizeLinear output -> the FP32 model's weight it was quantized from: the initializer ONNX
    Runtime named ``<name>_quantized`` after, else the weight of the FP32 layer with the same output tensor."""
    from onnx import numpy_helper

    finit = {i.name: i for i in fmodel.graph.initializer}
    fnode = {n.output[0]: n for n in fmodel.graph.node if n.op_type in _WEIGHTED}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    out = {}
    for n in qmodel.graph.node:
        if n.op_type not in _WEIGHTED or len(n.input) < 2 or n.input[1] not in sim.weight_dq:
            continue
        name = producer[n.input[1]].input[0].removesuffix("_quantized")
        f = fnode.get(n.output[0])
        if name not in finit and f is not None and len(f.input) > 1:
            name = f.input[1]
        if name in finit:
            out[n.input[1]] = numpy_helper.to_array(finit[name])
    return out


def reconstruct(qmodel, fmodel, feeds: dict[str, np.ndarray], *, iters: int = 200, lr: float = 1e-4,
                range_lr: float = 1e-3, batch_size: int = 16, min_layers: int = 2, time_budget_s: float = 600.0,
                seed: int = 0, rounding: str = "adaround") -> dict:
    """Reconstruct ``qmodel`` (a static QDQ ModelProto, changed in place) block by block towards ``fmodel`` on
    ``feeds`` (model inputs by name, rows on axis 0). Returns a report: blocks, per block its layers and the relative
    squared error of its output before and after, seconds, and why it stopped. ``rounding``: ``adaround`` (each
    weight rounds up or down as learned, from its FP32 value where the FP32 model has it: BRECQ) or ``ste`` (the
    weights train as floats through the straight-through estimator)."""
    import torch

    t0 = time.perf_counter()
    try:
        sim = QdqModule(qmodel, torch, learn_ranges=True)
    except UnsupportedGraph as e:
        return {"skipped": f"the QDQ graph has {e}, which the block simulator does not run"}
    fp32_tensors = {t for n in fmodel.graph.node for t in n.output} | {i.name for i in fmodel.graph.input}
    blocks = find_blocks(qmodel, fp32_tensors, sim, min_layers)
    if not blocks:
        return {"skipped": "no block boundaries found (a graph with one input read by a QuantizeLinear is needed)"}
    nodes = list(qmodel.graph.node)
    fp32 = fp32_weights(qmodel, fmodel, sim) if rounding == "adaround" else {}
    x = feeds[blocks[0]["input"]]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    rows, report, stopped = len(x), [], "all blocks"

    def block_out(xb, block, grad=False):
        with torch.set_grad_enabled(grad):
            env = sim.run(sim.environment({block["input"]: torch.from_numpy(np.ascontiguousarray(xb))}),
                          [nodes[j] for j in block["nodes"]])
            return env[block["output"]]

    def error(block, y) -> float:
        num = sum(float(((block_out(x[i:i + 32], block) - torch.from_numpy(y[i:i + 32])) ** 2).sum())
                  for i in range(0, rows, 32))
        return num / max(float((y.astype(np.float64) ** 2).sum()), 1e-12)

    for b, block in enumerate(blocks):
        if time.perf_counter() - t0 > time_budget_s:
            stopped = f"time budget ({time_budget_s:.0f} s) after {b} of {len(blocks)} blocks"
            break
        sess, outs = tap_session(fmodel, [block["output"]])
        k = outs.index(block["output"])
        y = run_batched(sess, feeds, 32)[k]
        del sess
        block_nodes = [nodes[j] for j in block["nodes"]]
        weights, ranges = _block_params(sim, block_nodes)
        saved = [p.detach().clone() for p in weights + ranges]
        before = error(block, y)
        if rounding == "adaround":  # the rounding of the block's weights is learned; their scales stay
            vs = sim.soft_rounding([t for n in block_nodes for t in n.input if t in sim.weight_dq], fp32)
            biases = [sim.params[sim.weight_dq[t]["key"]] for n in block_nodes for t in n.input
                      if t in sim.weight_dq and sim.weight_dq[t]["bias"]]
            weight_ranges = {id(sim.ranges[sp["range"]]) for n in block_nodes for t in n.input
                             if (sp := sim.weight_dq.get(t)) is not None and "range" in sp}
            groups = [{"params": vs, "lr": 1e-2}, {"params": biases, "lr": lr},
                      {"params": [r for r in ranges if id(r) not in weight_ranges], "lr": range_lr}]
        else:
            groups = [{"params": weights, "lr": lr}, {"params": ranges, "lr": range_lr}]
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        yt = torch.from_numpy(y)
        for it in range(iters):
            idx = rng.choice(rows, min(batch_size, rows), replace=False)
            loss = ((block_out(x[idx], block, grad=True) - yt[idx]) ** 2).mean() / (yt[idx].pow(2).mean() + 1e-12)
            if rounding == "adaround" and it >= iters // 5:  # AdaRound's schedule: warm-up, then beta 20 -> 2
                beta = 20 - 18 * (it - iters // 5) / max(1, iters - iters // 5)
                loss = loss + 1e-3 * sim.rounding_penalty(beta) / max(1, sum(v.numel() for v in vs)) * 1e2
            opt.zero_grad()
            loss.backward()
            opt.step()
        sim.hard_rounding()
        after = error(block, y)
        if after >= before:  # never worse than the block it started from
            with torch.no_grad():
                for p, v in zip(weights + ranges, saved):
                    p.copy_(v)
            after = before
        with torch.no_grad():
            x = np.concatenate([block_out(x[i:i + 32], block).numpy() for i in range(0, rows, 32)])
        report.append({"input": block["input"], "output": block["output"], "layers": block["layers"],
                       "error_before": round(before, 6), "error_after": round(after, 6)})
        log.info("block reconstruction %d/%d (%d layers -> %s): relative error %.5f -> %.5f", b + 1, len(blocks),
                 block["layers"], block["output"], before, after)
    write_initializers(qmodel, sim.export())
    return {"blocks": report, "rows": int(rows), "iters": iters, "stopped": stopped,
            "seconds": round(time.perf_counter() - t0, 1)}
