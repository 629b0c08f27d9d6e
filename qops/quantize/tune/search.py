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

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from qops.artifacts import atomic_path, clean_stale_temps, temp_prefix
from qops.errors import QopsError
from qops.quantize.api import quantize
from qops.quantize.calib_cache import calibration_cache
from qops.quantize.graph import choose_mode, graph_kind, load
from qops.quantize.result import check_output_path, move_model, write_recipe
from qops.quantize.tune.sensitivity import merge_rankings, rank_for
from qops.quantize.tune.space import candidate_label, search_space
from qops.spec import TuningSpec
from qops.targets import Recipe

log = logging.getLogger(__name__)


Judge = Callable[[object], dict]  # QuantizeResult -> {passed, failures, latency_ratio, size_ratio, fidelity, metrics}


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
        """Trials left, and time for one more: a trial starts only if it should end within the budget (by the
        median time of the trials so far), so the search ends near ``timeout_s``, not a whole trial past it."""
        took = sorted(t["seconds"] for t in trials if t.get("seconds") is not None)
        expected = took[len(took) // 2] if took else 0.0
        return len(trials) < cfg.max_trials and time.perf_counter() + expected < deadline

    def attempt(opts: dict, phase: str) -> dict:
        idx = len(trials)
        row = {"trial": idx + 1, "phase": phase, "config": candidate_label(opts), "options": opts}
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
                rankings[b["trial"]] = rank_for(model, results[b["trial"] - 1].model_path, recipe, features, data,
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
            elif not budget_left():
                stop = (f"time budget used ({cfg.timeout_s:.0f} s; no trial starts that would end past it by the "
                        "median trial time)")
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
