import copy

import numpy as np
import pandas as pd
import pytest

from qops.artifacts import to_jsonable
from qops.errors import DataError
from qops.evaluate import evaluate
from qops.gates import gate
from qops.quantize import quantize
from qops.spec import GateSpec

SLICES = ["sex", "age_group"]


@pytest.fixture(scope="module")
def dynamic_model(fp32_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "dyn.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", out)
    return out


@pytest.fixture(scope="module")
def evaluation(fp32_model, dynamic_model, data_dir):
    return to_jsonable(evaluate(fp32_model, dynamic_model, data_dir / "validation.parquet", "risk", SLICES,
                                latency_runs=100))


def test_evaluation_has_metrics_per_slice_fairness_size_latency(evaluation, data_dir):
    val = pd.read_parquet(data_dir / "validation.parquet")
    assert evaluation["rows"] == len(val) == 200
    assert 0.6 < evaluation["fp32"]["overall"] <= 1.0
    assert set(evaluation["fp32"]["slices"]) == {"sex=female", "sex=male", "age_group=under_25",
                                                 "age_group=25_to_40", "age_group=over_40"}
    assert evaluation["fp32"]["slices"]["sex=female"]["n"] == int((val["sex"] == "female").sum())
    for side in ("fp32", "quantized"):
        f = evaluation[side]["fairness"]["sex"]
        assert 0 <= f["demographic_parity_difference"] <= 1 and 0 <= f["equalized_odds_difference"] <= 1
        assert evaluation[side]["latency_p50_ms"] > 0
    assert evaluation["quantized"]["size_bytes"] * 3.5 < evaluation["fp32"]["size_bytes"]
    assert evaluation["agreement"] >= 0.95
    assert "cpu_model" in evaluation["hardware"] or evaluation["hardware"]["machine"]


def test_gate_passes_real_dynamic_model_on_accuracy_and_fairness(evaluation):
    g = gate(evaluation, GateSpec(max_overall_drop=0.02, max_slice_drop=0.05, max_fairness_increase=0.05,
                                  max_latency_ratio=10.0))
    assert g.passed, g.message()
    names = {c.name for c in g.checks}
    assert {"overall_drop", "slice_drop[sex=female]", "latency_ratio",
            "fairness_increase[demographic_parity_difference:sex]"} <= names


def test_gate_fails_and_names_the_hurt_slice_and_fairness(evaluation):
    ev = copy.deepcopy(evaluation)
    ev["quantized"]["slices"]["age_group=under_25"]["value"] -= 0.2  # one group hit hard, average barely
    ev["quantized"]["fairness"]["age_group"]["equalized_odds_difference"] += 0.1
    g = gate(ev, GateSpec(max_latency_ratio=10.0))
    assert not g.passed
    assert g.failed == ["slice_drop[age_group=under_25]", "fairness_increase[equalized_odds_difference:age_group]"]
    assert "age_group=under_25" in g.message() and "allowed 0.03" in g.message()


def test_gate_rejects_slower_model(evaluation):
    ev = copy.deepcopy(evaluation)
    ev["quantized"]["latency_p50_ms"] = ev["fp32"]["latency_p50_ms"] * 1.5
    g = gate(ev, GateSpec())
    assert g.failed == ["latency_ratio"] and "x1.500" in g.message()


def test_small_slices_are_reported_as_insufficient_data(evaluation):
    g = gate(evaluation, GateSpec(min_slice_size=50, max_latency_ratio=10.0))
    small = [c for c in g.checks if c.status == "insufficient_data"]
    assert {c.name for c in small} == {"slice_drop[age_group=under_25]"}  # 33 rows
    assert any("insufficient data" in w for w in g.warnings)


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
