"""Activation ranges searched per layer by the output error they cause (static QDQ models).

Calibration statistics (min-max, percentile, entropy) pick each activation range from that tensor's own values.
What matters is the model's *output*: a wide range wastes resolution on rare values, a narrow one clips them, and
which of the two costs more depends on what the layers after it do. On real mobile CNNs the linear bottleneck
outputs and residual sums of the last blocks carry rare large values that min-max keeps and the classifier barely
needs (measured on torchvision's MobileNetV2: floating those five tensors alone lifts top-1 agreement with FP32 from
0.70 to 0.81).

:func:`search_ranges` walks the activation scales in graph order (scales that ONNX Runtime needs equal stay tied,
as in :class:`~qops.quantize.qdq_sim.QdqModule`). For each one it tries a few multipliers of the current scale,
runs the whole quantized model with ONNX Runtime on the calibration rows and keeps the multiplier with the lowest
output error against FP32 (mean over rows of the squared error relative to the FP32 output's energy) — if it lowers
that error by ``min_gain`` and on both halves of the rows (even and odd), so that a few rows' noise does not move a
range — then goes on to the next scale from there (coordinate descent; ``sweeps`` passes). A range that stands for a folded
``Clip(0, c)`` (ReLU6: ONNX Runtime drops the Clip and lets the range clip) is never widened past ``c``. Every INT32 bias is re-derived on its layer's
new input scale; zero points, weights and the graph do not change, so the model fuses and runs exactly like the
unsearched one. Memory: the rows of one search (``rows``) and their outputs; time: bounded by ``time_budget_s``.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np

from qops.calibration.collect import run_batched
from qops.quantize.graph import clip_bounds
from qops.quantize.qdq_sim import QdqModule, UnsupportedGraph, write_initializers

log = logging.getLogger(__name__)

MULTIPLIERS = (0.5, 0.65, 0.8, 0.9, 1.1)  # tried against the current scale (1.0) at each step
_MAX_BYTES = 1_500_000_000  # each try serializes the model for ONNX Runtime (protobuf's limit is 2 GB)


def row_errors(out: list, ref: list) -> np.ndarray:
    """Per row: ``||out - ref||^2 / ||ref||^2`` over every output (concatenated per row)."""
    o = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in out], axis=1)
    r = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in ref], axis=1)
    return np.sum((o - r) ** 2, 1) / np.maximum(np.sum(r ** 2, 1), 1e-12)


def _halves(e: np.ndarray) -> tuple[float, float, float]:
    """Mean error over all rows, the even rows and the odd rows."""
    return float(e.mean()), float(e[0::2].mean()), float(e[1::2].mean())


def clip_caps(qmodel, fp32_model, sim) -> dict[str, float]:
    """Tie group -> the largest multiplier its scale may take. ONNX Runtime drops a ``Clip(0, c)`` (ReLU6) whose
    output is quantized and folds the clip into the quantization range (the quantizer names that range
    ``<clip output>_scale``), so a range widened past ``c`` would no longer clip: the model would change."""
    clip_max = {}
    for n in fp32_model.graph.node:
        hi = clip_bounds(fp32_model, n)[1] if n.op_type == "Clip" else None
        if hi is not None:
            clip_max[n.output[0] + "_scale"] = hi
    caps: dict[str, float] = {}
    for q in qmodel.graph.node:
        name = q.input[1] if q.op_type == "QuantizeLinear" and len(q.input) > 1 else None
        if name not in clip_max or name not in sim.act_scales:
            continue
        key, s0 = sim.act_scales[name]
        zp = sim.inits[q.input[2]] if len(q.input) > 2 and q.input[2] in sim.inits else np.zeros((), np.uint8)
        top = float(np.iinfo(zp.dtype).max) - float(zp)
        if top > 0:
            caps[key] = min(caps.get(key, np.inf), clip_max[name] / (float(s0) * top))
    return caps


def model_outputs(model, feeds: dict, batch: int = 64) -> list:
    """Every output of ``model`` (a ModelProto) over ``feeds`` (input name -> rows), run in batches."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return run_batched(ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]),
                       feeds, batch)


def search_ranges(qmodel, fp32_model, feeds: dict, sweeps: int = 1, multipliers=MULTIPLIERS,
                  time_budget_s: float = 600.0, min_gain: float = 1e-3, on_progress=None) -> dict:
    """Search ``qmodel``'s activation scales (rewritten in place) for the lowest output error against
    ``fp32_model`` on ``feeds`` (input name -> rows). Returns a report: error before/after, the scales changed
    (initializer -> multiplier of its calibrated value), steps tried, seconds, and why it stopped early if it did."""
    import torch

    t0 = time.perf_counter()
    if qmodel.ByteSize() > _MAX_BYTES:
        return {"skipped": f"the model is over {_MAX_BYTES / 1e9:.1f} GB in memory; the search runs small graphs"}
    try:
        sim = QdqModule(qmodel, torch, learn_ranges=True)
    except UnsupportedGraph as e:
        return {"skipped": f"the graph has an op the range search cannot re-derive scales for: {e}"}
    groups = [k for k in sim.ranges if k.startswith("a")]
    if not groups:
        return {"skipped": "no activation scale to search"}
    caps = clip_caps(qmodel, fp32_model, sim)
    ref = model_outputs(fp32_model, feeds)

    trial = copy.deepcopy(qmodel)  # each try overwrites every initializer the simulator exports

    def build():
        write_initializers(trial, sim.export())
        return trial

    best = _halves(row_errors(model_outputs(qmodel, feeds), ref))
    before = best[0]
    tried, stopped, chosen = 0, None, {}
    for sweep in range(sweeps):
        moved = False
        for i, g in enumerate(groups):
            if time.perf_counter() - t0 > time_budget_s:
                stopped = f"time budget ({time_budget_s:.0f} s) in sweep {sweep + 1}, at scale {i} of {len(groups)}"
                break
            keep = float(sim.ranges[g].detach())
            pick = None
            for m in multipliers:
                if keep + float(np.log(m)) > float(np.log(caps.get(g, np.inf))) + 1e-6:
                    continue  # past a folded Clip's bound
                with torch.no_grad():
                    sim.ranges[g].fill_(keep + float(np.log(m)))
                err = _halves(row_errors(model_outputs(build(), feeds), ref))
                tried += 1
                # kept only if it helps both halves of the rows (not the noise of a few) by min_gain overall
                if err[0] < best[0] * (1 - min_gain) and err[1] < best[1] and err[2] < best[2]:
                    best, pick = err, keep + float(np.log(m))
            with torch.no_grad():
                sim.ranges[g].fill_(keep if pick is None else pick)
            if pick is not None:
                moved = True
                chosen[g] = pick
            if on_progress is not None:
                on_progress(sweep * len(groups) + i + 1, sweeps * len(groups), best[0])
        if stopped or not moved:
            break
    if chosen:
        write_initializers(qmodel, sim.export())
    names = {key: name for name, (key, _) in sim.act_scales.items()}
    changed = {names[g]: round(float(np.exp(v)), 4) for g, v in chosen.items() if abs(v) > 1e-9}
    report = {"rows": int(len(next(iter(feeds.values())))), "scales": len(groups), "tried": tried,
              "error_before": round(before, 6), "error_after": round(best[0], 6), "changed": changed,
              "seconds": round(time.perf_counter() - t0, 1)}
    if stopped:
        report["stopped"] = stopped
    log.info("range search: output error %.5f -> %.5f, %d of %d scales moved (%.0f s)", before, best[0], len(changed),
             len(groups), report["seconds"])
    return report
