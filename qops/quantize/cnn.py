"""Static INT8 for convolutional graphs: an integer graph end to end, layer-wise refinement, and the check that
the graph really runs in integer.

- :func:`integer_graph_ops`: with ``integer_graph`` on (``auto``: convolutional graphs), every op ONNX Runtime
  quantizes gets QDQ — Clip/Relu (ReLU6) fold into the preceding quantization range, Add, Concat, pooling, Resize
  and the like run on integer kernels, so QDQ pairs fuse instead of leaving float islands between integer ops.
- :func:`refine_model`: bias correction (``auto``: convolutional graphs) and, on request, learned rounding
  (:mod:`qops.quantize.refine`) on the first ``refine_rows`` calibration rows.
- :func:`search_model_ranges`: activation ranges searched by the output error they cause (``auto``: convolutional
  graphs; :mod:`qops.quantize.rangesearch`).
- :func:`float_islands`: what ONNX Runtime runs in float after fusing the QDQ model (float ops, requantizations):
  the count a test and the recipe's report use.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from qops.quantize.blockrec import reconstruct
from qops.quantize.finetune import finetune
from qops.quantize.graph import save_model, weighted_nodes
from qops.quantize.rangesearch import search_ranges
from qops.quantize.refine import refine

log = logging.getLogger(__name__)

# ops that only move or reshape data (they run on the integer tensors as they are) or hold constants
_DATA_MOVEMENT = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                  "Shape", "Gather", "Slice", "Concat", "Split", "Identity", "Constant", "Cast", "Pad"}


def wants(setting: str, kind: str) -> bool:
    """``on``/``off``, or ``auto``: on for convolutional graphs."""
    return setting == "on" or (setting == "auto" and kind == "convolutional")


def integer_graph_ops(op_types) -> list[str]:
    """Every op type ONNX Runtime quantizes statically (its QDQ and QLinear registries), plus the recipe's own."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry) | set(op_types or ()))


