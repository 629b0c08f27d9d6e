"""The production stack of docker/docker-compose.yml, started natively on loopback (no Docker engine needed):
PostgreSQL (metadata DB, run as its own user when this is root), Redis (Celery broker), an MLflow tracking server
(SQLite backend, proxied artifacts, webhooks allowed to loopback), the Airflow api-server, scheduler,
dag-processor and triggerer with the CeleryExecutor, Celery workers per queue (each with its own hostname, one
JWT secret and execution API URL for all), and optionally the qops webhook receiver.

Used by the system tests (tests/integration/test_celery_stack.py) and the overhead benchmark
(bench/bench_airflow_overhead.py). By hand::

    python scripts/native_stack.py DAGS_FOLDER     # until Ctrl-C; prints the URLs

Needs Debian's postgresql and redis-server (`.ci/run` installs them).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent

HOSTNAME_MODULE = '''import os


def get_hostname():
    """Each worker reports its own name (all run on one machine)."""
    return os.environ.get("QOPS_WORKER_HOSTNAME") or __import__("socket").getfqdn()
'''


# compose service (docker/docker-compose.yml) -> the command this script runs for it; tests/unit/test_packaging.py
# checks that the compose file runs each with the same command (PostgreSQL and Redis are images there)
COMPOSE_COMMANDS = {
    "mlflow": ["mlflow", "server"],
    "airflow-api-server": ["airflow", "api-server"],
    "airflow-scheduler": ["airflow", "scheduler"],
    "airflow-dag-processor": ["airflow", "dag-processor"],
    "airflow-triggerer": ["airflow", "triggerer"],
    "worker-cpu": ["airflow", "celery", "worker", "--queues", "cpu"],
    "worker-gpu": ["airflow", "celery", "worker", "--queues", "gpu"],
    "qops-webhook": ["qops", "webhook"],
}


def tool(name: str) -> str | None:
    """A PostgreSQL/Redis binary on PATH or in Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return None


