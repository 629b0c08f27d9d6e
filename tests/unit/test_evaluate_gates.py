import copy

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper

from qops.artifacts import to_jsonable
from qops.errors import DataError
from qops.evaluate import evaluate
from qops.gates import gate
from qops.quantize import quantize
from qops.spec import GateSpec, MetricThreshold

SLICES = ["sex", "age_group"]


@pytest.fixture(scope="module")
def dynamic_model(fp32_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "dyn.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", out)
    return out


@pytest.fixture(scope="module")
def evaluation(fp32_model, dynamic_model, data_dir):
    return to_jsonable(evaluate(fp32_model, dynamic_model, data_dir / "validation.parquet", "risk", SLICES,
                                latency_runs=100, intersections=[["sex", "age_group"]]))


def _slice(ev, key):
    return next(s for s in ev["slices"] if s["key"] == key)


def test_evaluation_metrics_slices_intersections_cis_fairness(evaluation, data_dir):
    val = pd.read_parquet(data_dir / "validation.parquet")
    ev = evaluation
    assert ev["rows"] == len(val) == 200 and ev["primary_metric"] == "accuracy"
    assert ev["metrics"] == ["accuracy", "f1", "roc_auc", "agreement", "cosine", "kl"]
    assert 0.6 < ev["overall"]["accuracy"]["fp32"] <= 1.0
    keys = {s["key"] for s in ev["slices"]}
    assert {"sex=female", "sex=male", "age_group=under_25", "sex=female & age_group=under_25"} <= keys
    assert ev["dimensions"] == ["sex", "age_group", "sex & age_group"]
    female = _slice(ev, "sex=female")
    assert female["n"] == int((val["sex"] == "female").sum())
    expected = float((val["sex"] == "female").sum())
    assert female["n"] == expected
    # accuracy: score interval on the discordant rows, which always contains the point change; roc_auc: bootstrap
    for entry in [ev["overall"]["accuracy"], female["metrics"]["accuracy"]]:
        assert entry["ci_low"] <= entry["delta"] + 1e-12 and entry["delta"] <= entry["ci_high"] + 1e-12
        p = entry["paired"]
        assert entry["delta"] == pytest.approx((p["better"] - p["worse"]) / p["n"])
        assert entry["ci_method"].startswith("score interval")
    auc = ev["overall"]["roc_auc"]
    assert auc["ci_method"].startswith("paired bootstrap") and auc["se"] >= 0 and auc["ci_low"] <= auc["ci_high"]
    assert female["flips"] == female["metrics"]["accuracy"]["paired"]["worse"] + \
        female["metrics"]["accuracy"]["paired"]["better"]  # binary labels: every changed prediction is discordant
    assert ev["overall"]["agreement"]["fp32"] == 1.0 and ev["overall"]["agreement"]["quantized"] >= 0.9
    assert ev["overall"]["kl"]["fp32"] == 0.0 and ev["overall"]["cosine"]["quantized"] > 0.99
    f = ev["fairness"]["sex"]
    for side in ("fp32", "quantized"):
        assert 0 <= f[side]["demographic_parity_difference"] <= 1
        assert 0 <= f[side]["equalized_odds_difference"] <= 1 and f[side]["metric_gap"] >= 0
    assert ev["fairness"]["sex & age_group"]["groups_too_small"]  # some intersections are under 20 rows
    perf = ev["performance"]
    assert perf["size_ratio"] < 0.3 and perf["latency_p50_ms"]["fp32"] > 0
    assert ev["hardware_match"]["matches"] is None  # no target recipe passed


def test_same_inputs_same_intervals(fp32_model, dynamic_model, data_dir, evaluation):
    again = to_jsonable(evaluate(fp32_model, dynamic_model, data_dir / "validation.parquet", "risk", SLICES,
                                 latency_runs=10, intersections=[["sex", "age_group"]]))
    assert again["overall"] == evaluation["overall"] and again["slices"] == evaluation["slices"]


