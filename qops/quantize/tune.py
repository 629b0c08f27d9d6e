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
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from qops.artifacts import atomic_path, clean_stale_temps, temp_prefix
from qops.data import read_table
from qops.errors import QopsError
from qops.evaluate import evaluate_with_gates
from qops.gates import gate
from qops.quantize.api import quantize
from qops.quantize.calib_cache import calibration_cache
from qops.quantize.graph import choose_mode, graph_kind, load, name_nodes, tap_session
from qops.quantize.readers import TableCalibrationReader
from qops.quantize.result import check_output_path, move_model, write_recipe
from qops.spec import TuningSpec
from qops.targets import Recipe

log = logging.getLogger(__name__)


Judge = Callable[[object], dict]  # QuantizeResult -> {passed, failures, latency_ratio, size_ratio, fidelity, metrics}


def gate_judge(fp32_model, validation, label, gates, *, slice_columns=None, features=None, intersections=None,
               latency_runs: int = 200, bootstrap: int = 200) -> Judge:
    """The usual judge: ``qops.evaluate.evaluate`` on the validation set (fewer resamples and timed runs than
    the evaluate stage) and ``qops.gates.gate`` with the given GateSpec."""
    def judge(res) -> dict:
        ev = evaluate_with_gates(fp32_model, res.model_path, validation, gates, label=label,
                                 slice_columns=slice_columns or [], intersections=intersections, features=features,
                                 target=res.recipe, latency_runs=latency_runs, bootstrap=bootstrap)
        verdict = gate(ev, gates)
        primary = ev.overall[ev.primary_metric]
        failing = [c.name.split(":", 1)[1][:-1] for c in verdict.checks
                   if c.name.startswith("slice_drop[") and (not c.passed or c.status == "failed")]
        return {"passed": verdict.passed, "failing_slices": list(dict.fromkeys(failing)),
                "max_latency_ratio": gates.max_latency_ratio,
                "failures": [f"{c.name}: {c.detail}" for c in verdict.checks if not c.passed],
                "latency_ratio": ev.performance["latency_ratio"], "size_ratio": ev.performance["size_ratio"],
                "fidelity": ev.fidelity,
                "metrics": {ev.primary_metric: {"fp32": primary["fp32"], "quantized": primary["quantized"]}}}

    return judge