def float_islands(path) -> dict:
    """What ONNX Runtime's CPU kernels run in float in a quantized model, read off the graph ONNX Runtime itself
    optimizes it to (QDQ fusion included): ``{"float_ops": {op type: count}, "requantizations": k}`` — compute ops
    left in float, and the QuantizeLinear nodes inside the graph (each a float -> integer transition after a float
    island; quantizing the model's inputs does not count). An integer graph end to end has neither."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix=".qops-tmp-opt-", dir=Path(path).parent) as td:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(td) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath, load_external_data=False)
    inputs = {i.name for i in m.graph.input}
    ops = Counter(n.op_type for n in m.graph.node
                  if n.op_type not in _DATA_MOVEMENT and not n.op_type.startswith("QLinear")
                  and n.op_type not in _INTEGER_KERNELS and n.domain in ("", "ai.onnx", "com.microsoft"))
    requant = sum(1 for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inputs)
    return {"float_ops": dict(ops), "requantizations": requant}


def _first_rows(reader, rows: int) -> list[dict]:
    """The first ``rows`` rows of ``reader`` as a list of feed batches."""
    feeds, got = [], 0
    reader.rewind()
    while got < rows:
        batch = reader.get_next()
        if batch is None:
            break
        n = len(next(iter(batch.values())))
        take = min(n, rows - got)
        feeds.append({k: v[:take] for k, v in batch.items()})
        got += take
    return feeds


def _retrain(dst: Path, fp32: Path, reader, rows: int, external: bool, what: str, train) -> dict:
    """Load the first ``rows`` calibration rows, run ``train(quantized, fp32, feeds) -> report`` on the QDQ model at
    ``dst`` and rewrite it unless the report says ``skipped``."""
    import numpy as np
    import onnx

    batches = _first_rows(reader, rows)
    if not batches:
        return {"skipped": "no calibration rows"}
    feeds = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    q, f = onnx.load(str(dst)), onnx.load(str(fp32))
    log.info("%s on %d calibration rows", what, len(next(iter(feeds.values()))))
    report = train(q, f, feeds)
    if "skipped" in report:
        log.warning("%s skipped: %s", what.split(" of ")[0], report["skipped"])
        return report
    save_model(q, dst, external)
    return report


def reconstruct_blocks(dst: Path, fp32: Path, reader, recipe, external: bool) -> dict:
    """Block reconstruction of the QDQ model at ``dst`` (rewritten in place) towards ``fp32`` on the first
    ``recipe.block_rows`` calibration rows (:mod:`qops.quantize.blockrec`)."""
    return _retrain(dst, fp32, reader, recipe.block_rows, external,
                    f"block reconstruction of {recipe.target}: {recipe.block_iters} steps per block",
                    lambda q, f, feeds: reconstruct(q, f, feeds, iters=recipe.block_iters,
                                                    rounding=recipe.block_rounding,
                                                    time_budget_s=recipe.refine_budget_s))


def finetune_model(dst: Path, fp32: Path, reader, recipe, external: bool) -> dict:
    """Quantization-aware fine-tuning of the QDQ model at ``dst`` (rewritten in place) towards ``fp32`` on the first
    ``recipe.finetune_rows`` calibration rows (:mod:`qops.quantize.finetune`)."""

    def train(q, f, feeds):
        report = finetune(q, f, feeds, steps=recipe.finetune_steps, lr=recipe.finetune_lr,
                          batch_size=recipe.finetune_batch, time_budget_s=recipe.finetune_budget_s)
        report.pop("losses", None)  # per-step history: the QAT record keeps it, a recipe's technique does not
        return report

    return _retrain(dst, fp32, reader, recipe.finetune_rows, external,
                    f"fine-tuning of {recipe.target}: up to {recipe.finetune_steps} steps", train)


def search_model_ranges(dst: Path, fp32: Path, reader, recipe, external: bool) -> dict:
    """Activation ranges of the QDQ model at ``dst`` (rewritten in place) searched by output error against
    ``fp32`` on the first ``recipe.refine_rows`` calibration rows (:mod:`qops.quantize.rangesearch`)."""

    def progress(done: int, total: int, err: float) -> None:
        if done % 10 == 0 or done == total:
            log.info("range search: %d/%d scales, output error %.5f", done, total, err)

    return _retrain(dst, fp32, reader, recipe.refine_rows, external,
                    f"activation range search of {recipe.target}: up to {recipe.range_sweeps} sweeps",
                    lambda q, f, feeds: search_ranges(q, f, feeds, sweeps=recipe.range_sweeps,
                                                      time_budget_s=recipe.refine_budget_s, on_progress=progress))


def refine_model(dst: Path, fp32: Path, reader, recipe, kind: str, external: bool) -> dict:
    """Bias correction and/or learned rounding of the QDQ model at ``dst`` (rewritten in place) against ``fp32``
    (the model ONNX Runtime quantized), on the first ``recipe.refine_rows`` rows of ``reader``."""
    import onnx

    feeds = _first_rows(reader, recipe.refine_rows)
    rows = sum(len(next(iter(f.values()))) for f in feeds)
    if not feeds:
        return {"skipped": "no calibration rows"}
    q, f = onnx.load(str(dst)), onnx.load(str(fp32))
    bias = wants(recipe.bias_correction, kind)
    log.info("refining %s: %s%s on %d calibration rows", recipe.target, "bias correction" if bias else "",
             " + learned rounding" if recipe.learned_rounding else "", rows)
    report = refine(q, f, feeds, bias_correction=bias, learned_rounding=recipe.learned_rounding,
                    rounding_iters=recipe.rounding_iters, rounding_rows=recipe.rounding_rows,
                    time_budget_s=recipe.refine_budget_s)
    save_model(q, dst, external)
    return report


_INTEGER_KERNELS = {"ConvInteger": "Conv", "QLinearConv": "Conv", "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul",
                    "DynamicQuantizeMatMul": "MatMul", "MatMulNBits": "MatMul", "QGemm": "Gemm",
                    "GatherBlockQuantized": "Gather"}


def weighted_coverage(source, quantized) -> dict:
    """Op type -> {"quantized": k, "total": n} over the source's nodes with constant weights (Conv, ConvTranspose,
    Gemm, MatMul): how much of the model the target really quantized."""
    total = Counter(n.op_type for n, _ in weighted_nodes(source, ("Conv", "ConvTranspose", "Gemm", "MatMul")))
    from onnx import TensorProto

    narrow = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
    inits = {i.name: i.data_type for i in quantized.graph.initializer}
    # weights behind a DequantizeLinear of 8 bits or fewer (INT16 weights of layers kept out of INT8 do not count)
    dq_out = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear"
              and inits.get(n.input[0], TensorProto.INT8) in narrow for o in n.output}
    done = Counter()
    for n in quantized.graph.node:
        if n.op_type in _INTEGER_KERNELS:
            done[_INTEGER_KERNELS[n.op_type]] += 1
        elif n.op_type in total and len(n.input) > 1 and n.input[1] in dq_out:
            done[n.op_type] += 1
    # a dynamic quantizer rewrites Gemm as MatMulInteger: count what moved between the two
    moved = max(0, done["MatMul"] - total["MatMul"])
    if moved:
        done["MatMul"] -= moved
        done["Gemm"] += moved
    return {op: {"quantized": min(done[op], n), "total": n} for op, n in sorted(total.items())}


def coverage_note(cov: dict) -> str | None:
    """A note when fewer than half of the weighted nodes were quantized (e.g. a CNN under a MatMul-only target)."""
    q, t = sum(v["quantized"] for v in cov.values()), sum(v["total"] for v in cov.values())
    if not t or q * 2 >= t:
        return None
    parts = ", ".join(f"{op} {v['quantized']}/{v['total']}" for op, v in cov.items())
    return (f"only {q} of {t} weighted nodes were quantized ({parts}); the rest stay FP32, so size and speed barely "
            "change: pick a target whose op types cover the model (e.g. a static INT8 target for a CNN)")