def test_gate_passes_real_dynamic_model(evaluation):
    g = gate(evaluation, GateSpec(max_overall_drop=0.02, max_slice_drop=0.05, max_fairness_increase=0.05,
                                  max_latency_ratio=10.0))
    assert g.passed, g.message()
    names = {c.name for c in g.checks}
    assert {"drop[accuracy]", "slice_drop[accuracy:sex=female]", "latency_ratio", "size_ratio",
            "fairness_increase[demographic_parity_difference:sex]", "fairness_increase[metric_gap:age_group]"} <= names


def test_gate_fails_and_names_the_hurt_slice_and_fairness(evaluation):
    """Evidence of harm planted in the evaluation: a slice where 12 of its rows turned wrong (none right) and a
    fairness increase far beyond its bootstrap error. Only those two fail; the real model's checks do not."""
    from qops.stats import tango_interval

    ev = copy.deepcopy(evaluation)
    s = _slice(ev, "age_group=under_25")
    n, acc = s["n"], s["metrics"]["accuracy"]
    hits = round(acc["fp32"] * n)
    worse = min(12, hits)
    lo, hi = tango_interval(worse, 0, n, 0.95)
    acc.update(quantized=(hits - worse) / n, delta=-worse / n, ci_low=-hi, ci_high=-lo,
               paired={"n": n, "worse": worse, "better": 0, "quantized_hits": hits - worse})
    s["flips"] = worse
    f = ev["fairness"]["age_group"]
    f["quantized"]["equalized_odds_difference"] = f["fp32"]["equalized_odds_difference"] + 0.3
    f["increase_se"]["equalized_odds_difference"] = 0.02
    g = gate(ev, GateSpec(max_latency_ratio=10.0))
    assert not g.passed
    assert g.failed == ["slice_drop[accuracy:age_group=under_25]",
                        "fairness_increase[equalized_odds_difference:age_group]"]
    assert "age_group=under_25" in g.message() and "allowed 0.03" in g.message()
    assert f"{worse} of {n} predictions changed" in g.message()


def test_thresholds_absolute_change_and_slice_overrides(evaluation):
    acc = evaluation["overall"]["accuracy"]["quantized"]
    spec = GateSpec(max_latency_ratio=10.0, slice_overrides={"sex=female": -0.5},  # impossible for that slice
                    thresholds=[MetricThreshold(metric="f1", min_value=0.99),
                                MetricThreshold(metric="agreement", min_value=0.9, max_drop=0.1)])
    g = gate(evaluation, spec)
    assert g.failed == ["slice_drop[accuracy:sex=female]", "min_value[f1]"]
    assert any(c.name == "min_value[agreement]" and c.passed for c in g.checks)
    assert acc is not None


def test_bound_decision_is_stricter_than_point(evaluation):
    """The older `decision` values map onto the inconclusive policy: an overall change of -0.005 (3 rows wrong,
    2 right of 200) straddles a 0.01 tolerance: point passes it, bound fails it, the default warns."""
    from qops.stats import tango_interval

    ev = copy.deepcopy(evaluation)
    o = ev["overall"]["accuracy"]
    n = ev["rows"]
    hits = round(o["fp32"] * n)
    lo, hi = tango_interval(3, 2, n, 0.95)
    o.update(quantized=(hits - 1) / n, delta=-1 / n, ci_low=-hi, ci_high=-lo,
             paired={"n": n, "worse": 3, "better": 2, "quantized_hits": hits - 1})
    spec = dict(max_overall_drop=0.01, max_slice_drop=1.0, max_latency_ratio=10.0, max_fairness_increase=1.0)
    assert "drop[accuracy]" not in gate(ev, GateSpec(decision="point", **spec)).failed
    assert "drop[accuracy]" in gate(ev, GateSpec(decision="bound", **spec)).failed
    g = gate(ev, GateSpec(**spec))
    assert "drop[accuracy]" in g.inconclusive and "drop[accuracy]" not in g.failed
    assert any(w.startswith("drop[accuracy]: inconclusive") for w in g.warnings)


