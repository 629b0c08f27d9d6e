"""Decoder-LLM evaluation, FP32 against quantized, overall and per slice, in the evaluation JSON the gates, cards
and registry read for every model (:class:`qops.evaluate.EvaluationResult`).

Metrics per scored token, summed per row (document):
- ``perplexity``: exp of the mean next-token negative log-likelihood;
- ``perplexity_increase``: quantized perplexity / FP32 perplexity - 1 on the same tokens (the primary metric; FP32's
  own value is 0);
- ``agreement``: the share of positions whose top-1 next token equals FP32's (FP32: 1);
- ``kl_divergence``: mean KL(FP32 || quantized) of the next-token distributions, in nats (FP32: 0);
- ``kl_p99``: the 99th percentile of that KL over positions (means hide tails: users of these tools report mean KL
  0.07 with a p99.9 of 2.5), read from per-row counts in log-spaced bins (resolution: a factor 1.33).
The share of positions whose top-1 token flips is ``1 - agreement``.
Intervals: a paired bootstrap over rows (a cluster bootstrap: tokens of one document are not independent).
Generation speed at batch 1 with the KV cache (time to first token, decode tokens/s; the two models interleaved),
peak resident memory of a process that loads the model and generates, and file size.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from qops.data.tables import read_table, require_columns
from qops.errors import DataError
from qops.evaluate import EvaluationResult, file_size, hardware_match, slice_keys, worker_hardware
from qops.llm.runner import generation_timing, open_decoder

log = logging.getLogger(__name__)

LLM_METRICS = ("perplexity_increase", "agreement", "kl_divergence", "kl_p99", "perplexity")
SUMS = ("nll32", "nllq", "agree", "kl", "tokens", "klhist")
# per-position KL counted in log-spaced bins (1e-6 .. 100 nats, 8 bins per decade, plus an underflow bin): tail
# quantiles per slice and per bootstrap resample from summed counts, in memory independent of the token count
KL_EDGES = np.concatenate([[0.0], np.logspace(-6, 2, 65)])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def score_windows(fp32, quant, windows, n_rows: int, progress=None) -> dict[str, np.ndarray]:
    """Per row sums over its scored tokens: FP32 and quantized NLL, top-1 agreements, KL, token count."""
    acc = {k: np.zeros((n_rows, len(KL_EDGES) - 1) if k == "klhist" else n_rows) for k in SUMS}
    for i, w in enumerate(windows):
        a, b = _log_softmax(fp32.prefill(w.ids)), _log_softmax(quant.prefill(w.ids))
        pos = np.arange(w.first_scored, len(w.ids))  # targets; predicted from pos - 1
        tgt = w.ids[pos]
        la, lb = a[pos - 1], b[pos - 1]
        acc["nll32"][w.row] -= la[np.arange(len(pos)), tgt].sum()
        acc["nllq"][w.row] -= lb[np.arange(len(pos)), tgt].sum()
        acc["agree"][w.row] += (la.argmax(-1) == lb.argmax(-1)).sum()
        kl = (np.exp(la) * (la - lb)).sum(-1)
        acc["kl"][w.row] += kl.sum()
        acc["klhist"][w.row] += np.histogram(np.clip(kl, 0.0, KL_EDGES[-1]), KL_EDGES)[0]
        acc["tokens"][w.row] += len(pos)
        if progress and (i + 1) % 50 == 0:
            progress(i + 1, len(windows))
    return acc


def _hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of values counted in ``KL_EDGES`` bins (last axis), interpolated log-linearly in its bin."""
    cum = np.cumsum(hist, axis=-1)
    total = cum[..., -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        target = q * total
        k = np.clip((cum < target).sum(-1), 0, hist.shape[-1] - 1)
        below = np.take_along_axis(cum, k[..., None], -1)[..., 0] - np.take_along_axis(hist, k[..., None], -1)[..., 0]
        frac = np.clip((target[..., 0] - below) / np.take_along_axis(hist, k[..., None], -1)[..., 0], 0, 1)
    lo, hi = KL_EDGES[k], KL_EDGES[k + 1]
    lo = np.where(k == 0, 0.0, lo)
    out = np.where(k == 0, hi * frac, lo * (hi / np.where(lo > 0, lo, 1)) ** frac)
    return np.where(total[..., 0] > 0, out, np.nan)


def _metric_values(t: dict[str, np.ndarray]) -> dict[str, tuple]:
    """(FP32, quantized) per metric from totals over rows (scalars, or arrays over bootstrap resamples)."""
    n = t["tokens"]
    with np.errstate(divide="ignore", invalid="ignore"):
        m32, mq = t["nll32"] / n, t["nllq"] / n
        return {
            "perplexity_increase": (np.zeros_like(n), np.exp(mq - m32) - 1.0),
            "agreement": (np.ones_like(n), t["agree"] / n),
            "kl_divergence": (np.zeros_like(n), t["kl"] / n),
            "kl_p99": (np.zeros_like(n), _hist_quantile(t["klhist"], 0.99)),
            "perplexity": (np.exp(m32), np.exp(mq)),
        }


def score_rows(sums: dict[str, np.ndarray], rows: np.ndarray, key: str, bootstrap: int, confidence: float,
               seed: int) -> dict:
    sub = {k: v[rows] for k, v in sums.items()}
    if sub["tokens"].sum() == 0:
        return {m: {"fp32": None, "quantized": None, "delta": None, "ci_low": None, "ci_high": None,
                    "ci_method": None} for m in LLM_METRICS}
    point = _metric_values({k: v.sum(0) for k, v in sub.items()})
    out = {}
    boot = None
    if bootstrap and len(rows) > 1:
        rng = np.random.default_rng([seed, *key.encode()])
        idx = rng.integers(0, len(rows), size=(bootstrap, len(rows)))
        draws = np.stack([np.bincount(i, minlength=len(rows)) for i in idx]).astype(float)  # resample x row
        boot = _metric_values({k: draws @ v for k, v in sub.items()})
    alpha = 1 - confidence
    for m in LLM_METRICS:
        a, b = float(point[m][0]), float(point[m][1])
        e = {"fp32": a, "quantized": b, "delta": b - a, "ci_low": None, "ci_high": None, "ci_method": None,
             "tokens": int(sub["tokens"].sum())}
        if boot is not None:
            d = boot[m][1] - boot[m][0]
            d = d[np.isfinite(d)]
            if len(d) > 1:
                lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
                e.update(ci_low=float(lo), ci_high=float(hi), se=float(np.std(d, ddof=1)),
                         quantized_se=float(np.std(boot[m][1][np.isfinite(boot[m][1])], ddof=1)),
                         ci_method=f"paired bootstrap over rows ({len(d)} resamples)")
        out[m] = e
    return out


def peak_memory(path: str | os.PathLike, info, prompt: np.ndarray, new_tokens: int, recipe: dict | None) -> int | None:
    """Peak resident memory (bytes) of a fresh process that loads the model, prefills ``prompt`` and decodes
    ``new_tokens`` tokens, minus the same process's footprint before loading (the interpreter and libraries)."""
    args = json.dumps({"path": str(path), "info": info.__dict__, "prompt": [int(t) for t in prompt],
                       "new_tokens": new_tokens, "recipe": recipe})
    try:
        proc = subprocess.run([sys.executable, "-m", "qops.llm.memprobe"], input=args, capture_output=True, text=True,
                              timeout=1800)
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError):
        log.warning("peak memory probe failed for %s", path)
        return None


