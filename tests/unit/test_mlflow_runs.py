"""What a pipeline run leaves in MLflow for users to browse (real SQLite store in a temp folder): one parent run per
pipeline run, one nested run per target — gate-failed ones too — with overall and per-slice metrics and their
interval bounds, gate checks, tuning trials, card and datasets; versions keep their source's signature and input
example; ``mlflow.promote_alias: null`` leaves no champion."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.models import Model, infer_signature

from qops.quantize import quantize
from qops.registry import metric_key, pipeline_run, register

SLICES = ["sex", "age_group"]
PASSING, FAILING = "x86_64_vnni_int8", "x86_64_int8_dynamic"


def _source(fp32_model, data_dir, features) -> tuple[pd.DataFrame, str]:
    """The FP32 model registered as ``gc-src`` version 1 with a column signature and a 3-row input example."""
    import onnx
    import onnxruntime as ort

    rows = pd.read_parquet(data_dir / "validation.parquet")[features].head(3).astype("float32")
    out = ort.InferenceSession(str(fp32_model)).run(None, {"features": rows.to_numpy()})[0]
    with mlflow.start_run():
        mlflow.onnx.log_model(onnx.load(str(fp32_model)), name="model", registered_model_name="gc-src",
                              signature=infer_signature(rows, out), input_example=rows)
    return rows, "models:/gc-src/1"


@pytest.fixture
def pipeline_result(fp32_model, data_dir, features, tmp_path, mlflow_uri):
    from qops.pipeline import run_pipeline
    from qops.spec import parse_spec

    rows, uri = _source(fp32_model, data_dir, features)
    spec = parse_spec({
        "name": "browse", "source_model": uri, "artifact_root": str(tmp_path / "art"),
        "data": {"pool": str(data_dir / "pool.parquet"), "reference": str(data_dir / "train.parquet"),
                 "validation": str(data_dir / "validation.parquet"), "label": "risk", "slice_columns": SLICES,
                 "features": features},
        "calibration": {"size": 100},
        "targets": [PASSING, FAILING],
        "tuning": {"enabled": True, "targets": [PASSING], "max_trials": 2, "latency_runs": 20, "bootstrap": 50},
        "gates": {"bootstrap": 100, "latency_runs": 20, "max_overall_drop": 0.05, "max_slice_drop": 0.2,
                  "max_fairness_increase": 0.2, "max_latency_ratio": 50.0},
        "target_gates": {FAILING: {"max_latency_ratio": 0.001}},  # fails on latency, whatever the CPU
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": "browse", "promote_alias": None},
    })
    summary = run_pipeline(spec, run_id="r1", progress=False)
    return spec, summary, rows


def test_a_pipeline_run_is_one_parent_with_a_nested_run_per_target(pipeline_result, tmp_path):
    from qops.pipeline import stage_register
    from qops.run_folder import RunLayout

    spec, summary, source_rows = pipeline_result
    gates = {r["target"]: r["gate"] for r in summary["targets"]}
    assert gates == {PASSING: "passed", FAILING: "failed"}, summary["targets"]
    client = MlflowClient()
    exp = client.get_experiment_by_name("browse").experiment_id
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("qops.run_kind") == "pipeline"]
    children = {r.data.tags["qops.target"]: r for r in runs if r.data.tags.get("qops.run_kind") == "target"}
    assert len(parents) == 1 and len(runs) == 3 and set(children) == {PASSING, FAILING}
    parent = parents[0]
    assert parent.data.tags["qops.pipeline_run"] == "browse|r1"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    assert summary["mlflow_parent_run_id"] == parent.info.run_id  # the summary stage attached the run's table
    assert parent.data.metrics["targets"] == 2 and parent.data.metrics["targets_passed"] == 1
    assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    rows = {r["target"]: r for r in summary["targets"]}
    assert rows[FAILING]["mlflow"]["run_id"] == children[FAILING].info.run_id

    layout = RunLayout.of(spec, "r1")
    for target, run in children.items():
        ev = json.loads(layout.target(target).evaluation.read_text())
        m = run.data.metrics
        overall = ev["overall"]["accuracy"]
        assert m["quantized_accuracy"] == pytest.approx(overall["quantized"])
        assert m["delta_accuracy_ci_low"] == pytest.approx(overall["ci_low"])
        assert m["delta_accuracy_ci_high"] == pytest.approx(overall["ci_high"])
        for s in ev["slices"]:  # every slice, with its interval bounds
            key = f"slice/{metric_key(s['key'])}"
            assert m[f"{key}/rows"] == s["n"]
            assert m[f"{key}/quantized_accuracy"] == pytest.approx(s["metrics"]["accuracy"]["quantized"])
            if s["metrics"]["accuracy"]["ci_low"] is not None:
                assert m[f"{key}/delta_accuracy_ci_low"] == pytest.approx(s["metrics"]["accuracy"]["ci_low"])
                assert m[f"{key}/delta_accuracy_ci_high"] == pytest.approx(s["metrics"]["accuracy"]["ci_high"])
        assert "slice/sex/female/quantized_accuracy" in m
        g = json.loads(layout.target(target).gate.read_text())
        assert m["gate/passed"] == (1.0 if g["passed"] else 0.0)
        for c in g["checks"]:
            assert m[f"gate/{metric_key(c['name'])}/passed"] == (1.0 if c["passed"] else 0.0)
            assert run.data.tags[f"qops.gate.{metric_key(c['name'])}"] == c["status"]
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "card")}
        assert "card/card.md" in arts and "card/card.html" in arts
        # the validation set is an input of every target run, with MLflow's digest
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        val = inputs["browse-validation"]
        assert val.dataset.digest and {t.key: t.value for t in val.tags}["mlflow.data.context"] == "validation"
        assert json.loads(val.dataset.profile)["num_rows"] == len(pd.read_parquet(spec.data.validation))

    failing = children[FAILING]
    assert failing.data.metrics[f"gate/{metric_key('latency_ratio')}/passed"] == 0.0
    assert failing.data.tags["qops.registered"] == "false" and failing.data.tags["qops.gate"] == "failed"
    # the summary stage wrote the failed card again, recommending the passing target, and its run has that copy
    assert failing.data.tags["qops.recommended_instead"] == PASSING
    card_md = client.download_artifacts(failing.info.run_id, "card/card.md", str(tmp_path / "dl"))
    assert f"Recommended instead: `{PASSING}`" in Path(card_md).read_text()
    reg = json.loads(layout.target(FAILING).register.read_text())
    assert reg["skipped"] and reg["run_id"] == failing.info.run_id

    passing = children[PASSING]
    cal = {i.dataset.name: i for i in passing.inputs.dataset_inputs}["browse-calibration"]
    assert {t.key: t.value for t in cal.tags}["mlflow.data.context"] == "calibration" and cal.dataset.digest
    assert json.loads(cal.dataset.profile)["num_rows"] == 100
    trials = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=passing.info.run_id, artifact_path="tuning/trials.json", dst_path=str(tmp_path / "dl"))).read_text())
    assert len(trials["data"]) == 2
    # the version links to its nested run, and keeps the source's column signature and input example
    name = f"gc-src-{PASSING.replace('_', '-')}"
    mv = client.get_model_version(name, "1")
    assert mv.run_id == passing.info.run_id and passing.data.tags["qops.model_version"] == "1"
    model = Model.load(f"models:/{name}/1")
    assert model.signature.inputs.input_names() == list(source_rows.columns)
    example = model.load_input_example(f"models:/{name}/1")
    pd.testing.assert_frame_equal(example.reset_index(drop=True), source_rows.reset_index(drop=True),
                                  check_dtype=False)
    # promote_alias: null — the candidate moves, champion is never set
    assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {"candidate": "1"}

    # a retried register stage (an Airflow retry) reuses the parent, the nested runs and the version
    stage_register(spec, "r1", PASSING)
    stage_register(spec, "r1", FAILING)
    assert len(client.search_runs([exp])) == 3
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    again = client.get_run(passing.info.run_id)
    assert len([i for i in again.inputs.dataset_inputs if i.dataset.name == "browse-calibration"]) == 1


def test_concurrent_registrations_of_one_pipeline_run_create_one_parent(mlflow_uri, tmp_path):
    client, ids, errors = MlflowClient(), [], []
    start = threading.Barrier(4)

    def attempt():
        try:
            start.wait()
            ids.append(pipeline_run(client, experiment="race", pipeline="p", run_id="r", lock_path=tmp_path / "lock"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1
    live = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert [r.info.run_id for r in live] == ids[:1]


def test_a_version_without_source_signature_takes_it_from_real_rows(mlflow_uri, fp32_model, data_dir, features,
                                                                   tmp_path):
    q = tmp_path / "q.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", q)
    rows = pd.read_parquet(data_dir / "validation.parquet")[features].head(2).to_numpy(np.float32)
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    res = register(model_path=q, name="rows", run_key="k", gate_passed=True, card_files=[card], tags={},
                   example={"features": rows}, promote_alias=None)
    assert res.aliases == ["candidate"]
    model = Model.load(f"models:/rows/{res.version}")
    assert list(model.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, len(features)]
    np.testing.assert_array_equal(model.load_input_example(f"models:/rows/{res.version}"), rows)
    assert np.abs(rows).sum() > 0  # a real row, not a made-up zero feed


def test_promote_alias_null_is_accepted_by_the_spec():
    from qops.spec import MlflowSpec

    assert MlflowSpec(promote_alias=None).promote_alias is None
    assert MlflowSpec().promote_alias == "champion"