def test_insufficient_data_warns_or_fails_per_spec(evaluation):
    g = gate(evaluation, GateSpec(min_slice_size=50, max_latency_ratio=10.0, max_slice_drop=0.5))
    small = {c.name for c in g.checks if c.status == "insufficient_data"}
    assert "slice_drop[accuracy:age_group=under_25]" in small  # 33 rows
    assert g.passed and any("insufficient data" in w for w in g.warnings)
    g = gate(evaluation, GateSpec(min_slice_size=50, max_latency_ratio=10.0, max_slice_drop=0.5,
                                  insufficient_data="fail"))
    assert "slice_drop[accuracy:age_group=under_25]" in g.failed


def test_gate_rejects_slower_model(evaluation):
    ev = copy.deepcopy(evaluation)
    ev["performance"]["latency_ratio"] = 1.5
    g = gate(ev, GateSpec(max_slice_drop=1.0, max_fairness_increase=1.0))
    assert g.failed == ["latency_ratio"] and "allowed x1.0" in g.message()


# --- planted regression: quantization hurts one small group far more than the average --------------

def _threshold_model(path):
    """logits = [0, x0]: class 1 iff x0 > 0. x1 is ignored. FP32 is exact on every row."""
    w = onnx.numpy_helper.from_array(np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["features", "W"], ["logits"])], "threshold",
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _planted_data(seed, planted: bool, n=1000, small=50):
    """Group 'small' sits near the decision boundary (|x0| < 0.25) where an 8-bit grid spanning the
    majority's range (x0 in +-[1, 60]) is coarser than the gap: its rows quantize to x0 = 0."""
    rng = np.random.default_rng(seed)
    big = rng.choice([-1, 1], n - small) * rng.uniform(1, 60, n - small)
    little = (rng.choice([-1, 1], small) * rng.uniform(0.02, 0.25, small) if planted
              else rng.choice([-1, 1], small) * rng.uniform(1, 60, small))
    x0 = np.concatenate([big, little])
    df = pd.DataFrame({"x0": x0.astype(np.float32), "x1": rng.normal(0, 30, n).astype(np.float32),
                       "group": ["majority"] * (n - small) + ["small"] * small})
    df["y"] = (df["x0"] > 0).astype(int)
    return df


@pytest.mark.parametrize("planted", [True, False])
def test_planted_regression_fails_the_gate_naming_the_group(planted, tmp_path):
    fp32 = _threshold_model(tmp_path / "fp32.onnx")
    _planted_data(1, planted).to_parquet(tmp_path / "cal.parquet")
    _planted_data(2, planted).to_parquet(tmp_path / "val.parquet")
    quantize(fp32, "x86_64_vnni_int8", tmp_path / "q.onnx", calibration=tmp_path / "cal.parquet",
             features=["x0", "x1"])
    ev = evaluate(fp32, tmp_path / "q.onnx", tmp_path / "val.parquet", "y", ["group"], features=["x0", "x1"],
                  metrics=["accuracy"], latency_runs=20)
    g = gate(ev, GateSpec(max_overall_drop=0.05, max_slice_drop=0.05, max_latency_ratio=100.0,
                          max_size_ratio=100.0, max_fairness_increase=1.0))
    overall = ev.overall["accuracy"]
    small = next(s for s in ev.slices if s["key"] == "group=small")["metrics"]["accuracy"]
    assert overall["fp32"] == 1.0 and small["fp32"] == 1.0
    if planted:
        assert small["quantized"] < 0.7  # the small group collapses ...
        assert overall["fp32"] - overall["quantized"] < 0.05  # ... while the average barely moves
        assert g.failed == ["slice_drop[accuracy:group=small]"]
        assert "group=small" in g.message()
    else:
        assert g.passed, g.message()