def search_space(recipe: Recipe, cfg: TuningSpec, has_calibration: bool, preferred_mode: str | None = None,
                 kind: str | None = None) -> list[dict]:
    """Recipe option sets to try, the recipe's own settings first (for ``mode: auto``, the mode the graph's
    structure picks first). Convolutional graphs (``kind``) try, by measured gain per second on a real mobile CNN:
    the default (integer graph + bias correction), then learned rounding, then exact cross-layer equalization, then
    the other calibration methods, and dynamic INT8 last (it leaves Convs in float)."""
    base: dict = {}
    cands: list[dict] = [base]
    if recipe.engine != "onnxruntime":
        return cands
    if recipe.precision == "int8":
        modes = cfg.modes or (["static", "dynamic"] if recipe.mode == "auto" else [recipe.mode])
        if recipe.mode == "auto":
            cands = []  # "recipe defaults" would repeat the first explicit candidate of the preferred mode
            if preferred_mode in modes:
                modes = [preferred_mode] + [m for m in modes if m != preferred_mode]
        if not has_calibration:
            modes = [m for m in modes if m != "static"] or ["dynamic"]
        gran = [g == "per-channel" for g in cfg.granularities]
        acts = cfg.activation_types or [recipe.activation_type]
        first = cfg.calibration_methods[:1]
        ops = [recipe.op_types] + ([()] if cfg.try_all_ops and recipe.op_types else [])
        attention = preferred_mode == "dynamic"  # choose_mode picks dynamic for attention/recurrent graphs
        egs = cfg.embedding_granularities or (["per-row"] if attention else [recipe.embedding_granularity])
        alphas = cfg.smooth_quant_alphas if cfg.smooth_quant_alphas is not None else (
            ["auto", 0.7] if attention else [])
        basic: dict[str, list] = {
            "static": [{"mode": "static", "calibration_method": m, "per_channel": pc, "activation_type": act,
                        "op_types": o, "embedding_granularity": eg}
                       for m in first for o, pc, act, eg in itertools.product(ops, gran, acts, egs)],
            "dynamic": [{"mode": "dynamic", "per_channel": pc, "op_types": o, "embedding_granularity": eg}
                        for o, pc, eg in itertools.product(ops, gran, egs)],
        }
        # breadth first: every mode's basic variants, then the other calibration methods, then SmoothQuant;
        # for attention graphs (activation outliers) SmoothQuant right after the first dynamic candidate
        if attention and has_calibration and "dynamic" in modes and alphas:
            cands += basic["dynamic"][:1] + [{"mode": "dynamic", "smooth_quant_alpha": a, "per_channel": True,
                                              "embedding_granularity": eg} for a in alphas for eg in egs]
        others = [{"mode": "static", "calibration_method": m, "per_channel": pc, "activation_type": act,
                   "op_types": o} for m in cfg.calibration_methods[1:]
                  for o, pc, act in itertools.product(ops, gran, acts)] if "static" in modes else []
        if kind == "convolutional" and "static" in modes:
            first_static = basic["static"][:1]
            cands += first_static + [dict(c, learned_rounding=True) for c in first_static]
            cands += [dict(c, equalization="exact") for c in first_static]  # Relu chains (none in ReLU6 nets)
            cands += [c for c in others if c.get("per_channel", True)] + basic["static"][1:]
            cands += [c for c in others if not c.get("per_channel", True)]
            cands += [c for m in modes if m != "static" for c in basic[m]]
            others = []
        else:
            for mode in modes:
                cands += basic[mode]
        cands += others
        if has_calibration:  # SmoothQuant measures activations on the calibration set, for either mode
            cands += [{"mode": m, "smooth_quant_alpha": a, "per_channel": True, "embedding_granularity": eg}
                      for m in modes for a in alphas for eg in egs]
    elif recipe.precision == "int4":
        for algo, block in itertools.product(["rtn"] + (["awq", "gptq"] if has_calibration else []), [128, 32]):
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
            parts.append(f"{len(v)} node(s) kept out")  # FP32, INT16 weights or INT8: technique.precision
        elif k == "per_channel":
            parts.append("per-channel" if v else "per-tensor")
        elif k == "op_types":
            parts.append("all ops" if not v else "ops " + "/".join(v))
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


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


