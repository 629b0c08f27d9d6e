"""Distributed execution, for real: PostgreSQL (as its own user), Redis, the Airflow api-server, scheduler and
dag-processor with the CeleryExecutor, and two Celery workers bound to the queues `cpu` and `gpu` (distinct
hostnames, one JWT secret and execution API URL), all on loopback. The quantization DAG is triggered through the
REST API v2 as an outside client would; the test waits for it and checks through the API which worker ran each
task: CPU targets on the cpu worker, the GPU target's tasks on the gpu worker, where they fail with the clear
no-GPU error, and the run reports it.

Needs Debian's postgresql and redis-server (`.ci/run` installs them); skipped where they are missing."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "celery_quantize"


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not listen on {port} in {seconds} s")


HOSTNAME_MODULE = '''import os


def get_hostname():
    """Each worker reports its own name (both run on this machine)."""
    return os.environ.get("QOPS_WORKER_HOSTNAME") or __import__("socket").getfqdn()
'''

DAG = '''
from pathlib import Path
from qops_airflow.dag_factory import build_quantization_dag
dag = build_quantization_dag(Path(__file__).parent / "specs" / "celery.yaml", dag_id="celery_quantize")
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not (initdb and pg_ctl and shutil.which("redis-server")):
        pytest.skip("PostgreSQL (initdb, pg_ctl) and redis-server are needed (.ci/run installs them)")
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from planted_models import small_weight_data, small_weight_program

    home = tmp_path_factory.mktemp("celery")
    os.chmod(home, 0o755)
    procs: list[subprocess.Popen] = []
    logs = home / "logs"
    logs.mkdir()
    # PostgreSQL refuses to run as root: its own user, its own folder (outside pytest's root-only tmp tree)
    import tempfile

    pgroot = Path(tempfile.mkdtemp(prefix="qops-pg-"))
    os.chmod(pgroot, 0o755)
    pgdata = pgroot / "data"
    pgdata.mkdir()
    as_pg = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            pytest.skip("running as root without a postgres user to run PostgreSQL as")
        os.chown(pgroot, pw.pw_uid, pw.pw_gid)
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
        as_pg = ["runuser", "-u", user, "--"]
    pg_port, redis_port, api_port = _free_port(), _free_port(), _free_port()
    subprocess.run([*as_pg, initdb, "-D", str(pgdata), "-U", "airflow", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_pg, pg_ctl, "-D", str(pgdata), "-l", str(pgroot / "log"), "-w", "-o",
                    f"-p {pg_port} -k {pgdata} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "airflow", "-d", "postgres", "-c",
                        "CREATE DATABASE airflow"], check=True, capture_output=True)
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"],
                                      stdout=open(logs / "redis.log", "w"), stderr=subprocess.STDOUT))
        _wait_port(redis_port, procs[-1], "redis-server")

        # the planted QAT model, a spec with a CPU target and a GPU target, the DAG
        d = home / "planted"
        d.mkdir()
        small_weight_program(d / "model.pt2")
        for name, seed, n in (("train", 0, 2000), ("pool", 1, 1000), ("val", 2, 1000)):
            small_weight_data(seed, n, n // 10).to_parquet(d / f"{name}.parquet")
        dags = home / "dags"
        (dags / "specs").mkdir(parents=True)
        spec = {"name": "celery", "source_model": str(d / "model.pt2"),
                "data": {"pool": str(d / "pool.parquet"), "reference": str(d / "train.parquet"),
                         "validation": str(d / "val.parquet"), "label": "y", "slice_columns": ["group"]},
                "calibration": {"size": 200, "drift": {"enabled": False}},
                "targets": ["x86_64_vnni_int8", "nvidia_fp16"],
                "target_options": {"x86_64_vnni_int8": {"mode": "static"}},
                "qat": {"targets": {"x86_64_vnni_int8": {"when": "ptq_fails"}}, "lr": 0.01, "steps": 150},
                "gates": {"max_latency_ratio": 50.0, "bootstrap": 200, "latency_runs": 20},
                "artifact_root": str(home / "artifacts")}
        (dags / "specs" / "celery.yaml").write_text(yaml.safe_dump(spec))
        (dags / "celery_quantize.py").write_text(DAG)
        (home / "pylib").mkdir()
        (home / "pylib" / "qops_test_hostname.py").write_text(HOSTNAME_MODULE)
        env = dict(os.environ)
        env.update({
            "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "cpu",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://airflow@127.0.0.1:{pg_port}/airflow",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://airflow@127.0.0.1:{pg_port}/airflow",
            "AIRFLOW__API_AUTH__JWT_SECRET": "qops-celery-test-secret-0123456789abcdef",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API__PORT": str(api_port), "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "qops_test_hostname.get_hostname",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "PYTHONPATH": f"{home / 'pylib'}{os.pathsep}{env.get('PYTHONPATH', '')}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        })
        r = subprocess.run([BIN / "airflow", "db", "migrate"], env=env, capture_output=True, text=True, cwd=home)
        assert r.returncode == 0, r.stderr[-3000:]

        def start(name, *cmd, **extra):
            p = subprocess.Popen([str(BIN / "airflow"), *cmd], env={**env, **extra}, cwd=home,
                                 stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT)
            procs.append(p)
            return p

        api = start("api-server", "api-server", "--port", str(api_port))
        start("scheduler", "scheduler")
        start("dag-processor", "dag-processor")
        start("worker-cpu", "celery", "worker", "--queues", "cpu", "--concurrency", "1", "--celery-hostname",
              "worker-cpu@%h", QOPS_WORKER_HOSTNAME="worker-cpu")
        start("worker-gpu", "celery", "worker", "--queues", "gpu", "--concurrency", "1", "--celery-hostname",
              "worker-gpu@%h", QOPS_WORKER_HOSTNAME="worker-gpu")
        _wait_port(api_port, api, "airflow api-server", 180)
        yield {"api": f"http://127.0.0.1:{api_port}", "home": home, "logs": logs}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([*as_pg, pg_ctl, "-D", str(pgdata), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(pgroot, ignore_errors=True)


def _call(api: str, method: str, path: str, token: str | None = None, body: dict | None = None):
    req = urllib.request.Request(api + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def test_quantization_dag_runs_on_celery_workers_by_queue(stack):
    api = stack["api"]
    token = _call(api, "GET", "/auth/token")["access_token"]  # the simple auth manager, all admins
    deadline = time.time() + 180
    while True:  # the dag-processor parses the DAG folder
        try:
            _call(api, "GET", f"/api/v2/dags/{DAG_ID}", token)
            break
        except urllib.error.HTTPError:
            if time.time() > deadline:
                raise
            time.sleep(2)
    run = _call(api, "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", token, {"logical_date": None, "conf": {}})
    run_id = run["dag_run_id"]
    deadline = time.time() + 900
    state = run["state"]
    while state not in ("success", "failed"):
        assert time.time() < deadline, f"the run is still {state}; logs in {stack['logs']}"
        time.sleep(5)
        state = _call(api, "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", token)["state"]
    tis = {t["task_id"]: t for t in _call(api, "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
                                                     "?limit=100", token)["task_instances"]}
    where = {k: (t["state"], t["queue"], t["hostname"]) for k, t in tis.items()}
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
    logs = [p for p in (stack["home"] / "airflow" / "logs").rglob("*") if p.is_file() and
            "nvidia_fp16.evaluate" in str(p)]
    text = "".join(p.read_text(errors="replace") for p in logs)
    assert "CUDAExecutionProvider" in text and "'gpu' queue" in text, logs
