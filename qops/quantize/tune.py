"""Accuracy-aware tuning: search recipes, fall back sensitive nodes to FP32, keep the fastest passing candidate.

1. **Search** the recipe's space — calibration method x granularity (static INT8), granularity (dynamic),
   static vs dynamic (``mode: auto``), SmoothQuant strengths, INT4 algorithm and block size, codebook kind.
2. If no candidate passes, **fall back** nodes to FP32: take the most faithful failing candidate, rank its
   quantized nodes by the signal-to-quantization-noise ratio they lose (SQNR of the node's output against FP32
   minus that of its input, over the calibration rows), and exclude the worst 1, 2, 4, ... cumulatively until the
   gates pass or the budget ends.
3. Every candidate is judged by the caller's ``judge`` (the pipeline: evaluation on the validation set and the
   spec's gates, latency timed against FP32 in the same process). A candidate slower than FP32 is rejected with
   that reason. Among the passing ones the **fastest** wins (ties: the more faithful), not the first.

The trial table (config, metrics, latency, verdict) is returned in ``QuantizeResult.trials`` for the model card.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qops.artifacts import atomic_path, write_json_atomic
from qops.errors import QopsError
from qops.targets import Recipe

log = logging.getLogger(__name__)


@dataclass
class TuningConfig:
    max_trials: int = 12
    timeout_s: float = 900.0
    calibration_methods: list = field(default_factory=lambda: ["minmax", "percentile", "entropy"])
    granularities: list = field(default_factory=lambda: ["per-channel", "per-tensor"])
    modes: list | None = None  # None: the recipe's mode ("auto": both static and dynamic)
    smooth_quant_alphas: list = field(default_factory=list)
    activation_types: list | None = None  # static INT8 activations to try (None: the recipe's)
    try_all_ops: bool = True  # static INT8: also quantize every op ORT can (Relu, pooling, Add...), not just weights
    max_fallback_nodes: int = 8
    latency_tie: float = 0.03  # latency ratios within 3% of the fastest count as equally fast
    size_tie: float = 0.05  # then the smallest file (within 5%), then the most faithful

    @classmethod
    def from_any(cls, obj) -> "TuningConfig":
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        d = obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


Judge = Callable[[object], dict]  # QuantizeResult -> {passed, failures, latency_ratio, size_ratio, fidelity, metrics}


def gate_judge(fp32_model, validation, label, gates, *, slice_columns=None, features=None, intersections=None,
               latency_runs: int = 200, bootstrap: int = 200) -> Judge:
    """The usual judge: ``qops.evaluate.evaluate`` on the validation set (fewer resamples and timed runs than
    the evaluate stage) and ``qops.gates.gate`` with the given GateSpec."""
    from qops.evaluate import evaluate
    from qops.gates import gate

    def judge(res) -> dict:
        ev = evaluate(fp32_model, res.model_path, validation, label, slice_columns or [], features=features,
                      metric=gates.metric, latency_runs=latency_runs, task=gates.task, metrics=gates.metrics,
                      custom_metrics=gates.custom_metrics, intersections=intersections,
                      min_slice_size=gates.min_slice_size, bootstrap=bootstrap, confidence=gates.confidence,
                      seed=gates.seed, target=res.recipe)
        verdict = gate(ev, gates)
        primary = ev.overall[ev.primary_metric]
        return {"passed": verdict.passed,
                "failures": [f"{c.name}: {c.detail}" for c in verdict.checks if not c.passed],
                "latency_ratio": ev.performance["latency_ratio"], "size_ratio": ev.performance["size_ratio"],
                "fidelity": ev.fidelity,
                "metrics": {ev.primary_metric: {"fp32": primary["fp32"], "quantized": primary["quantized"]}}}

    return judge


def search_space(recipe: Recipe, cfg: TuningConfig, has_calibration: bool, preferred_mode: str | None = None
                 ) -> list[dict]:
    """Recipe option sets to try, the recipe's own settings first (for ``mode: auto``, the mode the graph's
    structure picks first)."""
    base: dict = {}
    cands: list[dict] = [base]
    if recipe.engine != "onnxruntime":
        return cands
    if recipe.precision == "int8":
        modes = cfg.modes or (["static", "dynamic"] if recipe.mode == "auto" else [recipe.mode])
        if recipe.mode == "auto" and not cfg.modes:
            cands = []  # "recipe defaults" would repeat the first explicit candidate of the preferred mode
            if preferred_mode in modes:
                modes = [preferred_mode] + [m for m in modes if m != preferred_mode]
        if not has_calibration:
            modes = [m for m in modes if m != "static"] or ["dynamic"]
        gran = [g == "per-channel" for g in cfg.granularities]
        acts = cfg.activation_types or [recipe.activation_type]
        first = cfg.calibration_methods[:1]
        ops = [recipe.op_types] + ([()] if cfg.try_all_ops and recipe.op_types else [])
        basic: dict[str, list] = {
            "static": [{"mode": "static", "calibration_method": m, "per_channel": pc, "activation_type": act,
                        "op_types": o} for m in first for o, pc, act in itertools.product(ops, gran, acts)],
            "dynamic": [{"mode": "dynamic", "per_channel": pc, "op_types": o} for o, pc in itertools.product(ops, gran)],
        }
        # breadth first: every mode's basic variants, then the other calibration methods, then SmoothQuant
        for mode in modes:
            cands += basic[mode]
        if "static" in modes:
            cands += [{"mode": "static", "calibration_method": m, "per_channel": pc, "activation_type": act,
                       "op_types": o} for m in cfg.calibration_methods[1:]
                      for o, pc, act in itertools.product(ops, gran, acts)]
            cands += [{"mode": "static", "smooth_quant_alpha": a} for a in cfg.smooth_quant_alphas]
    elif recipe.precision == "int4":
        for algo, block in itertools.product(["rtn"] + (["gptq"] if has_calibration else []), [128, 32]):
            cands.append({"algorithm": algo, "block_size": block})
    elif recipe.precision == "codebook":
        cands += [{"codebook": "kmeans"}, {"codebook": "pow2"}]
    # drop option sets equal to the recipe itself (the first candidate) and duplicates
    seen, out = set(), []
    for c in cands:
        eff = tuple(sorted({k: v for k, v in c.items() if getattr(recipe, k) != v}.items()))
        if eff not in seen:
            seen.add(eff)
            out.append(dict(eff))
    return out


def _label(opts: dict) -> str:
    if not opts:
        return "recipe defaults"
    parts = []
    for k, v in opts.items():
        if k == "nodes_to_exclude":
            parts.append(f"{len(v)} node(s) in FP32")
        elif k == "per_channel":
            parts.append("per-channel" if v else "per-tensor")
        elif k == "op_types":
            parts.append("all ops" if not v else "ops " + "/".join(v))
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def rank_nodes(float_model: str | os.PathLike, quantized_model: str | os.PathLike, reader, op_types,
               max_batches: int = 8) -> list[dict]:
    """Quantized nodes ranked by the SQNR they lose (worst first): for each node of ``op_types`` with a weight,
    SQNR(output vs FP32) - SQNR(input vs FP32), over up to ``max_batches`` calibration batches.

    Tensors are matched by name: ONNX Runtime's quantizers keep the names of the tensors they quantize around.
    """
    import onnx
    import onnxruntime as ort

    from qops.quantize.graph import name_nodes, weighted_nodes

    fm = onnx.load(str(float_model))
    name_nodes(fm)
    qm = onnx.load(str(quantized_model))
    q_tensors = {o for n in qm.graph.node for o in n.output}
    layers = [(n.name, n.input[0], n.output[0]) for n, _ in weighted_nodes(fm, set(op_types))]
    wanted = sorted({t for _, i, o in layers for t in (i, o) if t in q_tensors})
    graph_inputs = {i.name for i in fm.graph.input}
    if not wanted:
        return []

    def run(model) -> dict[str, list]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        for t in wanted:
            if t not in have and t not in graph_inputs:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        acc: dict[str, list] = {t: [] for t in wanted}
        reader.rewind()
        for _ in range(max_batches):
            feed = reader.get_next()
            if feed is None:
                break
            outs = dict(zip(names, sess.run(None, feed)))
            for t in wanted:
                acc[t].append(outs[t] if t in outs else feed.get(t))
        reader.rewind()
        return acc

    fa, qa = run(fm), run(qm)

    def sqnr(t: str) -> float:
        if t in graph_inputs or t not in fa or not fa[t] or fa[t][0] is None:
            return float("inf")
        f = np.concatenate([np.asarray(a, np.float64).ravel() for a in fa[t]])
        q = np.concatenate([np.asarray(a, np.float64).ravel() for a in qa[t]])
        noise = float(np.sum((f - q) ** 2))
        return float("inf") if noise == 0 else float(10 * np.log10(max(float(np.sum(f**2)), 1e-30) / noise))

    ranked = []
    for name, inp, out in layers:
        if out not in q_tensors:
            continue
        s_in, s_out = sqnr(inp), sqnr(out)
        lost = (s_in - s_out) if np.isfinite(s_in) else (60.0 - s_out if np.isfinite(s_out) else 0.0)
        ranked.append({"node": name, "sqnr_out_db": round(s_out, 2) if np.isfinite(s_out) else None,
                       "sqnr_lost_db": round(lost, 2)})
    ranked.sort(key=lambda r: (-r["sqnr_lost_db"], r["sqnr_out_db"] if r["sqnr_out_db"] is not None else 1e9))
    return ranked


def tune(
    model: str | os.PathLike,
    recipe: Recipe,
    output: str | os.PathLike,
    judge: Judge,
    calibration: str | os.PathLike | None = None,
    features: list[str] | None = None,
    config: TuningConfig | dict | None = None,
    ranking_data: str | os.PathLike | None = None,
):
    """Search ``recipe``'s space, fall back nodes if needed, write the chosen candidate to ``output``."""
    from qops.quantize.ort import TableCalibrationReader, quantize

    cfg = TuningConfig.from_any(config)
    output = Path(output)
    t_start = time.perf_counter()
    deadline = t_start + cfg.timeout_s
    trials: list[dict] = []
    results: dict[int, object] = {}
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.trials-", dir=output.parent if output.parent.exists()
                                 else None))

    def budget_left() -> bool:
        return len(trials) < cfg.max_trials and time.perf_counter() < deadline

    def attempt(opts: dict, phase: str) -> dict:
        idx = len(trials)
        row = {"trial": idx + 1, "phase": phase, "config": _label(opts), "options": opts}
        t0 = time.perf_counter()
        try:
            res = quantize(model, recipe, work / f"trial{idx:02d}{recipe.output_suffix}", calibration=calibration,
                           features=features, options=opts)
            verdict = judge(res)
        except QopsError as e:
            row.update(passed=False, verdict="error", reasons=[e.problem], seconds=round(time.perf_counter() - t0, 2))
            trials.append(row)
            log.info("trial %d (%s): error: %s", idx + 1, row["config"], e.problem)
            return row
        reasons = list(verdict.get("failures") or [])
        lat = verdict.get("latency_ratio")
        if lat is not None and lat > 1.0 and not any("latency" in r for r in reasons):
            reasons.append(f"slower than FP32 ({lat:.2f}x FP32's batch-1 p50)")
        passed = bool(verdict.get("passed")) and not reasons
        row.update(passed=passed, verdict="passed" if passed else "failed", reasons=reasons, mode=res.mode,
                   latency_ratio=lat, size_ratio=verdict.get("size_ratio"), metrics=verdict.get("metrics", {}),
                   fidelity=verdict.get("fidelity", {}), seconds=round(time.perf_counter() - t0, 2))
        trials.append(row)
        results[idx] = res
        log.info("trial %d/%d (%s): %s, %s FP32 latency, cosine %.4f%s", idx + 1, cfg.max_trials, row["config"],
                 row["verdict"], "n/a" if lat is None else f"{lat:.2f}x",
                 (row["fidelity"] or {}).get("cosine_mean", float("nan")),
                 "" if passed else f" — {'; '.join(reasons)[:200]}")
        return row

    preferred = None
    if recipe.engine == "onnxruntime" and recipe.mode == "auto":
        from qops.quantize.graph import choose_mode, graph_kind, load

        preferred = choose_mode(graph_kind(load(model, external=False)))
    try:
        for opts in search_space(recipe, cfg, calibration is not None, preferred):
            if not budget_left():
                break
            attempt(opts, "search")
        fallback: list[dict] = []
        if not any(t["passed"] for t in trials) and cfg.max_fallback_nodes > 0 and budget_left() and results:
            scored = [t for t in trials if t["trial"] - 1 in results]
            best = max(scored, key=lambda t: _fidelity_key(t))
            base_res = results[best["trial"] - 1]
            data = ranking_data or calibration
            if data is not None and recipe.engine == "onnxruntime":
                from qops.data import feature_columns_for

                reader = TableCalibrationReader(str(data), str(model), feature_columns_for(model, features), 64)
                fallback = rank_nodes(model, base_res.model_path, reader, recipe.op_types)
                log.info("node fallback from trial %d: %d nodes ranked by SQNR lost", best["trial"], len(fallback))
            limit = min(cfg.max_fallback_nodes, len(fallback))
            for k in sorted({min(2**i, limit) for i in range(12)}):  # 1, 2, 4, ... cumulatively
                if not budget_left():
                    break
                opts = dict(best["options"], nodes_to_exclude=[r["node"] for r in fallback[:k]])
                row = attempt(opts, "fallback")
                row["fp32_nodes"] = [r["node"] for r in fallback[:k]]
                if row["passed"]:
                    break
        passing = [t for t in trials if t["passed"]]
        if passing:
            # fastest; candidates within cfg.latency_tie (timing noise) of the fastest tie, the most faithful wins
            chosen = choose(passing, cfg.latency_tie, cfg.size_tie)
        else:
            scored = [t for t in trials if t["trial"] - 1 in results]
            if not scored:
                raise QopsError(f"Tuning target {recipe.target!r}: every candidate failed to quantize "
                                f"({trials[0]['reasons'][0] if trials else 'no trials'}).",
                                "check the model and the target (qops quantize without tuning shows the error).")
            chosen = max(scored, key=_fidelity_key)
        for t in trials:
            t["chosen"] = t is chosen
        res = results[chosen["trial"] - 1]
        _install(Path(res.model_path), output)
        res.model_path = str(output)
        res.recipe_path = str(output.with_suffix(output.suffix + ".recipe.json"))
        res.trials = [_row_for_card(t) for t in trials]
        res.tuning = {
            "trials": len(trials), "passed": bool(passing), "chosen_trial": chosen["trial"],
            "chosen_config": chosen["config"], "seconds": round(time.perf_counter() - t_start, 1),
            "rule": f"fastest passing candidate (latency ratio vs FP32; within {cfg.latency_tie:.0%} counts as a tie, "
                    f"broken by file size (within {cfg.size_tie:.0%}), then fidelity); if none passes, the most faithful "
                    "candidate is kept and the gates fail it",
            "node_ranking": fallback[:cfg.max_fallback_nodes],
            "budget": {"max_trials": cfg.max_trials, "timeout_s": cfg.timeout_s},
        }
        if not passing:
            res.notes.append(f"tuning found no candidate that passes the gates in {len(trials)} trial(s)")
        from qops import __version__

        write_json_atomic(res.recipe_path, {"recipe": res.recipe, "result": res, "qops_version": __version__})
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def choose(passing: list[dict], latency_tie: float = 0.03, size_tie: float = 0.05) -> dict:
    """The fastest passing trial. Latency ratios within ``latency_tie`` of the fastest are equally fast (timing
    noise); among those the smallest file (sizes within ``size_tie`` tie), then the most faithful, wins."""
    lat = [t["latency_ratio"] if t["latency_ratio"] is not None else 9e9 for t in passing]
    fastest = min(lat)
    ties = [t for t, x in zip(passing, lat) if x <= fastest * (1 + latency_tie)]
    sizes = [t["size_ratio"] if t.get("size_ratio") is not None else 9e9 for t in ties]
    smallest = min(sizes)
    ties = [t for t, x in zip(ties, sizes) if x <= smallest * (1 + size_tie)]
    return max(ties, key=_fidelity_key)


