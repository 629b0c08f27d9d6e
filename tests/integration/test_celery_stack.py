"""The production stack, for real, on loopback (scripts/native_stack.py): PostgreSQL (as its own user), Redis, an
MLflow tracking server, the Airflow api-server, scheduler, dag-processor and triggerer with the CeleryExecutor,
two Celery workers bound to the queues `cpu` and `gpu` (distinct hostnames, one JWT secret and execution API URL),
and the qops webhook receiver. Everything is driven as an outside client would: DAG runs through the REST API v2,
promotions through MlflowClient.

1. Queues: the quantization DAG's CPU tasks run on the cpu worker, the GPU target's on the gpu worker, where they
   fail with the clear no-GPU error, and the run reports it.
2. Promotion triggers: moving `champion` of a watched source model (set_registered_model_alias) starts a run for
   exactly that version, through the triggerer's poller and through MLflow's HMAC-signed webhook; a forged
   delivery starts nothing.
3. Faults: a Celery worker SIGKILLed mid-QAT (the retry resumes from the checkpoint; one registered version);
   PostgreSQL restarted during a run (the run still succeeds).

Needs Debian's postgresql and redis-server (`.ci/run` installs them); skipped where they are missing."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from native_stack import NativeStack, missing_tools  # noqa: E402

SECRET = "qops-webhook-test-secret"
DAG = '''
from pathlib import Path
from qops_airflow.dag_factory import build_quantization_dag
dag = build_quantization_dag(Path(__file__).parent / "specs" / "{name}.yaml", dag_id="{name}")
'''


def _spec(name: str, source: str, data: Path, home: Path, **extra) -> dict:
    spec = {"name": name, "source_model": source,
            "data": {"pool": str(data / "pool.parquet"), "reference": str(data / "train.parquet"),
                     "validation": str(data / "val.parquet"), "label": "y", "slice_columns": ["group"]},
            "calibration": {"size": 200, "drift": {"enabled": False}},
            "targets": ["x86_64_vnni_int8"], "target_options": {"x86_64_vnni_int8": {"mode": "static"}},
            "qat": {"targets": {"x86_64_vnni_int8": {"when": "ptq_fails", "engine": "pt2e"}}, "lr": 0.01, "steps": 150},
            "gates": {"max_latency_ratio": 50.0, "bootstrap": 200, "latency_runs": 20},
            "artifact_root": str(home / "artifacts" / name)}
    spec.update(extra)
    return spec


def _register_sources(tracking_uri: str, program: Path, work: Path, names: list[str]) -> dict[str, list[str]]:
    """Two versions of the planted model per name, as a retraining job logs them (ONNX + its torch program),
    with `champion` on version 1."""
    import mlflow
    import onnx
    from mlflow import MlflowClient

    from qops.registry import fetch_source_model

    onnx_path = fetch_source_model(str(program), work).path
    client, old = MlflowClient(tracking_uri), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    out: dict[str, list[str]] = {}
    try:
        mlflow.set_experiment("retraining")
        for name in names:
            for _ in range(2):
                with mlflow.start_run() as run:
                    info = mlflow.onnx.log_model(onnx.load(onnx_path), name="model")
                    mlflow.log_artifact(str(program), artifact_path="torch_program")
                    mv = mlflow.register_model(info.model_uri, name)
                    client.set_model_version_tag(name, mv.version, "qops.torch_program",
                                                 f"runs:/{run.info.run_id}/torch_program/{program.name}")
                    out.setdefault(name, []).append(str(mv.version))
            client.set_registered_model_alias(name, "champion", out[name][0])
    finally:
        mlflow.set_tracking_uri(old)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"{missing} needed for the system test (.ci/run installs postgresql and redis-server)")
    from planted_models import small_weight_data, small_weight_program

    home = tmp_path_factory.mktemp("stack")
    data = home / "planted"
    data.mkdir()
    program = data / "model.pt2"
    small_weight_program(program)
    for name, seed, n in (("train", 0, 2000), ("pool", 1, 1000), ("val", 2, 1000)):
        small_weight_data(seed, n, n // 10).to_parquet(data / f"{name}.parquet")
    dags = home / "dags"
    (dags / "specs").mkdir(parents=True)
    env = {"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",  # a dead worker's task is noticed soon
           "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
           "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "3"}
    with NativeStack(home, dags, webhook={"secret": SECRET, "watch": ["hooked-src@champion"]}, extra_env=env) as s:
        versions = _register_sources(s.mlflow_uri, program, home / "src", ["polled-src", "hooked-src",
                                                                                   "faults-src"])
        specs = {
            "celery_quantize": _spec("celery_quantize", str(program), data, home,
                                     targets=["x86_64_vnni_int8", "nvidia_fp16"]),
            "polled_quantize": _spec("polled_quantize", "models:/polled-src@champion", data, home,
                                     watch={"poll_interval_s": 2}),
            # the poller only records the starting point: moves reach this DAG through the webhook
            "hooked_quantize": _spec("hooked_quantize", "models:/hooked-src@champion", data, home,
                                     watch={"poll_interval_s": 3600}),
            "faults_quantize": _spec("faults_quantize", "models:/faults-src@champion", data, home,
                                     qat={"targets": {"x86_64_vnni_int8": {"when": "ptq_fails", "engine": "pt2e"}}, "lr": 0.01,
                                          "steps": 6000, "checkpoint_every": 250}),
        }
        for name, spec in specs.items():
            (dags / "specs" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
            (dags / f"{name}.py").write_text(DAG.format(name=name))
        for name in specs:
            s.wait_dag(name)
        s.versions, s.specs = versions, specs
        yield s


def _await(what: str, fn, seconds: float, stack, poll: float = 1.0):
    deadline = time.time() + seconds
    while True:
        got = fn()
        if got:
            return got
        assert time.time() < deadline, f"{what} did not happen in {seconds} s; logs in {stack.logs}"
        time.sleep(poll)


def _client(stack):
    from mlflow import MlflowClient

    return MlflowClient(stack.mlflow_uri)


def _watermark(stack, name: str) -> str | None:
    return _client(stack).get_registered_model(name).tags.get("qops.watch.champion")


def _source_xcom(stack, dag_id: str, run_id: str) -> dict:
    return stack.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/resolve_source/xcomEntries/"
                             "return_value?deserialize=true")["value"]


def _versions_of(stack, name: str) -> list:
    return _client(stack).search_model_versions(f"name = '{name}'")


def test_quantization_dag_runs_on_celery_workers_by_queue(stack):
    dag = "celery_quantize"
    run_id = stack.trigger(dag)
    state = stack.wait_run(dag, run_id)
    where = {k: (t["state"], t["queue"], t["hostname"]) for k, t in stack.task_instances(dag, run_id).items()}
    # the GPU target failed on the gpu worker (no CUDA provider here): the run reports it
    assert state == "failed", where
    # (the FP16 cast itself runs anywhere; evaluating it needs ONNX Runtime's CUDA provider)
    assert where["nvidia_fp16.quantize"] == ("success", "gpu", "worker-gpu"), where
    assert where["nvidia_fp16.evaluate"] == ("failed", "gpu", "worker-gpu"), where
    # every CPU-queue task that ran, ran on the cpu worker; the CPU target went through QAT and registered
    for k, (st, queue, host) in where.items():
        if st in ("success", "failed") and queue == "cpu":
            assert host == "worker-cpu", (k, where[k])
    assert where["x86_64_vnni_int8.qat"][0] == "success" and where["x86_64_vnni_int8.register"][0] == "success", where
    assert where["fail_run_if_any_task_failed"][0] == "failed"
    logs = [p for p in (stack.home / "airflow" / "logs").rglob("*") if p.is_file() and
            f"dag_id={dag}" in str(p) and "nvidia_fp16.evaluate" in str(p)]
    text = "".join(p.read_text(errors="replace") for p in logs)
    assert "CUDAExecutionProvider" in text and "'gpu' queue" in text, logs


def test_an_alias_move_in_the_registry_runs_the_dag_for_that_version(stack):
    dag, name = "polled_quantize", "polled-src"
    v1, v2 = stack.versions[name]
    # the triggerer's watcher starts from the current holder without firing
    _await("the watcher recording its starting point", lambda: _watermark(stack, name) == v1, 180, stack)
    assert stack.runs(dag) == []
    _client(stack).set_registered_model_alias(name, "champion", v2)  # a promotion, as the MLflow UI makes it
    runs = _await("a run after the alias move", lambda: stack.runs(dag), 120, stack)
    assert len(runs) == 1 and runs[0]["run_type"] == "asset_triggered", runs
    run_id = runs[0]["dag_run_id"]
    assert stack.wait_run(dag, run_id) == "success", stack.task_instances(dag, run_id)
    (event,) = stack.call("GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
    assert event["uri"] == f"mlflow://{name}/champion"
    assert {k: event["extra"]["payload"][k] for k in ("version", "previous", "via")} == {
        "version": v2, "previous": v1, "via": "poller"}
    src = _source_xcom(stack, dag, run_id)
    assert (src["name"], src["version"]) == (name, v2)
    (mv,) = _versions_of(stack, f"{name}-x86-64-vnni-int8")
    assert mv.tags["qops.source_version"] == v2 and mv.tags["qops.method"] == "qat"
    assert _watermark(stack, name) == v2
    time.sleep(6)  # three more polls: one move, one run
    assert len(stack.runs(dag)) == 1


def _post(url: str, body: bytes, headers: dict) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json",
                                                                          **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_an_mlflow_webhook_runs_the_dag_and_forged_deliveries_are_refused(stack):
    from qops.alias_events import sign

    dag, name = "hooked_quantize", "hooked-src"
    v1, v2 = stack.versions[name]
    _await("the watcher recording its starting point", lambda: _watermark(stack, name) == v1, 180, stack)
    # a forged delivery (wrong secret) for the move: refused, nothing runs
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": name, "alias": "champion", "version": v2}}).encode()
    ts, delivery = str(int(time.time())), str(uuid.uuid4())
    forged = {"X-MLflow-Signature": sign("not-the-secret", delivery, ts, body), "X-MLflow-Timestamp": ts,
              "X-MLflow-Delivery-Id": delivery}
    assert _post(stack.webhook_url, body, forged) == 401
    assert _post(stack.webhook_url, body, {}) == 401  # unsigned
    time.sleep(3)
    assert stack.runs(dag) == []

    client = _client(stack)
    client.create_webhook(name="qops-promotions", url=stack.webhook_url, events=["model_version_alias.created"],
                          secret=SECRET)
    client.set_registered_model_alias(name, "champion", v2)
    # the poller of this DAG waits an hour between polls: the run comes from the webhook
    runs = _await("a run after the webhook", lambda: stack.runs(dag), 60, stack)
    run_id = runs[0]["dag_run_id"]
    assert stack.wait_run(dag, run_id) == "success", stack.task_instances(dag, run_id)
    (event,) = stack.call("GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
    assert event["extra"]["via"] == "webhook" and event["extra"]["version"] == v2, event
    assert _source_xcom(stack, dag, run_id)["version"] == v2
    assert _watermark(stack, name) == v2
    assert len(stack.runs(dag)) == 1


def _ti(stack, dag, run_id, task):
    return stack.task_instances(dag, run_id).get(task, {})


def test_a_worker_killed_mid_qat_is_retried_resumes_and_registers_once(stack):
    dag, name = "faults_quantize", "faults-src"
    run_id = stack.trigger(dag)
    arts = Path(stack.specs[dag]["artifact_root"])

    def checkpointed():
        metas = list(arts.rglob("qat_state.json"))
        return metas and json.loads(metas[0].read_text())["step"] >= 500 and metas[0]

    meta = _await("a QAT checkpoint at step >= 500", checkpointed, 300, stack, poll=0.5)
    assert _ti(stack, dag, run_id, "x86_64_vnni_int8.qat")["state"] == "running"
    stack.kill_worker("cpu")  # the worker and its task processes die, as with the machine
    killed_at = json.loads(meta.read_text())["step"]
    stack.start_worker("cpu")  # a replacement worker joins the queue
    assert stack.wait_run(dag, run_id) == "success", stack.task_instances(dag, run_id)
    qat = _ti(stack, dag, run_id, "x86_64_vnni_int8.qat")
    assert qat["try_number"] >= 2, qat
    assert json.loads(meta.read_text())["step"] == 6000
    res = stack.call("GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}/taskInstances/x86_64_vnni_int8.qat/xcomEntries/"
                            "return_value?deserialize=true")["value"]
    assert 0 < res["resumed_from"] <= killed_at + 250, (res["resumed_from"], killed_at)
    versions = _versions_of(stack, f"{name}-x86-64-vnni-int8")
    assert len(versions) == 1 and versions[0].tags["qops.complete"] == "true"


def test_a_run_survives_a_metadata_db_restart(stack):
    dag, name = "faults_quantize", "faults-src"
    before = len(_versions_of(stack, f"{name}-x86-64-vnni-int8"))
    run_id = stack.trigger(dag)
    _await("the QAT task running", lambda: _ti(stack, dag, run_id, "x86_64_vnni_int8.qat").get("state") == "running",
           300, stack)
    stack.restart_db()  # every open connection of every Airflow process is cut
    assert stack.wait_run(dag, run_id) == "success", stack.task_instances(dag, run_id)
    assert len(_versions_of(stack, f"{name}-x86-64-vnni-int8")) == before + 1
