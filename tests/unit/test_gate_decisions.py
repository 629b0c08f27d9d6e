"""Three-way gate decisions on evidence: intervals made for paired binary outcomes, multiplicity control over the
slice/fairness family, what a slice can protect, and output semantics decided once. The evaluations here are
built from counts, so every outcome is known by construction, whatever CPU runs the suite."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from qops import stats
from qops.errors import SpecError
from qops.evaluate.metrics import model_side, output_semantics
from qops.evaluate.slices import fairness_values
from qops.gates import gate
from qops.spec import GateSpec, InconclusiveSpec, MetricThreshold, parse_spec

LOOSE_PERF = dict(max_latency_ratio=10.0, max_size_ratio=10.0)


def _entry(n: int, fp32_hits: int, worse: int, better: int) -> dict:
    q_hits = fp32_hits - worse + better
    lo, hi = stats.tango_interval(worse, better, n, 0.95)
    return {"fp32": fp32_hits / n, "quantized": q_hits / n, "delta": (q_hits - fp32_hits) / n, "ci_low": -hi,
            "ci_high": -lo, "paired": {"n": n, "worse": worse, "better": better, "quantized_hits": q_hits}}


def _evaluation(slices: dict[str, tuple[int, int, int, int]], overall=(400, 300, 0, 0), fairness=None) -> dict:
    """slices: key -> (n, fp32 correct, turned wrong, turned right)."""
    return {
        "rows": overall[0], "flips": overall[2] + overall[3], "overall": {"accuracy": _entry(*overall)},
        "slices": [{"dimension": k.split("=")[0], "key": k, "n": v[0], "flips": v[2] + v[3],
                    "metrics": {"accuracy": _entry(*v)}} for k, v in slices.items()],
        "fairness": fairness or {},
        "performance": {"latency_ratio": 0.5, "size_ratio": 0.25, "latency_p50_ms": {"fp32": 1.0, "quantized": 0.5},
                        "size_bytes": {"fp32": 4000, "quantized": 1000}},
        "hardware_match": {"matches": True},
    }


# --- the statistics --------------------------------------------------------------------------------------

def test_score_interval_is_honest_at_zero_and_one_discordant_rows():
    z2 = stats.norm_ppf(0.975) ** 2
    lo, hi = stats.tango_interval(0, 0, 26, 0.95)
    assert hi == pytest.approx(z2 / (26 + z2), abs=1e-6) and lo == pytest.approx(-hi, abs=1e-6)  # not a point
    lo1, hi1 = stats.tango_interval(1, 0, 26, 0.95)
    assert lo1 < 0 < 1 / 26 < hi1  # one flip: the interval straddles 0 on both sides
    lo, hi = stats.tango_interval(27, 0, 50, 0.95)
    assert 0.35 < lo < 27 / 50 < hi
    assert stats.tango_interval(5, 3, 200, 0.99)[1] > stats.tango_interval(5, 3, 200, 0.95)[1]


def test_score_interval_covers_the_true_difference():
    """Seeded simulation: 2,000 paired samples of 40 rows; the 95% interval covers the true difference ~95%."""
    rng = np.random.default_rng(0)
    p_worse, p_better, n = 0.08, 0.03, 40
    cells = rng.multinomial(n, [p_worse, p_better, 1 - p_worse - p_better], size=2000)
    cover = np.mean([lo <= p_worse - p_better <= hi
                     for lo, hi in (stats.tango_interval(int(w), int(b), n, 0.95) for w, b, _ in cells)])
    assert 0.93 <= cover <= 0.98, cover


def test_holm_is_step_down_and_bonferroni_single_step():
    p = [0.001, 0.2, None, 0.011]
    holm = stats.adjust(p, 0.025, "holm")
    bonf = stats.adjust(p, 0.025, "bonferroni")
    assert [a.rejected if a else None for a in holm] == [True, False, None, True]  # 0.011 <= 0.025 / 2
    assert [a.rejected if a else None for a in bonf] == [True, False, None, False]  # 0.011 > 0.025 / 3
    assert [a.rejected if a else None for a in stats.adjust(p, 0.025, "none")] == [True, False, None, True]


def test_detectable_and_rows_needed():
    assert stats.rows_to_protect(0.03, 0.025) == 125  # z^2 (1 - tol) / tol, z = 1.96
    k = stats.detectable_flips(26, 0.03, 0.025)
    assert stats.tango_p_harm(k, 0, 26, 0.03) <= 0.025 < stats.tango_p_harm(k - 1, 0, 26, 0.03)
    assert stats.detectable_flips(26, 0.03, 0.025 / 24) > k  # a corrected level needs more evidence
    assert stats.detectable_flips(3, 0.5, 1e-6) is None  # 3 rows can never show it


# --- decisions ------------------------------------------------------------------------------------------------

def test_one_flip_in_a_small_slice_is_inconclusive_not_a_failure():
    ev = _evaluation({"sex=female": (26, 16, 1, 0), "sex=male": (374, 284, 0, 0)})
    g = gate(ev, GateSpec(**LOOSE_PERF, fairness_metrics=[]))
    c = next(c for c in g.checks if c.name == "slice_drop[accuracy:sex=female]")
    assert g.passed and c.status == "inconclusive" and c.passed and c.decided_by == "warn"
    assert "1 of 26 predictions changed (1 now wrong, 0 now right)" in c.detail
    assert c.detectable is not None and c.detectable > 0.03 and "fails only at a drop ≥" in c.detail
    assert c.rows_needed == 125 and c.protects is False
    assert any("sex=female" in w and "inconclusive" in w for w in g.warnings)
    assert [u["slice"] for u in g.unprotected] == ["sex=female"] and g.unprotected[0]["rows_needed"] == 125
    male = next(c for c in g.checks if c.name == "slice_drop[accuracy:sex=male]")
    assert male.status == "passed" and male.protects  # 374 rows, nothing changed: within 0.03 on evidence
    # the spec decides what inconclusive means
    assert "slice_drop[accuracy:sex=female]" in gate(ev, GateSpec(**LOOSE_PERF, fairness_metrics=[],
                                                                 inconclusive={"slices": "fail"})).failed
    assert "slice_drop[accuracy:sex=female]" in gate(ev, GateSpec(**LOOSE_PERF, fairness_metrics=[],
                                                                 decision="point")).failed  # 0.038 > 0.03
    assert gate(ev, GateSpec(**LOOSE_PERF, fairness_metrics=[], decision="point", max_slice_drop=0.05)).passed


@pytest.mark.parametrize("policy", ["warn", "fail", "point"])
def test_strong_evidence_of_harm_fails_under_every_policy(policy):
    ev = _evaluation({"group=small": (50, 50, 27, 0), "group=majority": (950, 950, 0, 0)},
                     overall=(1000, 1000, 27, 0))
    g = gate(ev, GateSpec(**LOOSE_PERF, max_overall_drop=0.05, max_slice_drop=0.05, fairness_metrics=[],
                          inconclusive={"overall": policy, "slices": policy}))
    assert g.failed == ["slice_drop[accuracy:group=small]"]
    c = next(c for c in g.checks if c.name == g.failed[0])
    assert c.status == "failed" and c.decided_by == "evidence" and c.interval[0] > 0.05
    assert "27 of 50 predictions changed" in g.message()


def test_multiplicity_keeps_many_marginal_slices_from_failing():
    """20 slices, each with a drop whose unadjusted harm test would reject but no corrected one does."""
    n, tol, alpha = 100, 0.03, 0.025
    k = next(k for k in range(n) if stats.tango_p_harm(k, 0, n, tol) <= alpha)
    assert stats.tango_p_harm(k, 0, n, tol) > alpha / 20
    ev = _evaluation({f"region=r{i:02d}": (n, 80, k, 0) for i in range(20)}, overall=(2000, 1600, 20 * k, 0))
    spec = dict(**LOOSE_PERF, max_overall_drop=1.0, fairness_metrics=[])
    none = gate(ev, GateSpec(**spec, multiplicity="none"))
    assert len([f for f in none.failed if f.startswith("slice_drop")]) == 20
    for method in ("holm", "bonferroni"):
        g = gate(ev, GateSpec(**spec, multiplicity=method))
        assert g.passed and len(g.inconclusive) == 20, g.message()
        assert g.multiplicity["method"] == method and g.multiplicity["family_size"] == 20


def test_fairness_increase_is_decided_on_its_interval():
    fair = {"sex": {"fp32": {"metric_gap": 0.10}, "quantized": {"metric_gap": 0.135}, "rows": 400, "flips": 1,
                    "groups_used": ["female", "male"], "groups_too_small": [],
                    "increase_se": {"metric_gap": 0.02}}}
    ev = _evaluation({"sex=female": (200, 150, 0, 0), "sex=male": (200, 150, 0, 0)}, fairness=fair)
    g = gate(ev, GateSpec(**LOOSE_PERF, fairness_metrics=["metric_gap"]))
    c = next(c for c in g.checks if c.name == "fairness_increase[metric_gap:sex]")
    assert c.status == "inconclusive" and c.passed and g.passed  # +0.035 vs 0.02 allowed, se 0.02
    fair["sex"]["increase_se"]["metric_gap"] = 0.002
    assert "fairness_increase[metric_gap:sex]" in gate(ev, GateSpec(**LOOSE_PERF,
                                                                   fairness_metrics=["metric_gap"])).failed


def test_absolute_bound_uses_an_interval_of_the_quantized_value():
    def agreement_ev(hits):
        ev = _evaluation({})
        ev["overall"]["agreement"] = _entry(200, 200, 200 - hits, 0)
        return ev

    spec = GateSpec(**LOOSE_PERF, thresholds=[MetricThreshold(metric="agreement", min_value=0.97)])
    status = {h: next(c for c in gate(agreement_ev(h), spec).checks if c.name == "min_value[agreement]").status
              for h in (200, 195, 150)}
    assert status == {200: "passed", 195: "inconclusive", 150: "failed"}


def test_decision_alias_and_conflicts():
    assert GateSpec(decision="bound").inconclusive == InconclusiveSpec(overall="fail", slices="fail")
    assert GateSpec(decision="point").inconclusive == InconclusiveSpec(overall="point", slices="point")
    assert GateSpec().inconclusive == InconclusiveSpec(overall="warn", slices="warn")
    with pytest.raises(ValidationError, match="either gates.decision"):
        GateSpec(decision="point", inconclusive={"slices": "warn"})
    raw = {"name": "x", "source_model": "m.onnx", "targets": ["x86_64_int8_dynamic"],
           "data": {"pool": "p", "reference": "r", "validation": "v", "label": "y"},
           "gates": {"inconclusive": {"slices": "maybe"}}}
    with pytest.raises(SpecError, match="gates.inconclusive.slices"):
        parse_spec(raw)


# --- output semantics -----------------------------------------------------------------------------------------

def test_outputs_are_read_once_from_the_fp32_model():
    """A single-logit model whose FP32 outputs happen to fall in [0, 1]: both models are read the same way."""
    ref = np.array([[0.2], [0.7], [0.4], [0.9]])
    out = np.array([[-0.01], [0.71], [0.41], [0.88]])  # the quantized model dips just below 0 on one row
    assert output_semantics("classification", ref, "auto") == "probabilities"
    same = model_side("classification", out, ref, None, output_semantics("classification", ref, "auto"))
    assert same.rows["agreement"].tolist() == [1.0, 1.0, 1.0, 1.0]
    as_logits = model_side("classification", out, ref, None, "logits")  # declared logits: both cut at 0
    assert as_logits.pred.tolist() == [0, 1, 1, 1] and as_logits.rows["agreement"].tolist() == [0.0, 1, 1, 1]
    assert output_semantics("classification", np.array([[2.0, -1.0]]), "auto") == "logits"
    assert output_semantics("classification", np.array([[0.3, 0.7], [0.5, 0.5]]), "auto") == "probabilities"


def test_bootstrap_fairness_definitions_match_fairlearn():
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    from qops.evaluate.metrics import Side

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < 0.8, y, 1 - y)
    sens = rng.choice(["a", "b", "c"], 300)
    side = Side(pred=pred, score=None, rows={"correct": (pred == y).astype(float)})
    codes = np.array([["a", "b", "c"].index(s) for s in sens])
    v = fairness_values(y, side, codes, 3, np.arange(300)[None, :], "accuracy")
    assert v["demographic_parity_difference"][0] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=sens))
    assert v["equalized_odds_difference"][0] == pytest.approx(
        equalized_odds_difference(y, pred, sensitive_features=sens))
    acc = [np.mean(pred[sens == g] == y[sens == g]) for g in "abc"]
    assert v["metric_gap"][0] == pytest.approx(max(acc) - min(acc))
