"""Accuracy-aware tuning for decoder-LLM targets (a spec's ``tuning`` block with ``data.kind: causal_lm``).

The search space is the target engine's own options (:func:`llm_space`): for ONNX INT4, GPTQ (symmetric or
asymmetric, in activation order), AWQ and asymmetric round-to-nearest, block sizes, the lm_head's precision and mixed
INT4/INT8 (the costliest attention/MLP groups by measured sensitivity kept 8-bit, at their stated size); for
W8A8, SmoothQuant strengths and none; for compressed-tensors, the algorithm and activation order; for GGUF, the
importance matrix. Each candidate has an expected gain and a relative cost, and the trials run in order of gain per
second of cost, within ``max_trials`` and ``timeout_s``.

Every trial quantizes on the *fit* part of the calibration windows and is scored on the rest (every fourth
calibration document, never used to fit it): perplexity increase, top-1 agreement, KL and its p99 against the FP32
reference, judged by the spec's own gates (:func:`qops.gates.gate`; latency is the evaluate stage's, measured on the
winner). The smallest passing candidate wins (sizes within ``size_tie`` tie; then the lowest KL); when none passes,
the most faithful (lowest KL) is kept, so the evaluate stage re-measures it on the validation set and the gate stage
fails the run (exit 3) with the best there was. The trial table goes to ``quantize.json`` and the card."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from qops.errors import QopsError
from qops.gates import gate
from qops.llm.evaluate import score_rows, score_windows
from qops.llm.runner import open_decoder
from qops.llm.sensitivity import keep_costliest, layer_sensitivity, write_overrides

log = logging.getLogger(__name__)

HELD_OUT_EVERY = 4  # every 4th calibration document scores the trials and fits none of them
MIXED = "mixed_int8"  # a tuner-only option: keep the N costliest attention/MLP groups 8-bit (qops sensitivity)
SENSITIVITY_WINDOWS = 16  # fit windows the sensitivity pass measures

# (options, expected gain, relative cost): gains are priors for the order only (every trial is measured); costs are
# relative quantization times (round-to-nearest 1; AWQ's search 3; GPTQ's Hessians and updates 8)
_GPTQ = {"algorithm": "gptq", "symmetric_weights": False, "act_order": True, "clip_search": True}
_INT4 = [(_GPTQ, 1.0, 8),
         ({"algorithm": "rtn", "symmetric_weights": False}, 0.4, 1),
         ({"algorithm": "awq", "symmetric_weights": False}, 0.6, 3),
         ({**_GPTQ, "symmetric_weights": True}, 0.7, 8),
         ({"algorithm": "awq"}, 0.4, 3),
         ({**_GPTQ, "block_size": 64}, 0.5, 8),
         ({**_GPTQ, "lm_head": "int4"}, 0.3, 8),
         # the sensitivity pass (two passes of the model per layer over 16 windows) costs about twice a GPTQ run
         ({**_GPTQ, MIXED: 4}, 1.5, 24),
         ({**_GPTQ, MIXED: 10}, 1.3, 24)]
_W8A8 = [({"smooth_quant_alpha": 0.5, "activation_granularity": "per-block"}, 1.0, 2),
         ({"smooth_quant_alpha": None, "activation_granularity": "per-block"}, 0.6, 1),
         ({"smooth_quant_alpha": 0.7, "activation_granularity": "per-block"}, 0.5, 2),
         ({"smooth_quant_alpha": 0.3, "activation_granularity": "per-block"}, 0.5, 2)]
_CT_INT4 = [({"algorithm": "gptq", "act_order": True, "clip_search": True}, 1.0, 8), ({"algorithm": "awq"}, 0.6, 3),
            ({"algorithm": "gptq", "act_order": False, "clip_search": False}, 0.5, 8), ({"algorithm": "rtn"}, 0.2, 1)]
# W8A8 for vLLM: each candidate measures its own activation fallback (the sensitivity pass costs about a GPTQ run);
# without it, a smaller, faster and less faithful checkpoint
_CT_INT8 = [({"smooth_quant_alpha": 0.5}, 1.0, 16), ({"smooth_quant_alpha": 0.5, "activation_fallback": 0.0}, 0.5, 8),
            ({"smooth_quant_alpha": None}, 0.4, 16), ({"smooth_quant_alpha": 0.7}, 0.5, 16),
            ({"smooth_quant_alpha": 0.3}, 0.4, 16)]
_GGUF = [({"imatrix": True}, 1.0, 2), ({"imatrix": False}, 0.5, 1)]
# (engine, precision) -> candidates; precision None: every precision of that engine
SPACES = {("onnxruntime", "int4"): _INT4, ("onnxruntime", "int8"): _W8A8, ("compressed-tensors", "int4"): _CT_INT4,
          ("compressed-tensors", "int8"): _CT_INT8, ("llama.cpp", None): _GGUF}


def llm_space(recipe) -> list[dict]:
    """The candidates for ``recipe`` (option dicts), the recipe as it is first, then by expected gain per unit of
    cost; candidates the recipe already is are dropped. Engines without a search (bitsandbytes, torchao) get just the
    recipe."""
    table = SPACES.get((recipe.engine, recipe.precision), SPACES.get((recipe.engine, None)))
    out: list[dict] = [{}]
    seen = [{**recipe.to_dict(), MIXED: None}]
    for opts, _gain, _cost in sorted(table or [], key=lambda c: -c[1] / c[2]):
        if MIXED in opts and recipe.tensor_overrides:  # the recipe already names its 8-bit layers
            continue
        try:
            d = {**recipe.with_options(**{k: v for k, v in opts.items() if k != MIXED}).to_dict(),
                 MIXED: opts.get(MIXED)}
        except QopsError:  # an option this recipe cannot take (e.g. a block size its layers do not divide)
            continue
        if d not in seen:
            seen.append(d)
            out.append(opts)
    return out


def split_windows(windows) -> tuple[list, list]:
    """(fit, held-out) windows by document: every ``HELD_OUT_EVERY``-th calibration document is held out."""
    rows = sorted({w.row for w in windows})
    held_rows = set(rows[HELD_OUT_EVERY - 1::HELD_OUT_EVERY])
    if len(rows) < 2 * HELD_OUT_EVERY:
        raise QopsError(f"Tuning a decoder target needs at least {2 * HELD_OUT_EVERY} calibration documents (one in "
                        f"{HELD_OUT_EVERY} scores the trials); the calibration set has {len(rows)}.",
                        "raise calibration.size, or turn tuning off for this target.")
    return [w for w in windows if w.row not in held_rows], [w for w in windows if w.row in held_rows]


def tune_llm(engine, hf_dir: Path, recipe, output: Path, inputs, config, gates, seed: int = 0,
             space: list[dict] | None = None):
    """Search ``recipe``'s space (``space``: these candidates instead of :func:`llm_space`'s) with ``engine`` (see
    the module doc); the chosen candidate's artifact ends at ``output`` and its
    :class:`~qops.quantize.QuantizeResult` (with ``trials`` and ``tuning``) is returned. A chosen mixed INT4/INT8
    candidate's override file is kept beside the artifact (``<output>.tensor_overrides.json``), named by its
    recipe."""
    windows = inputs.windows
    if not windows:
        raise QopsError(f"Tuning {recipe.target!r} needs calibration windows (its trials are scored on held-out "
                        "calibration documents).", "run the calibrate stage first (same spec and run id).")
    fit, held = split_windows(windows)
    held_rows = np.array(sorted({w.row for w in held}))
    t_start = time.perf_counter()
    deadline = t_start + config.timeout_s
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.trials-", dir=output.parent))
    fit_inputs = replace(inputs, windows=fit)
    reference = None
    sensitivity: dict | None = None
    sidecar = output.with_name(output.name + ".tensor_overrides.json")  # the chosen mixed recipe's override file
    trials: list[dict] = []
    results: dict[int, object] = {}
    space = llm_space(recipe) if space is None else space
    try:
        for opts in space:
            if len(trials) >= config.max_trials or time.perf_counter() > deadline:
                break
            idx = len(trials)
            if MIXED in opts:  # measure the groups once (on fit windows), then keep the N costliest 8-bit
                if sensitivity is None:
                    sensitivity = layer_sensitivity(hf_dir, fit[:SENSITIVITY_WINDOWS], recipe.block_size, keep=0,
                                                    granularity="part")
                path = write_overrides(keep_costliest(sensitivity, opts[MIXED]), work / f"overrides{idx:02d}.json")
                cand = recipe.with_options(**{k: v for k, v in opts.items() if k != MIXED},
                                           tensor_overrides=str(path))
            else:
                cand = recipe.with_options(**opts) if opts else recipe
            row = {"trial": idx + 1, "phase": "search", "config": _label(opts), "options": opts}
            t0 = time.perf_counter()
            try:
                res = engine.quantize(hf_dir, cand, work / f"trial{idx:02d}{engine.suffix}", inputs=fit_inputs)
                if reference is None:
                    ref = Path(res.source_path)
                    reference = open_decoder(ref, inputs.info, recipe=None if ref.suffix == ".onnx" else res.recipe)
                quant = open_decoder(res.model_path, inputs.info, recipe=res.recipe)
                sums = score_windows(reference, quant, held, int(held_rows.max()) + 1)
                del quant
            except QopsError as e:
                row.update(passed=False, verdict="error", reasons=[e.problem], seconds=round(time.perf_counter() - t0, 2))
                trials.append(row)
                log.info("LLM trial %d (%s): error: %s", idx + 1, row["config"], e.problem)
                continue
            metrics = score_rows(sums, held_rows, "__overall__", config.bootstrap, gates.confidence, seed)
            verdict = _judge(metrics, len(held_rows), res, gates)
            row.update(passed=verdict.passed, verdict="passed" if verdict.passed else "failed",
                       reasons=[c.detail for c in verdict.checks if not c.passed], size_ratio=res.size_ratio,
                       metrics={m: metrics[m]["quantized"] for m in ("perplexity_increase", "agreement",
                                                                     "kl_divergence", "kl_p99")},
                       seconds=round(time.perf_counter() - t0, 2), latency_ratio=None, mode=cand.mode)
            m = row["metrics"]
            row["fidelity_text"] = (f"perplexity {100 * m['perplexity_increase']:+.2f}%, agreement {m['agreement']:.3f}, "
                                    f"KL {m['kl_divergence']:.4f} (held-out calibration documents)")
            trials.append(row)
            results[idx] = res
            log.info("LLM trial %d/%d (%s): %s, perplexity %+.2f%%, agreement %.3f, KL %.4f, %.2fx size, %.0f s",
                     idx + 1, min(config.max_trials, len(space)), row["config"], row["verdict"],
                     100 * row["metrics"]["perplexity_increase"], row["metrics"]["agreement"],
                     row["metrics"]["kl_divergence"], res.size_ratio, row["seconds"])
        if not results:
            raise QopsError(f"Every tuning trial of {recipe.target!r} failed: "
                            + "; ".join(r["reasons"][0] for r in trials if r.get("reasons")),
                            "fix the first error above, or turn tuning off for this target.")
        chosen, rule = _choose(trials, config.size_tie)
        chosen["chosen"] = True
        res = _install(results[chosen["trial"] - 1], work, output, engine)
        if MIXED in chosen["options"]:  # its override file outlives the trials, beside the artifact
            os.replace(work / f"overrides{chosen['trial'] - 1:02d}.json", sidecar)
            res = replace(res, recipe={**res.recipe, "tensor_overrides": str(sidecar)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stopped = ("" if len(trials) == len(space) else f"budget: {len(trials)} of {len(space)} candidates tried "
               f"(max_trials {config.max_trials}, timeout {config.timeout_s:.0f} s)")
    tuning = {"chosen_trial": chosen["trial"], "chosen_config": chosen["config"], "rule": rule, "stopped": stopped,
              "passed": chosen["passed"], "held_out": {"documents": int(len(held_rows)), "windows": len(held)},
              "fit_windows": len(fit), "seconds": round(time.perf_counter() - t_start, 1),
              "budget": {"max_trials": config.max_trials, "timeout_s": config.timeout_s}}
    technique = {**(res.technique or {}), "tuning": tuning}
    return replace(res, trials=trials, tuning=tuning, technique=technique, passed=chosen["passed"],
                   notes=list(res.notes) + [f"tuned: trial {chosen['trial']} of {len(trials)} ({chosen['config']}); "
                                            f"{rule}"])


def _label(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "the recipe as it is"


def _judge(metrics: dict, rows: int, res, gates):
    """The spec's gates on the held-out calibration documents: accuracy checks, and the size bound. Latency is not
    measured per trial (the evaluate stage measures the winner), so no latency check is made here."""
    ev = {"overall": metrics, "slices": [], "rows": rows, "fairness": {}, "flips": None,
          "performance": {"latency_ratio": 0.0, "size_ratio": res.size_ratio,
                          "latency_p50_ms": {"fp32": 0.0, "quantized": 0.0},
                          "size_bytes": {"fp32": res.source_size_bytes, "quantized": res.size_bytes}}}
    result = gate(ev, gates)
    checks = [c for c in result.checks if c.name != "latency_ratio"]
    return type(result)(passed=all(c.passed for c in checks), checks=checks)


def _choose(trials: list[dict], size_tie: float) -> tuple[dict, str]:
    done = [t for t in trials if t["verdict"] != "error"]
    passing = [t for t in done if t["passed"]]
    if passing:
        smallest = min(t["size_ratio"] for t in passing)
        tied = [t for t in passing if t["size_ratio"] <= smallest * (1 + size_tie)]
        return (min(tied, key=lambda t: t["metrics"]["kl_divergence"]),
                f"smallest passing candidate (sizes within {size_tie:.0%} tie), then the lowest KL, on "
                "held-out calibration documents")
    return (min(done, key=lambda t: t["metrics"]["kl_divergence"]),
            "no candidate passed the gates on held-out calibration documents: the most faithful (lowest KL) is kept; "
            "the gate stage judges it on the validation set")


def _install(res, work: Path, output: Path, engine):
    """Move the chosen trial's artifact (a file or a folder) to ``output`` in one rename, replacing what was
    there; the result's model path follows it."""
    artifact = Path(res.model_path).parent if engine.primary else Path(res.model_path)
    if output.exists():  # a retry's earlier artifact: out of the way first (removed with the work folder)
        os.replace(output, work / "previous")
    os.replace(artifact, output)
    model = output / engine.primary if engine.primary else output
    return replace(res, model_path=str(model))
