"""System test: the example DAGs run with `airflow dags test` in a temporary AIRFLOW_HOME (SQLite), against
MLflow on SQLite + local artifacts; then the registry is checked with MlflowClient and the registered
quantized model is loaded back and run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TARGETS = ["x86_64_vnni_int8", "x86_64_int8_dynamic", "arm64_int8"]

pytestmark = pytest.mark.integration

STRICT_DAG = '''
from pathlib import Path
from qops_airflow.dag_factory import build_quantization_dag
dag = build_quantization_dag(Path(__file__).parent / "specs" / "strict.yaml", dag_id="strict_quantize")
'''


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("qops_home")
    dags = home / "dags"
    shutil.copytree(REPO / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
    # a second spec whose latency bound no model can meet: its gates must fail
    spec = (dags / "specs" / "german_credit.yaml").read_text()
    spec = spec.replace("name: german-credit", "name: strict").replace("max_latency_ratio: 1.0", "max_latency_ratio: 0.001")
    spec = spec.replace("targets: [x86_64_vnni_int8, x86_64_int8_dynamic, arm64_int8]", "targets: [x86_64_int8_dynamic]")
    spec = spec.replace("schedule_asset: mlflow://german-credit/champion\n", "")
    import yaml

    raw = yaml.safe_load(spec)
    raw.pop("qat")  # its target is not in this spec
    (dags / "specs" / "strict.yaml").write_text(yaml.safe_dump(raw))
    (dags / "strict_quantize.py").write_text(STRICT_DAG)
    env = dict(os.environ)
    env.update({
        "QOPS_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    for cmd in (["db", "migrate"], ["dags", "reserialize"]):
        r = subprocess.run([BIN / "airflow", *cmd], env=env, capture_output=True, text=True, cwd=home)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([BIN / "airflow", "dags", "list-import-errors", "-o", "json"], env=env, capture_output=True,
                       text=True)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [], r.stdout
    return home, env


def dags_test(env, dag_id, cwd):
    return subprocess.run([BIN / "airflow", "dags", "test", dag_id], env=env, capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def demo_run(airflow_env):
    home, env = airflow_env
    r = dags_test(env, "german_credit_retrain", home)
    assert r.returncode == 0 and "DagRun Finished" in r.stdout + r.stderr, (r.stdout + r.stderr)[-4000:]
    r = dags_test(env, "german_credit_quantize", home)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    latest = json.loads((home / "artifacts" / "german-credit" / "latest_summary.json").read_text())
    return home, env, json.loads(Path(latest["summary"]).read_text())


def test_quantization_dag_is_scheduled_on_the_retraining_asset():
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, REPO / "dags" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    retrain, quant = load("german_credit_retrain"), load("german_credit_quantize")
    outlets = {o.uri for t in retrain.dag.tasks for o in t.outlets}
    scheduled = {a.uri for a in quant.dag.timetable.asset_condition.objects}
    assert outlets == scheduled == {"mlflow://german-credit/champion"}


def test_demo_dags_register_every_target(demo_run, monkeypatch):
    from mlflow import MlflowClient

    home, env, summary = demo_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    src = client.get_model_version_by_alias("german-credit", "champion")
    assert {r["target"] for r in summary["targets"]} == set(TARGETS)
    passed = [r for r in summary["targets"] if r["gate"] == "passed"]
    assert passed, summary
    for row in passed:
        name = f"german-credit-{row['target'].replace('_', '-')}"
        assert row["mlflow"]["name"] == name and row["mlflow"]["aliases"] == ["candidate", "champion"]
        mv = client.get_model_version_by_alias(name, "champion")
        assert str(mv.version) == str(row["mlflow"]["version"])
        assert mv.tags["qops.target"] == row["target"] and mv.tags["qops.precision"] == "int8"
        assert mv.tags["qops.source_version"] == str(src.version) and mv.tags["qops.gate"] == "passed"
        cal = mv.tags["qops.calibration_sha256"]
        if mv.tags["qops.method"] == "ptq":  # (the demo spec's QAT safety net runs only if arm64_int8's PTQ fails)
            assert (cal == "none") == (mv.tags["qops.mode"] == "dynamic") and (cal == "none" or len(cal) == 64)
        assert {a.path for a in client.list_artifacts(mv.run_id, "card")} >= {"card/card.md", "card/card.json"}
        card = Path(row["card"]["markdown"]).read_text()
        assert "german_credit_quantize" in card and row["target"] in card  # lineage: DAG id, target
        if row["target"] == "x86_64_vnni_int8":  # the demo spec tunes this target: 6 trials, one chosen
            assert "### Tuning trials" in card and card.count("(chosen)") == 1
        assert row["size_bytes"] * 3.5 < row["fp32_size_bytes"]
    arm = next(r for r in summary["targets"] if r["target"] == "arm64_int8")
    assert arm["method"] == ("ptq" if arm["ptq_gate"] == "passed" else "qat"), arm
    # the retraining job tagged the version with its torch program; the source stage fetched it for QAT
    source = json.loads((Path(summary["run_dir"]) / "source.json").read_text())
    assert Path(source["pt2_path"]).is_file() and src.tags["qops.torch_program"].endswith("/model.pt2")


def test_gate_card_and_register_tasks_link_to_mlflow_and_the_card(demo_run):
    """Airflow stores each extra link's URL in XCom when the task ends; read them from the metadata DB."""
    import sqlite3

    home, env, summary = demo_run
    db = sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")
    rows = db.execute("select task_id, key, value from xcom where dag_id = 'german_credit_quantize' "
                      "and key like '_link_%'").fetchall()
    links = {(t, k): json.loads(v) if isinstance(v, str) else v for t, k, v in rows}
    row = next(r for r in summary["targets"] if r["target"] == "x86_64_vnni_int8")
    name, version = row["mlflow"]["name"], row["mlflow"]["version"]
    reg = links[("x86_64_vnni_int8.register", "_link_QopsMlflowModelLink")]
    assert reg == f"http://127.0.0.1:5000/#/models/{name}/versions/{version}"
    assert links[("x86_64_vnni_int8.gate", "_link_QopsMlflowModelLink")] == f"http://127.0.0.1:5000/#/models/{name}"
    card = links[("x86_64_vnni_int8.card", "_link_QopsModelCardLink")]
    assert card.startswith("file://") and card.endswith("/targets/x86_64_vnni_int8/card/card.html")
    assert Path(card[len("file://"):]).is_file()


