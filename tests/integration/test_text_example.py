"""System test of the text example: the pretrained all-MiniLM-L6-v2 transformer with a topic head goes through
both DAGs (`airflow dags test`, SQLite) — text calibration with drift checks on token features, tuning, gates on
accuracy per slice and on embedding fidelity, cards, and registration of a model with named inputs, loaded back
from the registry and run on a dict of inputs."""

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

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("qops_text")
    dags = home / "dags"
    shutil.copytree(REPO / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env.update({
        "QOPS_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    for cmd in (["db", "migrate"], ["dags", "reserialize"]):
        r = subprocess.run([BIN / "airflow", *cmd], env=env, capture_output=True, text=True, cwd=home)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for dag in ("news_topics_retrain", "news_topics_quantize"):
        r = subprocess.run([BIN / "airflow", "dags", "test", dag], env=env, capture_output=True, text=True, cwd=home)
        log = r.stdout + r.stderr
        if dag == "news_topics_retrain":
            assert r.returncode == 0 and "DagRun Finished" in log, log[-4000:]
    latest = json.loads((home / "artifacts" / "news-topics" / "latest_summary.json").read_text())
    return home, env, json.loads(Path(latest["summary"]).read_text()), log


def test_text_dags_calibrate_tune_gate_and_register(text_run):
    home, env, summary, log = text_run
    rows = {r["target"]: r for r in summary["targets"]}
    assert set(rows) == {"x86_64_vnni_int8", "int4_weight_only"}
    x86 = rows["x86_64_vnni_int8"]
    assert x86["gate"] == "passed", (x86, log[-3000:])
    assert x86["mlflow"]["registered"] and x86["mlflow"]["aliases"] == ["candidate", "champion"]
    assert x86["size_bytes"] * 3.5 < x86["fp32_size_bytes"]
    run_dir = Path(summary["run_dir"])
    cal = json.loads((run_dir / "calibration" / "calibration.json").read_text())
    # the calibration set is materialised as feeds named like the model's inputs, with its hash and manifest
    assert set(cal["feeds"]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert cal["feeds"]["input_ids"]["dtype"] == "int64" and cal["feeds"]["input_ids"]["shape"][0] == 128
    assert cal["data"]["kind"] == "text" and len(cal["feeds_sha256"]) == 64
    drift = json.loads((run_dir / "calibration" / "drift_report.json").read_text())
    checked = {c["column"] for c in drift["checks"]}
    assert {"text.token_length", "text.unknown_token_rate", "text.token_frequency", "category"} <= checked
    ev = json.loads((run_dir / "targets" / "x86_64_vnni_int8" / "evaluation.json").read_text())
    assert {"accuracy", "embedding_cosine", "neighbor_agreement"} <= set(ev["overall"])
    assert {s["dimension"] for s in ev["slices"]} == {"category", "length"}
    assert "sequence length" in ev["performance"]["latency_method"]
    q = json.loads((run_dir / "targets" / "x86_64_vnni_int8" / "quantize.json").read_text())
    assert any("smooth_quant_alpha" in t["config"] for t in q["trials"])  # SmoothQuant was searched
    card = Path(x86["card"]["markdown"]).read_text()
    assert "news_topics_quantize" in card and "neighbor_agreement" in card


def test_registered_text_model_predicts_on_named_inputs(text_run):
    import mlflow

    from qops.data import Text

    home, env, summary, _ = text_run
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    val = pd.read_parquet(home / "news" / "retrain" / "data" / "validation.parquet").iloc[:32]
    model = mlflow.pyfunc.load_model("models:/news-topics-x86-64-vnni-int8@champion")
    names = [i.name for i in model.metadata.get_input_schema().inputs]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    kind = Text(["text"], str(home / "news" / "retrain" / "tokenizer"), max_length=128)
    from qops.data import onnx_io

    feeds = kind.feeds(val, onnx_io(Path(summary["run_dir"]) / "fp32.onnx")[0], "validation rows")
    out = model.predict(feeds)
    assert set(out) == {"logits", "sentence_embedding"}
    assert np.asarray(out["logits"]).shape == (32, 5) and np.asarray(out["sentence_embedding"]).shape == (32, 384)
    acc = float((np.asarray(out["logits"]).argmax(1) == val["label"].to_numpy()).mean())
    assert acc > 0.8  # a working topic model, not noise (five topics: chance is 0.2)
