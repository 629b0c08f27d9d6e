"""Tails in decoder evaluations: the 99th-percentile KL over positions, overall and per slice, from per-row counts
(so slices and bootstrap resamples need no per-token storage), gateable like the means. Fake decoders with known
logits: the figures are computed, not trained."""

from __future__ import annotations

import numpy as np
import pytest


class Fixed:
    """A decoder whose logits for a window are a fixed function of the window's row and token ids."""

    def __init__(self, noise: float, seed: int):
        self.noise, self.seed = noise, seed

    def prefill(self, ids):
        rng = np.random.default_rng([self.seed, int(ids.sum())])
        base = np.random.default_rng(int(ids.sum())).normal(0, 3, (len(ids), 50))
        spikes = (rng.random(len(ids)) < 0.02)[:, None] * rng.normal(0, 6, (len(ids), 50))  # rare large errors
        return base + self.noise * rng.normal(0, 1, base.shape) + spikes * (self.noise > 0)


def _windows(n_rows=40, per_row=2, length=40):
    from qops.llm.data import Window

    rng = np.random.default_rng(0)
    return [Window(r, rng.integers(0, 50, length), 1) for r in range(n_rows) for _ in range(per_row)]


def test_kl_p99_is_the_tail_the_mean_hides_overall_and_per_slice():
    from qops.llm.evaluate import _log_softmax, score_rows, score_windows

    windows = _windows()
    fp32, quant = Fixed(0.0, 1), Fixed(0.05, 2)
    sums = score_windows(fp32, quant, windows, 40)
    kls = []
    for w in windows:  # the per-position KL, computed directly
        a, b = _log_softmax(fp32.prefill(w.ids)), _log_softmax(quant.prefill(w.ids))
        pos = np.arange(w.first_scored, len(w.ids)) - 1
        kls.append((np.exp(a[pos]) * (a[pos] - b[pos])).sum(-1))
    kls = np.concatenate(kls)
    all_rows = score_rows(sums, np.arange(40), "all", bootstrap=200, confidence=0.95, seed=0)
    p99 = all_rows["kl_p99"]["quantized"]
    assert p99 == pytest.approx(np.quantile(kls, 0.99), rel=0.15)  # bins a factor 1.33 wide
    assert p99 > 5 * all_rows["kl_divergence"]["quantized"]  # the tail is far above the mean
    assert all_rows["kl_p99"]["ci_low"] is not None and all_rows["kl_p99"]["ci_low"] <= all_rows["kl_p99"]["delta"]
    half = score_rows(sums, np.arange(20), "first-half", bootstrap=0, confidence=0.95, seed=0)
    first = np.concatenate(kls.reshape(40, -1)[:20])
    assert half["kl_p99"]["quantized"] == pytest.approx(np.quantile(first, 0.99), rel=0.15)


def test_a_gate_on_kl_p99_reads_it_as_lower_is_better():
    from qops.gates import gate
    from qops.spec import GateSpec

    def ev(p99, se=0.002):
        inc = {"fp32": 0.0, "quantized": 0.001, "delta": 0.001, "ci_low": 0.0, "ci_high": 0.002, "se": se,
               "quantized_se": se}
        return {"overall": {"perplexity_increase": inc,
                            "kl_p99": {"fp32": 0.0, "quantized": p99, "delta": p99, "quantized_se": 0.01}},
                "slices": [], "fairness": {}, "rows": 100, "flips": None,
                "performance": {"latency_ratio": 0.7, "size_ratio": 0.2, "latency_p50_ms": {"fp32": 1, "quantized": 0.7},
                                "size_bytes": {"fp32": 10, "quantized": 2}}}

    g = GateSpec(task="causal_lm", max_overall_drop=0.05, thresholds=[{"metric": "kl_p99", "max_value": 0.5}])
    bad = gate(ev(1.2), g)
    assert not bad.passed and any("kl_p99" in f for f in bad.failed)
    assert gate(ev(0.2), g).passed