def test_registered_quantized_model_loads_and_predicts(demo_run):
    import mlflow

    home, env, summary = demo_run
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    val = pd.read_parquet(home / "retrain" / "data" / "validation.parquet")
    feats = json.loads((home / "retrain" / "data" / "encoding.json").read_text())["features"]
    model = mlflow.pyfunc.load_model("models:/german-credit-x86-64-vnni-int8@champion")
    row = next(r for r in summary["targets"] if r["target"] == "x86_64_vnni_int8")
    # in the evaluation's batches: dynamic INT8 scales activations per batch, so batching is part of the result
    ev = json.loads((Path(summary["run_dir"]) / "targets" / "x86_64_vnni_int8" / "evaluation.json").read_text())
    x, bs = val[feats].to_numpy(np.float32), ev["batch_size"]
    outs = [model.predict(x[i:i + bs]) for i in range(0, len(x), bs)]
    logits = np.concatenate([np.asarray(o["logits"] if isinstance(o, dict) else o) for o in outs])
    acc = float((logits.argmax(1) == val["risk"].to_numpy()).mean())
    assert abs(acc - row["metric_quantized"]) < 1e-9


def test_failed_gate_fails_the_task_documents_it_and_registers_nothing(airflow_env, demo_run):
    from mlflow import MlflowClient

    home, env = airflow_env
    r = dags_test(env, "strict_quantize", home)
    log = r.stdout + r.stderr
    assert r.returncode != 0, "a failed gate must fail the DAG run"
    assert "latency_ratio" in log and "gate checks failed" in log
    tdir = home / "artifacts" / "strict"
    gate = json.loads(next(tdir.glob("*/targets/x86_64_int8_dynamic/gate.json")).read_text())
    assert gate["passed"] is False and gate["failed"] == ["latency_ratio"]
    card = next(tdir.glob("*/targets/x86_64_int8_dynamic/card/card.md")).read_text()
    assert "Gate verdict: FAILED" in card
    reg = json.loads(next(tdir.glob("*/targets/x86_64_int8_dynamic/register.json")).read_text())
    assert reg["skipped"] and not reg["registered"] and "register_failed is off" in reg["reason"]  # the task skipped
    names = {m.name for m in MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_registered_models()}
    assert "strict-x86-64-int8-dynamic" not in names and "german-credit-x86-64-int8-dynamic" in names