def test_label_free_fidelity_gates(fp32_model, dynamic_model, data_dir, tmp_path):
    pd.read_parquet(data_dir / "validation.parquet").drop(columns=["risk"]).to_parquet(tmp_path / "v.parquet")
    ev = to_jsonable(evaluate(fp32_model, dynamic_model, tmp_path / "v.parquet", None, SLICES, latency_runs=10))
    assert ev["metrics"] == ["agreement", "cosine", "kl"] and ev["primary_metric"] == "agreement"
    g = gate(ev, GateSpec(metric="agreement", max_overall_drop=0.05, max_slice_drop=0.1, max_latency_ratio=10.0))
    assert g.passed, g.message()
    with pytest.raises(DataError, match="need labels"):
        evaluate(fp32_model, dynamic_model, tmp_path / "v.parquet", None, SLICES, metrics=["accuracy"])


def test_regression_metrics_and_custom_metric(tmp_path):
    w = onnx.numpy_helper.from_array(np.array([[1.0], [0.5]], dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["features", "W"], ["y_hat"])], "linear",
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y_hat", TensorProto.FLOAT, ["batch", 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "lin.onnx"))
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(0, 3, 300), "b": rng.normal(0, 3, 300)}).astype(np.float32)
    df["target"] = df["a"] + 0.5 * df["b"] + rng.normal(0, 0.1, 300)
    df["region"] = rng.choice(["north", "south"], 300)
    df.to_parquet(tmp_path / "v.parquet")
    quantize(tmp_path / "lin.onnx", "x86_64_int8_dynamic", tmp_path / "q.onnx", features=["a", "b"])
    ev = to_jsonable(evaluate(tmp_path / "lin.onnx", tmp_path / "q.onnx", tmp_path / "v.parquet", "target",
                              ["region"], features=["a", "b"], task="regression", latency_runs=10,
                              custom_metrics={"max_abs_error": "custom_metrics_for_tests:max_abs_error"}))
    assert ev["metrics"] == ["mae", "rmse", "cosine", "max_abs_error"]
    mae = ev["overall"]["mae"]
    assert 0.05 < mae["fp32"] < 0.15 and mae["quantized"] >= mae["fp32"] - 0.01
    assert ev["overall"]["max_abs_error"]["quantized"] >= ev["overall"]["mae"]["quantized"]
    g = gate(ev, GateSpec(task="regression", metric="mae", max_overall_drop=0.1, max_slice_drop=0.1,
                          max_latency_ratio=100.0, max_size_ratio=100.0))
    assert g.passed, g.message()
    g = gate(ev, GateSpec(task="regression", metric="mae", max_overall_drop=0.0, max_slice_drop=1,
                          max_latency_ratio=100.0, max_size_ratio=100.0,
                          thresholds=[MetricThreshold(metric="rmse", max_value=0.001)]))
    assert "max_value[rmse]" in g.failed
    with pytest.raises(DataError, match="cannot be imported"):
        evaluate(tmp_path / "lin.onnx", tmp_path / "q.onnx", tmp_path / "v.parquet", "target", [],
                 features=["a", "b"], task="regression", custom_metrics={"x": "no_such_module:f"})


def test_missing_slice_column_in_validation(fp32_model, dynamic_model, data_dir):
    with pytest.raises(DataError, match=r"validation set .* lacks column\(s\) \['region'\]"):
        evaluate(fp32_model, dynamic_model, data_dir / "validation.parquet", "risk", ["sex", "region"])


def test_nan_in_validation_features(fp32_model, dynamic_model, data_dir, tmp_path):
    val = pd.read_parquet(data_dir / "validation.parquet")
    val.loc[val.index[5], "num_age"] = np.nan
    val.to_parquet(tmp_path / "v.parquet")
    with pytest.raises(DataError, match=r"NaN/inf in feature column\(s\) \['num_age'\] \(1 row"):
        evaluate(fp32_model, dynamic_model, tmp_path / "v.parquet", "risk", SLICES)


def test_validation_features_that_do_not_match_model(fp32_model, dynamic_model, data_dir, features):
    with pytest.raises(DataError, match="expects 27 features but 26"):
        evaluate(fp32_model, dynamic_model, data_dir / "validation.parquet", "risk", SLICES, features=features[1:])