def tune(
    model: str | os.PathLike,
    recipe: Recipe,
    output: str | os.PathLike,
    judge: Judge,
    calibration: str | os.PathLike | None = None,
    features: list[str] | None = None,
    config: TuningSpec | dict | None = None,
    ranking_data: str | os.PathLike | None = None,
    validation: str | os.PathLike | None = None,
    failed_output: str | os.PathLike | None = None,
):
    """Search ``recipe``'s space, fall back nodes if needed, write the chosen candidate to ``output``.

    ``ranking_data``: rows on which node sensitivity is measured overall (default: the calibration set);
    ``validation``: the validation table, whose rows of each failing slice are measured as well.
    ``failed_output``: where the most faithful candidate goes when none passes (``qops quantize --tune`` names it
    ``*.failed.onnx``, so the final name never holds a failing model); default ``output`` (the pipeline, whose
    gate stage then fails it). The result's ``passed`` says which it was."""
    cfg = TuningSpec(**config) if isinstance(config, dict) else (config or TuningSpec())
    output = Path(output)
    check_output_path(model, output)
    t_start = time.perf_counter()
    deadline = t_start + cfg.timeout_s
    trials: list[dict] = []
    results: dict[int, object] = {}
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(output.parent)
    work = Path(tempfile.mkdtemp(prefix=temp_prefix("trials-"), dir=output.parent))

    def budget_left() -> bool:
        return len(trials) < cfg.max_trials and time.perf_counter() < deadline

    def attempt(opts: dict, phase: str) -> dict:
        idx = len(trials)
        row = {"trial": idx + 1, "phase": phase, "config": _label(opts), "options": opts}
        t0 = time.perf_counter()
        try:
            with calibration_cache(work / "calibration-cache"):  # trials calibrating the same graph share ranges
                res = quantize(model, recipe, work / f"trial{idx:02d}{recipe.output_suffix}",
                               calibration=calibration, features=features, options=opts)
            verdict = judge(res)
        except QopsError as e:
            row.update(passed=False, verdict="error", reasons=[e.problem], seconds=round(time.perf_counter() - t0, 2))
            trials.append(row)
            log.info("trial %d (%s): error: %s", idx + 1, row["config"], e.problem)
            return row
        reasons = list(verdict.get("failures") or [])
        lat = verdict.get("latency_ratio")
        max_lat = verdict.get("max_latency_ratio", 1.0)
        if lat is not None and lat > max_lat and not any("latency" in r for r in reasons):
            reasons.append(f"slower than FP32 ({lat:.2f}x FP32's batch-1 p50)")
        passed = bool(verdict.get("passed")) and not reasons
        row["failing_slices"] = list(verdict.get("failing_slices") or [])
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

    preferred = kind = None
    if recipe.engine == "onnxruntime":
        kind = graph_kind(load(model, external=False))
        preferred = choose_mode(kind) if recipe.mode == "auto" else None
    space = search_space(recipe, cfg, calibration is not None, preferred, kind)
    # node fallback: INT8 layers back to FP32 (INT16 weights in static QDQ graphs), INT4 layers to INT8 or FP32
    fallback_on = cfg.max_fallback_nodes > 0 and recipe.engine == "onnxruntime" and recipe.precision in ("int8", "int4")
    reserve = min(cfg.max_trials - 1, max(2, math.ceil(cfg.fallback_share * cfg.max_trials))) if fallback_on else 0
    search_budget = cfg.max_trials - reserve
    stop = ""
    rankings: dict[int, list[dict]] = {}
    try:
        searched = 0
        for opts in space[:search_budget]:
            if not budget_left():
                break
            attempt(opts, "search")
            searched += 1
        if not any(t["passed"] for t in trials) and fallback_on and budget_left() and results:
            data = ranking_data or calibration
            bases = _fallback_bases(trials, results, recipe)
            for b in bases:
                rankings[b["trial"]] = _rank_for(model, results[b["trial"] - 1].model_path, recipe, features, data,
                                                 validation, b.get("failing_slices") or [], work)
                log.info("node fallback from trial %d (%s): %d nodes ranked by SQNR lost", b["trial"], b["config"],
                         len(rankings[b["trial"]]))
            schedule = []
            for k in [2**i for i in range(12)]:
                for b in bases:
                    limit = min(cfg.max_fallback_nodes, len(rankings[b["trial"]]))
                    if limit and min(k, limit) not in [kk for bb, kk in schedule if bb is b]:
                        schedule.append((b, min(k, limit)))
            tried: set = set()
            for b, k in schedule:
                if not budget_left():
                    break
                nodes = [r["node"] for r in rankings[b["trial"]][:k]]
                key = (tuple(sorted(b["options"].items(), key=str)), tuple(nodes))
                if key in tried:
                    continue
                tried.add(key)
                opts = dict(b["options"], nodes_to_exclude=nodes)
                row = attempt(opts, "fallback")
                row["fp32_nodes"], row["fallback_from"] = nodes, b["trial"]
                if row["passed"]:
                    stop = f"a fallback candidate passed (trial {row['trial']})"
                    break
            else:
                if rankings and not any(t["passed"] for t in trials) and budget_left():
                    stop = "fallback exhausted: every ranked node of every base config was tried"
        passed_any = any(t["passed"] for t in trials)
        if (passed_any and not stop) or (not passed_any and budget_left() and searched < len(space)):
            # something passed: spend what is left looking for a faster candidate; nothing passed and fallback
            # is done: the trials it did not need go back to the search
            if stop:
                stop += "; the unused fallback trials went back to the search"
            for opts in space[searched:]:
                if not budget_left():
                    break
                row = attempt(opts, "search")
                if row["passed"] and not passed_any:
                    stop = f"a search candidate passed after fallback (trial {row['trial']})"
                    passed_any = True
        if not stop:
            if len(trials) >= cfg.max_trials:
                stop = f"trial budget used ({cfg.max_trials} trials: {search_budget} search, {reserve} kept for fallback)"
            elif time.perf_counter() >= deadline:
                stop = f"time budget used ({cfg.timeout_s:.0f} s)"
            elif not fallback_on and not any(t["passed"] for t in trials):
                stop = "search space exhausted; node fallback does not apply to this recipe"
            else:
                stop = "search space exhausted"
        fallback = merge_rankings({f"trial {k}": v for k, v in rankings.items()})
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
            # the most faithful candidate that meets the latency and size bounds (a faithful one 7x slower than
            # FP32 is no fallback); the most faithful of all only when none does
            within = [t for t in scored if not any("latency" in r or "slower" in r or "size" in r
                                                   for r in t.get("reasons") or [])]
            chosen = max(within or scored, key=_fidelity_key)
        for t in trials:
            t["chosen"] = t is chosen
        res = results[chosen["trial"] - 1]
        trial_model = Path(res.model_path)
        final = output if passing or failed_output is None else Path(failed_output)
        res.model_path = str(final)
        res.recipe_path = str(final.with_suffix(final.suffix + ".recipe.json"))
        res.passed = bool(passing)
        res.trials = [_row_for_card(t) for t in trials]
        res.tuning = {
            "trials": len(trials), "passed": bool(passing), "chosen_trial": chosen["trial"],
            "chosen_config": chosen["config"], "seconds": round(time.perf_counter() - t_start, 1),
            "rule": f"fastest passing candidate (latency ratio vs FP32; within {cfg.latency_tie:.0%} counts as a tie, "
                    f"broken by file size (within {cfg.size_tie:.0%}), then fidelity); if none passes, the most faithful "
                    "candidate is kept and the gates fail it",
            "node_ranking": fallback[:max(cfg.max_fallback_nodes, 8)],
            "stopped": stop,
            "fallback_bases": [int(k) for k in rankings],
            "budget": {"max_trials": cfg.max_trials, "timeout_s": cfg.timeout_s, "search_trials": search_budget,
                       "fallback_trials": reserve, "fallback_share": cfg.fallback_share},
        }
        if not passing:
            res.notes.append(f"tuning found no candidate that passes the gates in {len(trials)} trial(s)"
                             + (f"; the most faithful one is written to {final.name}, not {output.name}"
                                if final != output else ""))
        # the recipe (naming the model's sha256) first, the model last: a kill between leaves no unexplained model
        write_recipe(res)
        _install(trial_model, final)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fallback_bases(trials: list[dict], results: dict, recipe: Recipe) -> list[dict]:
    """Configs to fall back from: the most faithful failing candidate, and the one quantizing the fewest op
    types (other quantized ops may erase what the sensitive node carries); a second-most faithful one if
    those are the same."""
    scored = [t for t in trials if t["trial"] - 1 in results and t["phase"] == "search"]
    if not scored:
        return []
    faithful = sorted(scored, key=_fidelity_key, reverse=True)

    def n_ops(t):
        ops = t["options"].get("op_types", recipe.op_types)
        return 10**6 if not ops else len(ops)

    fewest = min(scored, key=lambda t: (n_ops(t), -_fidelity_key(t)))
    bases = [faithful[0]] + ([fewest] if fewest is not faithful[0] else [])
    if len(bases) == 1 and len(faithful) > 1:
        bases.append(faithful[1])
    return bases


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


def _rank_for(model, quantized_path, recipe: Recipe, features, data, validation, slices: list[str],
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
        "options": t.get("options", {}), "seconds": t.get("seconds"), "fallback_from": t.get("fallback_from"),
    }


def _install(src: Path, dst: Path) -> None:
    """Copy the chosen candidate (and its external data) into place, model file last."""
    data = src.with_name(src.name + ".data")
    if data.is_file():
        move_model(src, dst, external=True)
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