def test_qops_run_without_airflow_matches(demo_run, tmp_path):
    """`qops run` executes the same spec outside Airflow and registers new versions."""
    home, env, summary = demo_run
    r = subprocess.run([BIN / "qops", "run", str(home / "dags" / "specs" / "german_credit.yaml"), "--run-id", "cli-1"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: ")
    cli = json.loads(Path(last.split(" ", 1)[1]).read_text())
    assert [t["target"] for t in cli["targets"]] == [t["target"] for t in summary["targets"]]
    tuned = {"x86_64_vnni_int8"}  # the demo spec tunes it: the fastest candidate depends on timing
    for a, b in zip(cli["targets"], summary["targets"]):
        if a["target"] in tuned:
            found = sorted((home / "artifacts" / "german-credit").glob(f"*/targets/{a['target']}/quantize.json"))
            trials = {p.parts[-4]: [t["config"] for t in json.loads(p.read_text())["trials"]] for p in found}
            assert "cli-1" in trials and len(trials) >= 2 and len(set(map(tuple, trials.values()))) == 1  # same search
        else:
            assert a["metric_quantized"] == b["metric_quantized"]  # same data, same calibration seed
        if a["gate"] == "passed" and b["gate"] == "passed":
            assert int(a["mlflow"]["version"]) == int(b["mlflow"]["version"]) + 1


QAT_DAG = '''
from pathlib import Path
from qops_airflow.dag_factory import build_quantization_dag
dag = build_quantization_dag(Path(__file__).parent / "specs" / "planted_qat.yaml", dag_id="planted_qat_quantize")
'''


def test_a_spec_with_qat_when_ptq_fails_registers_the_qat_model_as_champion(airflow_env):
    """The planted model's PTQ loses a slice by construction (tests/unit/planted_models.py); with
    qat.when: ptq_fails the DAG's gate task hands over to the qat task, whose model passes and is registered."""
    import yaml
    from mlflow import MlflowClient

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from planted_models import small_weight_data, small_weight_program

    home, env = airflow_env
    d = home / "planted"
    d.mkdir()
    small_weight_program(d / "model.pt2")
    for name, seed, n in (("train", 0, 2000), ("pool", 1, 1000), ("val", 2, 1000)):
        small_weight_data(seed, n, n // 10).to_parquet(d / f"{name}.parquet")
    spec = {"name": "planted-qat", "source_model": str(d / "model.pt2"),
            "data": {"pool": str(d / "pool.parquet"), "reference": str(d / "train.parquet"),
                     "validation": str(d / "val.parquet"), "label": "y", "slice_columns": ["group"]},
            "calibration": {"size": 200, "drift": {"enabled": False}},
            "targets": ["x86_64_vnni_int8"], "target_options": {"x86_64_vnni_int8": {"mode": "static"}},
            "qat": {"targets": {"x86_64_vnni_int8": {"when": "ptq_fails", "engine": "pt2e"}}, "lr": 0.01, "steps": 150,
                    "checkpoint_every": 50},
            "gates": {"max_latency_ratio": 50.0, "bootstrap": 200, "latency_runs": 20},
            "artifact_root": str(home / "artifacts")}
    (home / "dags" / "specs" / "planted_qat.yaml").write_text(yaml.safe_dump(spec))
    (home / "dags" / "planted_qat_quantize.py").write_text(QAT_DAG)
    r = subprocess.run([BIN / "airflow", "dags", "reserialize"], env=env, capture_output=True, text=True, cwd=home)
    assert r.returncode == 0, r.stderr[-3000:]
    r = dags_test(env, "planted_qat_quantize", home)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "failed its gates; the qat task trains a QAT model next" in log
    latest = json.loads((home / "artifacts" / "planted-qat" / "latest_summary.json").read_text())
    row = json.loads(Path(latest["summary"]).read_text())["targets"][0]
    assert (row["method"], row["ptq_gate"], row["gate"]) == ("qat", "failed", "passed"), row
    assert row["mlflow"]["registered"] and "champion" in row["mlflow"]["aliases"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("model-x86-64-vnni-int8", "champion")
    assert mv.tags["qops.method"] == "qat" and mv.tags["qops.gate"] == "passed"
    arts = {a.path for a in client.list_artifacts(mv.run_id, "card")}
    assert "card/card_qat.png" in arts and "card/card.md" in arts
