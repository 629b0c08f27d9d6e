"""Pieces of run isolation and redaction on their own: run ids, the run folder's spec binding, locks that a kill
cannot leave behind, the redactor, and the checks that run before any stage."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from qops.errors import DataError, QopsError, SpecError


def test_default_run_ids_are_unique_even_within_one_second():
    from qops.run_folder import new_run_id

    ids = [new_run_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("cli-") and i.count("-") == 2 for i in ids)


def test_a_run_folder_belongs_to_one_spec(tmp_path):
    from qops.run_folder import bind_spec

    bind_spec(tmp_path / "r", "a" * 64, "p", "r")
    assert bind_spec(tmp_path / "r", "a" * 64, "p", "r")["spec_sha256"] == "a" * 64  # same spec: resumes
    with pytest.raises(SpecError) as e:
        bind_spec(tmp_path / "r", "b" * 64, "p", "r")
    assert "a" * 64 in str(e.value) and "b" * 64 in str(e.value) and "--run-id" in str(e.value)


HOLD = """
import sys, time
from qops.locks import FileLock
with FileLock(sys.argv[1], what="test lock"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_is_exclusive_and_taken_over_from_a_killed_holder(tmp_path, caplog):
    from qops.locks import FileLock, LockBusy

    path = tmp_path / "x.lock"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(LockBusy) as e:
        with FileLock(path, what="test lock"):
            pass
    assert f"process {p.pid}" in str(e.value)
    p.kill()
    p.wait()
    with caplog.at_level(logging.WARNING, logger="qops.locks"):
        with FileLock(path, what="test lock"):
            with FileLock(path, what="test lock"):  # re-entrant within a process
                pass
    assert f"left locked by process {p.pid}" in caplog.text and "taking it over" in caplog.text
    with FileLock(path, what="test lock"):  # released cleanly: no predecessor to report
        pass
    assert json.loads(path.read_text() or "{}") == {}


def test_shared_holders_coexist_and_exclude_an_exclusive_one(tmp_path):
    from qops.locks import FileLock, LockBusy

    code = ("import sys, time\nfrom qops.locks import FileLock\n"
            "with FileLock(sys.argv[1], what='run', shared=True):\n    print('held', flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with FileLock(tmp_path / "r.lock", what="run", shared=True):
            pass
        with pytest.raises(LockBusy):
            with FileLock(tmp_path / "r.lock", what="run"):
                pass
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("text,secret", [
    ("View run x at: http://alice:PASSWORD1@mlflow.internal:5000/#/experiments/1", "PASSWORD1"),
    ("GET https://host/api?token=abc123def&x=1", "abc123def"),
    ("s3://bucket/k?X-Amz-Signature=deadbeef99&X-Amz-Credential=AKIA/2026", "deadbeef99"),
    ("postgresql+psycopg2://airflow:pg-pass-7@db/airflow", "pg-pass-7"),
    ("https://h/?password=p4ss-w0rd", "p4ss-w0rd"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "eyJhbGciOiJIUzI1NiJ9"),
])
def test_the_redactor_masks_credentials_in_uris_queries_and_headers(text, secret):
    from qops.redact import redact

    out = redact(text)
    assert secret not in out and "***" in out


def test_the_redactor_masks_secret_environment_values_and_keeps_plain_text(monkeypatch):
    from qops.redact import redact, split_credentials

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456789")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws/secret+KEY")
    assert redact("token tok-123456789 and aws/secret+KEY") == "token *** and ***"
    assert redact("models:/german-credit@champion at http://127.0.0.1:5000") == \
        "models:/german-credit@champion at http://127.0.0.1:5000"
    assert split_credentials("http://a%40b:p%3Ass@h:5000/x?y=1") == ("http://h:5000/x?y=1", "a@b", "p:ss")
    assert split_credentials("sqlite:///mlflow.db") == ("sqlite:///mlflow.db", None, None)


def test_log_records_of_any_library_pass_through_the_redactor(capsys):
    from qops import redact

    logger = logging.getLogger("some.library")
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redact.install()
        logger.warning("connecting to %s", "https://u:SeCrEt-99@host/")
        try:
            raise RuntimeError("failed at http://u:SeCrEt-99@host/")
        except RuntimeError:
            logger.exception("boom")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "SeCrEt-99" not in err and "https://***@host/" in err and "boom" in err


def test_unknown_metric_names_are_refused_when_the_spec_loads():
    from qops.spec import GateSpec

    with pytest.raises(ValueError) as e:
        GateSpec(thresholds=[{"metric": "cosin", "min_value": 0.9}])
    assert "cosin" in str(e.value) and "did you mean cosine" in str(e.value)
    GateSpec(thresholds=[{"metric": "mine", "min_value": 0.9}], custom_metrics={"mine": "m:f"})


def _spec(tmp_path, data_dir, fp32_model, **gates):
    import yaml

    from qops.spec import load_spec

    d = {"name": "pre", "source_model": str(fp32_model), "targets": ["x86_64_int8_dynamic"],
         "data": {"pool": str(data_dir / "pool.parquet"), "reference": str(data_dir / "train.parquet"),
                  "validation": str(data_dir / "validation.parquet"), "label": gates.pop("label", "risk"),
                  "slice_columns": ["sex", "age_group"]},
         "gates": gates, "artifact_root": str(tmp_path / "art")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    return load_spec(tmp_path / "s.yaml")


def test_label_and_slice_override_typos_fail_the_first_stage_before_any_work(tmp_path, data_dir, fp32_model):
    from qops.pipeline import stage_source

    with pytest.raises(DataError) as e:
        stage_source(_spec(tmp_path, data_dir, fp32_model, label="rsik"), "r1")
    assert "rsik" in str(e.value) and not (tmp_path / "art" / "pre" / "r1" / "source.json").exists()
    with pytest.raises(DataError) as e:
        stage_source(_spec(tmp_path, data_dir, fp32_model, slice_overrides={"sex=femal": 0.1}), "r2")
    assert "sex=femal" in str(e.value) and "sex=female" in str(e.value)
    with pytest.raises(DataError):
        stage_source(_spec(tmp_path, data_dir, fp32_model, thresholds=[
            {"metric": "agreement", "min_value": 0.5, "slice_overrides": {"region=north": 0.1}}]), "r3")
    assert stage_source(_spec(tmp_path, data_dir, fp32_model, slice_overrides={"sex=female": 0.1}), "r4")["path"]


def test_a_stage_run_while_another_process_holds_the_run_fails_clearly(tmp_path, data_dir, fp32_model):
    from qops.locks import FileLock
    from qops.pipeline import stage_source

    spec = _spec(tmp_path, data_dir, fp32_model)
    lock = tmp_path / "art" / "pre" / "busy" / ".qops-run.lock"
    code = ("import sys, time\nfrom qops.locks import FileLock\n"
            "with FileLock(sys.argv[1], what='run folder'):\n    print('held', flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(QopsError) as e:
            stage_source(spec, "busy")
        assert time.monotonic() - t0 < 5 and "in use by process" in str(e.value) and "--run-id" in str(e.value)
    finally:
        p.kill()
        p.wait()
    with FileLock(lock, what="x"):  # the holder was killed: the lock is free again
        pass
    assert stage_source(spec, "busy")["path"]