def _fidelity_key(t: dict) -> float:
    f = t.get("fidelity") or {}
    sq = f.get("sqnr_db")
    return float(sq) if sq is not None else (1e6 if f else -1e9)


def _row_for_card(t: dict) -> dict:
    f = t.get("fidelity") or {}
    return {
        "trial": t["trial"], "phase": t["phase"], "config": t["config"], "mode": t.get("mode"),
        "verdict": t["verdict"], "chosen": t.get("chosen", False), "reasons": t.get("reasons", []),
        "latency_ratio": None if t.get("latency_ratio") is None else round(t["latency_ratio"], 3),
        "size_ratio": None if t.get("size_ratio") is None else round(t["size_ratio"], 4),
        "cosine": None if "cosine_mean" not in f else round(f["cosine_mean"], 5),
        "sqnr_db": f.get("sqnr_db"), "metrics": t.get("metrics", {}), "fp32_nodes": t.get("fp32_nodes", []),
        "options": t.get("options", {}), "seconds": t.get("seconds"),
    }


def _install(src: Path, dst: Path) -> None:
    """Copy the chosen candidate (and its external data) into place, model file last."""
    data = src.with_name(src.name + ".data")
    if data.is_file():
        from qops.quantize.ort import _move_model

        _move_model(src, dst, external=True)
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