def missing_tools() -> list[str]:
    return [n for n in ("initdb", "pg_ctl", "psql", "redis-server") if not tool(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc=None, what: str = "", seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not listen on {port} in {seconds} s")


class NativeStack:
    """Start with :meth:`start` (or ``with NativeStack(...) as s``); :meth:`stop` ends every process."""

    def __init__(self, home: str | os.PathLike, dags_folder: str | os.PathLike, *,
                 queues: tuple[str, ...] = ("cpu", "gpu"), webhook: dict | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.home, self.dags = Path(home), Path(dags_folder)
        self.queues, self.webhook_conf, self.extra_env = queues, webhook, dict(extra_env or {})
        self.logs = self.home / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pgroot: Path | None = None
        self.as_pg: list[str] = []
        self._token: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> "NativeStack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "NativeStack":
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"missing {missing}: apt-get install postgresql redis-server")
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self._start_postgres()
            self.redis_port, self.api_port, self.mlflow_port = free_port(), free_port(), free_port()
            self._spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"])
            wait_port(self.redis_port, self.procs["redis"], "redis-server")
            self._spawn("mlflow", [str(BIN / "mlflow"), *COMPOSE_COMMANDS["mlflow"][1:], "--host", "127.0.0.1",
                                   "--port", str(self.mlflow_port), "--backend-store-uri",
                                   f"sqlite:///{self.home / 'mlflow.db'}", "--artifacts-destination",
                                   str(self.home / "mlflow-artifacts"), "--workers", "1"],
                        env={**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                             "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_CACHE_TTL": "1"})
            wait_port(self.mlflow_port, self.procs["mlflow"], "mlflow server", 180)
            self.env = self._airflow_env()
            r = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=self.env, capture_output=True,
                               text=True, cwd=self.home)
            if r.returncode:
                raise RuntimeError(f"airflow db migrate failed: {r.stderr[-3000:]}")
            self._airflow("api-server", *COMPOSE_COMMANDS["airflow-api-server"][1:], "--port", str(self.api_port))
            for name in ("scheduler", "dag-processor", "triggerer"):
                self._airflow(name, *COMPOSE_COMMANDS[f"airflow-{name}"][1:])
            for q in self.queues:
                self.start_worker(q)
            if self.webhook_conf is not None:
                self._start_webhook()
            wait_port(self.api_port, self.procs["api-server"], "airflow api-server", 180)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name, p in list(self.procs.items()):
            self._signal(p, signal.SIGTERM)
        for name, p in list(self.procs.items()):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
        self.procs.clear()
        if self.pgroot is not None:
            subprocess.run([*self.as_pg, tool("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "stop"],
                           capture_output=True)
            shutil.rmtree(self.pgroot, ignore_errors=True)
            self.pgroot = None

    # ---- pieces ----------------------------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        # PostgreSQL refuses to run as root: its own user, its own folder (outside root-only temp trees)
        self.pgroot = Path(tempfile.mkdtemp(prefix="qops-pg-"))
        os.chmod(self.pgroot, 0o755)
        self.pgdata = self.pgroot / "data"
        self.pgdata.mkdir()
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root without a postgres user to run PostgreSQL as") from None
            os.chown(self.pgroot, pw.pw_uid, pw.pw_gid)
            os.chown(self.pgdata, pw.pw_uid, pw.pw_gid)
            self.as_pg = ["runuser", "-u", "postgres", "--"]
        self.pg_port = free_port()
        subprocess.run([*self.as_pg, tool("initdb"), "-D", str(self.pgdata), "-U", "airflow", "--auth=trust"],
                       check=True, capture_output=True)
        self._pg_ctl("start")
        subprocess.run([tool("psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "airflow", "-d",
                        "postgres", "-c", "CREATE DATABASE airflow"], check=True, capture_output=True)

    def _pg_ctl(self, action: str) -> None:
        subprocess.run([*self.as_pg, tool("pg_ctl"), "-D", str(self.pgdata), "-l", str(self.pgroot / "log"), "-w",
                        "-m", "fast", "-o", f"-p {self.pg_port} -k {self.pgdata} -c listen_addresses=127.0.0.1",
                        action], check=True, capture_output=True)

    def restart_db(self) -> None:
        """Restart PostgreSQL (fast mode: every open connection is cut)."""
        self._pg_ctl("restart")

    def _airflow_env(self) -> dict[str, str]:
        (self.home / "pylib").mkdir(exist_ok=True)
        (self.home / "pylib" / "qops_stack_hostname.py").write_text(HOSTNAME_MODULE)
        env = dict(os.environ)
        db = f"airflow@127.0.0.1:{self.pg_port}/airflow"
        env.update({
            "AIRFLOW_HOME": str(self.home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queues[0],
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{db}",
            # workers import qops' libraries once; tasks, forked from them, inherit them
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "qops_airflow.celery_config.CELERY_CONFIG",
            # the task supervisor notices a finished task within 1 s instead of up to 5 s
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": "qops-native-stack-secret-0123456789abcdef",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__API__PORT": str(self.api_port), "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.api_port}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "qops_stack_hostname.get_hostname",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "PYTHONPATH": f"{self.home / 'pylib'}{os.pathsep}{env.get('PYTHONPATH', '')}",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        })
        env.update(self.extra_env)
        return env

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        # a session of its own: stopping or killing it takes its children (Celery's pool, task supervisors) too
        p = subprocess.Popen(cmd, env=env, cwd=self.home, stdout=open(self.logs / f"{name}.log", "a"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    @staticmethod
    def _signal(p: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def _airflow(self, name: str, *args: str, **extra_env: str) -> subprocess.Popen:
        return self._spawn(name, [str(BIN / "airflow"), *args], env={**self.env, **extra_env})

    def start_worker(self, queue: str) -> subprocess.Popen:
        """A Celery worker for ``queue`` whose tasks report the hostname ``worker-<queue>``."""
        cmd = COMPOSE_COMMANDS.get(f"worker-{queue}", ["airflow", "celery", "worker", "--queues", queue])
        return self._airflow(f"worker-{queue}", *cmd[1:], "--concurrency", "1", "--celery-hostname",
                             f"worker-{queue}@%h", QOPS_WORKER_HOSTNAME=f"worker-{queue}")

    def kill_worker(self, queue: str) -> None:
        """SIGKILL the worker and every process under it, as when its machine dies."""
        import psutil

        p = self.procs.pop(f"worker-{queue}")
        # the task supervisors start task processes in sessions of their own: find them by parentage
        family = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=30)
        p.wait(30)

    def _start_webhook(self) -> None:
        self.webhook_port = free_port()
        conf = self.webhook_conf
        cmd = [str(BIN / "qops"), *COMPOSE_COMMANDS["qops-webhook"][1:], "--host", "127.0.0.1", "--port",
               str(self.webhook_port),
               "--airflow-url", self.api]
        for w in conf.get("watch", []):
            cmd += ["--watch", w]
        env = {**self.env, "QOPS_WEBHOOK_SECRET": conf["secret"]}
        self._spawn("webhook", cmd, env=env)
        wait_port(self.webhook_port, self.procs["webhook"], "qops webhook")

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}/mlflow-webhook"

    # ---- REST API v2, as an outside client -------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict | None = None):
        if self._token is None:
            self._token = self._request("GET", "/auth/token")["access_token"]  # simple auth manager, all admins
        return self._request(method, path, body, self._token)

    def _request(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        req = urllib.request.Request(self.api + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def wait_dag(self, dag_id: str, seconds: float = 180) -> None:
        """Until the dag-processor has parsed ``dag_id``."""
        deadline = time.time() + seconds
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                if time.time() > deadline:
                    raise RuntimeError(f"DAG {dag_id} not parsed in {seconds} s; logs in {self.logs}") from None
                time.sleep(2)

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        return self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})[
            "dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def wait_run(self, dag_id: str, run_id: str, seconds: float = 900, poll: float = 3) -> str:
        deadline, state = time.time() + seconds, "unknown"
        while True:
            try:
                state = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            except (urllib.error.URLError, ConnectionError) as e:  # the API itself may be restarting
                if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                    raise
            if state in ("success", "failed"):
                return state
            if time.time() > deadline:
                raise RuntimeError(f"run {run_id} of {dag_id} is still {state} after {seconds} s; logs in {self.logs}")
            time.sleep(poll)

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        tis = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
        return {t["task_id"]: t for t in tis}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dags_folder")
    ap.add_argument("--home", default=None, help="folder for logs, databases and artifacts (default: a temp dir)")
    args = ap.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="qops-stack-"))
    with NativeStack(home, args.dags_folder) as s:
        print(f"Airflow {s.api} (all admins), MLflow {s.mlflow_uri}, logs {s.logs}; Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