def artifact_size(path) -> int:
    """Bytes of an ONNX model with its external data, or of a checkpoint folder's weight files."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".onnx",
                                                                                          ".data", ".bin"))
    return file_size(p)


def evaluate_llm(fp32_model, quantized_model, validation, kind, info, *, slice_columns=(), intersections=(),
                 bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0, target: dict | None = None,
                 prompt_length: int = 64, new_tokens: int = 32, speed_prompts: int = 5, speed_rounds: int = 2,
                 max_rows: int | None = None, fp32_decoder=None, measure_memory: bool = True):
    """FP32 vs quantized decoder on the validation rows (``kind``: :class:`qops.llm.data.CausalLM`)."""
    slice_columns = list(slice_columns)
    intersections = [list(i) for i in intersections]
    df = read_table(validation, "validation set")
    if max_rows and len(df) > max_rows:
        df = df.sample(max_rows, random_state=seed).sort_index()
    df = df.reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"The validation set {validation} is empty.", "point data.validation at rows of text.")
    require_columns(df, [kind.column] + slice_columns + [c for i in intersections for c in i], "validation set",
                    validation)
    windows = kind.windows(df, "validation set")
    f32 = fp32_decoder or open_decoder(fp32_model, info, recipe=None if Path(fp32_model).suffix == ".onnx" else target)
    q = open_decoder(quantized_model, info, recipe=target)
    log.info("scoring %d windows of %d rows (seq_len %d, stride %d) on both models", len(windows), len(df),
             kind.seq_len, kind.stride)
    sums = score_windows(f32, q, windows, len(df), progress=lambda i, n: log.info("scored %d/%d windows", i, n))
    overall = score_rows(sums, np.arange(len(df)), "__overall__", bootstrap, confidence, seed)
    dims = [[c] for c in slice_columns] + intersections
    slices = [{"dimension": d, "key": k, "n": int(len(rows)), "flips": None,
               "metrics": score_rows(sums, rows, k, bootstrap, confidence, seed)}
              for d, k, rows in slice_keys(df, dims)]
    # generation speed: prompts of prompt_length tokens from the longest rows (fixed, seeded choice)
    toks = kind.tokens(df, "validation set")
    order = np.argsort([-len(t) for t in toks], kind="stable")[:speed_prompts]
    prompts = [toks[i][:prompt_length] for i in order]
    log.info("timing generation: %d prompts x %d rounds, %d new tokens, interleaved", len(prompts), speed_rounds,
             new_tokens)
    t32, tq = generation_timing([f32, q], prompts, new_tokens, rounds=speed_rounds)
    mem32 = memq = None
    if measure_memory:
        mem32 = peak_memory(fp32_model, info, prompts[0], new_tokens, None)
        memq = peak_memory(quantized_model, info, prompts[0], new_tokens, target)
    s32, sq = artifact_size(fp32_model), artifact_size(quantized_model)
    hw = worker_hardware()
    performance = {
        "size_bytes": {"fp32": int(s32), "quantized": int(sq)},
        "size_ratio": sq / s32,
        "latency_p50_ms": {"fp32": round(t32["decode_ms_per_token_p50"], 5),
                           "quantized": round(tq["decode_ms_per_token_p50"], 5)},
        "latency_p90_ms": {"fp32": round(t32["decode_ms_per_token_p90"], 5),
                           "quantized": round(tq["decode_ms_per_token_p90"], 5)},
        "latency_ratio": tq["decode_ms_per_token_p50"] / t32["decode_ms_per_token_p50"],
        "latency_method": f"batch-1 greedy decode with the KV cache: p50 time per decoded token over "
        f"{tq['decode_steps']} steps ({len(prompts)} prompts of {len(prompts[0])} tokens, {new_tokens} new tokens, "
        f"{speed_rounds} rounds after a warm-up), FP32 and quantized interleaved; FP32: {f32.describe}; quantized: "
        f"{q.describe}",
        "latency_input": f"decode step after a {len(prompts[0])}-token prompt",
        "ttft_ms": {"fp32": round(t32["ttft_ms_p50"], 4), "quantized": round(tq["ttft_ms_p50"], 4)},
        "decode_tokens_per_s": {"fp32": round(t32["decode_tokens_per_s"], 2),
                                "quantized": round(tq["decode_tokens_per_s"], 2)},
        "peak_memory_bytes": {"fp32": mem32, "quantized": memq},
        "generation": {"prompt_tokens": int(len(prompts[0])), "new_tokens": new_tokens, "prompts": len(prompts),
                       "rounds": speed_rounds},
    }
    return EvaluationResult(
        task="causal_lm", primary_metric="perplexity_increase", metrics=list(LLM_METRICS), rows=len(df), label=None,
        dimensions=[" & ".join(d) for d in dims], overall=overall, slices=slices, fairness={},
        performance=performance, fp32_model=str(fp32_model), quantized_model=str(quantized_model),
        validation=str(validation), outputs="logits", flips=None, data={**kind.describe(), "windows": len(windows),
                                                                          "scored_tokens": int(sums["tokens"].sum())},
        batch_size=1, bootstrap={"resamples": bootstrap, "confidence": confidence, "seed": seed, "paired": True,
                                 "unit": "rows (documents)"},
        hardware=hw, hardware_match=hardware_match(target, hw),
        fidelity={"agreement": overall["agreement"]["quantized"], "kl": overall["kl_divergence"]["quantized"]},
    )
