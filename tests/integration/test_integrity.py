"""Integrity under concurrency, kills and hostile settings (issue: never the wrong model registered, no credential in
any log, exit codes that tell the truth). Every test drives the real CLI in separate processes against a real
MLflow store (SQLite, or `mlflow server` on loopback); racing processes start together behind a file barrier."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import free_port, wait_http

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
# waits for the barrier file, then runs the qops CLI with the given arguments: two of these start within ms
BARRIER_CLI = ("import os, sys, time\n"
               "b = sys.argv[1]\n"
               "while not os.path.exists(b): time.sleep(0.005)\n"
               "from qops.cli import main\n"
               "sys.exit(main(sys.argv[2:]))\n")


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _spec(tmp_path: Path, data_dir: Path, fp32_model: Path, name: str, uri: str, **over) -> Path:
    spec = {"name": "integrity", "source_model": str(fp32_model),
            "data": {"pool": str(data_dir / "pool.parquet"), "reference": str(data_dir / "train.parquet"),
                     "validation": str(data_dir / "validation.parquet"), "label": "risk", "slice_columns": ["sex"]},
            "calibration": {"size": 100},
            "targets": ["x86_64_vnni_int8"],
            # what these tests check is lineage, not accuracy: bounds every quantized model meets
            "gates": {"max_overall_drop": 1.0, "max_slice_drop": 1.0, "max_fairness_increase": 1.0,
                      "max_latency_ratio": 100.0, "max_size_ratio": 1.0, "bootstrap": 50, "latency_runs": 10},
            "mlflow": {"tracking_uri": uri, "experiment": "integrity"},
            "artifact_root": str(tmp_path / "artifacts")}
    for k, v in over.items():
        spec[k] = v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _race(tmp_path: Path, argvs: list[list[str]], env: dict | None = None, timeout: float = 600) -> list:
    """Start one process per argv, release them together, wait for all: [(returncode, stdout, stderr)]."""
    barrier = tmp_path / f"go-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER_CLI, str(barrier), *map(str, argv)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}, cwd=tmp_path) for argv in argvs]
    time.sleep(4)  # both have imported Python and wait at the barrier
    barrier.touch()
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        out.append((p.returncode, so, se))
    return out


def _live_versions(uri: str, name: str) -> list:
    from mlflow import MlflowClient

    return [mv for mv in MlflowClient(tracking_uri=uri).search_model_versions(f"name = '{name}'")]


def _quantized(run_dir: Path, target: str = "x86_64_vnni_int8") -> dict:
    return json.loads((run_dir / "targets" / target / "quantize.json").read_text())


def test_two_specs_one_run_id_at_once_never_register_the_wrong_model(fp32_model, data_dir, tmp_path):
    """Spec A (min-max) and spec B (percentile) with one run id, started together: one owns the run folder and
    registers its own model; the other is refused with exit 2 (busy, or bound to the other spec's hash)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = _spec(tmp_path, data_dir, fp32_model, "a", uri,
              target_options={"x86_64_vnni_int8": {"calibration_method": "minmax"}})
    b = _spec(tmp_path, data_dir, fp32_model, "b", uri,
              target_options={"x86_64_vnni_int8": {"calibration_method": "percentile"}})
    res = _race(tmp_path, [["run", a, "--run-id", "shared"], ["run", b, "--run-id", "shared"]])
    codes = sorted(r[0] for r in res)
    assert codes == [0, 2], [(r[0], r[2][-800:]) for r in res]
    loser = next(r for r in res if r[0] == 2)
    assert "Traceback" not in loser[2]
    assert ("is in use by" in loser[2] or "belongs to another spec" in loser[2]), loser[2][-800:]
    rdir = tmp_path / "artifacts" / "integrity" / "shared"
    q = _quantized(rdir)
    winner_spec = a if res[0][0] == 0 else b
    assert q["recipe"]["calibration_method"] == yaml.safe_load(winner_spec.read_text())["target_options"][
        "x86_64_vnni_int8"]["calibration_method"]
    versions = _live_versions(uri, "fp32-x86-64-vnni-int8")
    assert len(versions) == 1, [(v.version, v.tags.get("qops.run_key")) for v in versions]
    assert versions[0].tags["qops.model_sha256"] == q["model_sha256"] == _sha(q["model_path"])
    # rerunning the loser's spec with that run id now names both hashes and the fix
    loser_spec = b if winner_spec == a else a
    r = subprocess.run([str(BIN / "qops"), "run", str(loser_spec), "--run-id", "shared"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and "belongs to another spec" in r.stderr and "--run-id" in r.stderr, r.stderr[-800:]
    # the winner's spec resumes in the same folder and reuses its version
    r = subprocess.run([str(BIN / "qops"), "run", str(winner_spec), "--run-id", "shared"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    assert [v.version for v in _live_versions(uri, "fp32-x86-64-vnni-int8")] == [versions[0].version]


def test_runs_without_a_run_id_started_at_once_get_their_own_folders(fp32_model, data_dir, tmp_path):
    """Default run ids are unique (sub-second time + random suffix); on a fresh SQLite DB both first runs work (the
    store is created once, under a lock) and each registers exactly its own model."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    a = _spec(tmp_path, data_dir, fp32_model, "a", uri)
    res = _race(tmp_path, [["run", a, "--json"], ["run", a, "--json"]])
    assert [r[0] for r in res] == [0, 0], [r[2][-1500:] for r in res]
    summaries = [json.loads(r[1][r[1].index("{"):]) for r in res]
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    versions = _live_versions(uri, "fp32-x86-64-vnni-int8")
    assert len(versions) == 2 and len({v.tags["qops.run_key"] for v in versions}) == 2
    for s in summaries:
        q = _quantized(Path(s["run_dir"]))
        mine = [v for v in versions if v.tags["qops.run_id"] == s["run_id"]]
        assert len(mine) == 1 and mine[0].tags["qops.model_sha256"] == q["model_sha256"] == _sha(q["model_path"])


REGISTER_RACER = """
import json, os, sys, time
barrier, uri, model, card, key = sys.argv[1:6]
from qops.registry import configure_mlflow, register
configure_mlflow(uri)
while not os.path.exists(barrier): time.sleep(0.002)
r = register(model_path=model, name="raced-key", run_key=key, gate_passed=True, card_files=[card],
             tags={"qops.model_sha256": "x"})
print(json.dumps({"version": r.version, "reused": r.reused}))
"""


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_racing_registrations_of_one_run_key_leave_one_live_version(store, fp32_model, tmp_path):
    """Three processes register the same run key at the same instant: all return the same version, and it is the
    only live version for the key (the others were created, saw a lower one, and removed themselves)."""
    from qops.quantize import quantize

    q = tmp_path / "q.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", q)
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    proc = None
    if store == "server":
        port = free_port()
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri",
                                 f"sqlite:///{tmp_path / 's.db'}", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "2", "--artifacts-destination", str(tmp_path / "server-artifacts")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=tmp_path)
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", proc)
    else:
        uri = f"sqlite:///{tmp_path / 'r.db'}"
    try:
        for round_ in range(2):
            barrier = tmp_path / f"go{round_}"
            procs = [subprocess.Popen([sys.executable, "-c", REGISTER_RACER, str(barrier), uri, str(q), str(card),
                                       f"run-key-{round_}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=tmp_path) for _ in range(3)]
            time.sleep(6)
            barrier.touch()
            outs = [p.communicate(timeout=300) for p in procs]
            assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
            got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
            live = [mv for mv in _live_versions(uri, "raced-key") if mv.tags.get("qops.run_key") == f"run-key-{round_}"]
            assert len(live) == 1, [(mv.version, mv.tags) for mv in live]
            assert {g["version"] for g in got} == {str(live[0].version)}
            assert live[0].tags["qops.complete"] == "true"
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)


def _revision_before(migration: str) -> str:
    """The down revision of MLflow's migration file ``migration`` (to fake an upgrade interrupted after it)."""
    import re

    import mlflow.store.db_migrations as mig

    text = next((Path(mig.__file__).parent / "versions").glob(f"{migration}*.py")).read_text()
    return re.search(r"down_revision\s*=\s*[\"']([0-9a-f]+)[\"']", text).group(1)


def test_sqlite_store_killed_during_creation_or_left_half_migrated(tmp_path):
    """A process killed while the store is being created leaves no half-migrated DB (it is built beside the file
    and renamed); a DB found half-migrated (the alembic revision behind the tables, as after a kill mid-upgrade) is
    repaired when it holds no data, and named with the fix when it does."""
    import sqlite3


    db = tmp_path / "k.db"
    uri = f"sqlite:///{db}"
    code = f"from qops.mlflow_store import ensure_sqlite_store; ensure_sqlite_store({uri!r})"
    for delay in (0.8, 1.6, 2.4):
        p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not db.exists() or sqlite3.connect(db).execute("SELECT count(*) FROM alembic_version").fetchone()[0]
    r = subprocess.run([str(BIN / "python"), "-c", "from qops.registry import configure_mlflow; "
                        f"configure_mlflow({uri!r}); from mlflow import MlflowClient; "
                        "print(len(MlflowClient().search_experiments()))"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr[-1500:]
    assert not list(tmp_path.glob(".k.db.qops-tmp-*"))

    # half-migrated: the tables exist, the recorded revision is the one before `datasets` was created
    before = _revision_before("7f2a7d5fae7d_add_datasets_inputs")  # the migration that creates `datasets`
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = ?", (before,))
    con.commit()
    con.close()
    r = subprocess.run([str(BIN / "mlflow"), "experiments", "search"], capture_output=True, text=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert r.returncode != 0  # MLflow on its own: the error of the issue (out-of-date / already exists)
    r = subprocess.run([str(BIN / "python"), "-c", f"from qops.registry import configure_mlflow; "
                        f"configure_mlflow({uri!r}); from mlflow import MlflowClient; "
                        "print(len(MlflowClient().search_experiments()))"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr[-1500:]
    assert "half-migrated" in r.stderr and list(tmp_path.glob("k.db.broken-*"))

    # with a registered model in it, qops does not move it: exit 2 naming the file and `mlflow db upgrade`
    con = sqlite3.connect(db)
    con.execute("INSERT INTO registered_models (name, creation_time, last_updated_time) VALUES ('m', 0, 0)")
    con.execute("UPDATE alembic_version SET version_num = ?", (before,))
    con.commit()
    con.close()
    r = subprocess.run([str(BIN / "qops"), "promote", "--name", "m", "--version", "1", "--tracking-uri", uri],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert str(db) in r.stderr and "mlflow db upgrade" in r.stderr


def test_credentials_never_reach_stdout_logs_tags_cards_or_artifacts(fp32_model, data_dir, tmp_path):
    """A pipeline against a real `mlflow server` with a password in the tracking URI and a token and AWS secret in
    the environment: none of them in stdout, stderr, the run folder (cards, JSON), MLflow's tags, params or
    artifacts. `qops promote` against the same URI with the server down fails in seconds, without the password."""
    password, token, aws = "Pa55-w0rd-zq81", "tok-77ab19-secret", "aws-secret-9f3e1d"
    port = free_port()
    server_art = tmp_path / "server-artifacts"
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--artifacts-destination",
                             str(server_art)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=tmp_path)
    plain = f"http://127.0.0.1:{port}"
    uri = f"http://alice:{password}@127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_TOKEN": token, "AWS_SECRET_ACCESS_KEY": aws}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        wait_http(f"{plain}/health", proc)
        spec = _spec(tmp_path, data_dir, fp32_model, "cred", uri)
        r = subprocess.run([str(BIN / "qops"), "-v", "run", str(spec), "--run-id", "cred"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        for secret in (password, token, aws):
            assert secret not in r.stdout and secret not in r.stderr
        assert "127.0.0.1" in r.stderr  # the URI is logged, without its credentials
        for folder in (tmp_path / "artifacts", server_art):
            for f in folder.rglob("*"):
                if f.is_file():
                    data = f.read_bytes()
                    assert all(s.encode() not in data for s in (password, token, aws)), f
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=plain)
        versions = client.search_model_versions("name = 'fp32-x86-64-vnni-int8'")
        assert len(versions) == 1
        run = client.get_run(versions[0].run_id)
        blob = json.dumps([versions[0].tags, run.data.tags, run.data.params, versions[0].description])
        assert all(s not in blob for s in (password, token, aws))
    finally:
        proc.terminate()
        proc.wait(20)
    t0 = time.monotonic()
    r = subprocess.run([str(BIN / "qops"), "promote", "--name", "fp32-x86-64-vnni-int8", "--version", "1",
                        "--tracking-uri", uri], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and time.monotonic() - t0 < 60, (r.returncode, r.stderr[-1500:])
    assert "did not answer" in r.stderr and "Traceback" not in r.stderr
    assert password not in r.stdout + r.stderr and "alice" not in r.stderr


def test_quantize_killed_at_any_point_leaves_no_temp_files_and_no_unpaired_model(fp32_model, data_dir, tmp_path):
    """SIGKILL / SIGTERM of `qops quantize` at several points of its work (timed from the moment its working folder
    appears beside the output): TMPDIR stays empty, the output folder holds either no model or a model whose recipe
    describes it (same sha256), and the next quantization removes what a killed one left beside the output."""
    import pandas as pd

    from qops.quantize.result import verify_pair

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cal = tmp_path / "cal.parquet"  # large enough that entropy calibration takes a few seconds
    pd.concat([pd.read_parquet(data_dir / "pool.parquet")] * 100, ignore_index=True).to_parquet(cal)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    argv = [str(BIN / "qops"), "quantize", "--model", str(fp32_model), "--target", "x86_64_vnni_int8",
            "--calibration", str(cal), "--output", str(out_dir / "q.onnx"), "--option", "calibration_method=entropy"]

    def left_in_tmpdir() -> list[str]:  # ONNX Runtime writes one fixed session-id file (.ses) at import: not ours
        return sorted(p.name for p in tmpdir.iterdir() if p.name != ".ses")

    def start_and_wait_for_work():
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline and not any(
                f.name.startswith(f".qops-tmp-{p.pid}-") for f in out_dir.iterdir()):
            time.sleep(0.002)
        return p, time.monotonic()

    p, t0 = start_and_wait_for_work()  # an uninterrupted run: how long the work inside the folder takes
    p.communicate(timeout=300)
    work_s = time.monotonic() - t0
    assert p.returncode == 0 and work_s > 0.05, work_s
    for f in out_dir.iterdir():
        f.unlink()
    killed_mid_work = 0
    for share, sig in ((0.0, signal.SIGKILL), (0.15, signal.SIGKILL), (0.3, signal.SIGTERM), (0.5, signal.SIGKILL),
                       (0.7, signal.SIGTERM), (0.85, signal.SIGKILL), (0.97, signal.SIGKILL)):
        p, _ = start_and_wait_for_work()
        time.sleep(share * work_s)
        if p.poll() is None:
            p.send_signal(sig)
            killed_mid_work += 1
        _, err = p.communicate(timeout=120)
        assert "Traceback" not in err, err[-1500:]
        assert not left_in_tmpdir(), left_in_tmpdir()
        model = out_dir / "q.onnx"
        if model.exists():
            verify_pair(model)  # never a model without the recipe that describes it
        if sig == signal.SIGTERM:  # SIGTERM unwinds: its own working folder is gone at once
            assert not [f.name for f in out_dir.iterdir() if f.name.startswith(f".qops-tmp-{p.pid}-")]
    assert killed_mid_work >= 4, (killed_mid_work, work_s)
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    verify_pair(out_dir / "q.onnx")
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".qops-tmp-")]
    assert not left_in_tmpdir()


def test_aliases_settle_when_a_concurrent_writer_creates_the_same_alias_first(fp32_model, tmp_path):
    """MLflow's SQL store sets an alias by select-then-insert, so two registrations setting a new alias in the same
    instant collide on its unique key (a tracking server answers BAD_REQUEST "UNIQUE constraint failed", as a CI run
    of the concurrent-registration test hit once). The store is real; the collision is injected at the point it
    happens: the alias appears (another writer) and the store raises. settle_aliases reads back and confirms instead
    of rolling the registration back; any other store error still propagates."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from qops.quantize import quantize
    from qops.registry import configure_mlflow, register, settle_aliases

    configure_mlflow(f"sqlite:///{tmp_path / 'm.db'}")
    q = tmp_path / "q.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", q)
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    first = register(model_path=q, name="collide", run_key="k1", gate_passed=True, card_files=[card], tags={},
                     promote=False)
    real = MlflowClient()

    class Colliding:  # the real client, with the other writer's insert landing first on the first alias write
        def __init__(self, error: str):
            self.error, self.done = error, False

        def __getattr__(self, attr):
            return getattr(real, attr)

        def set_registered_model_alias(self, name, alias, version):
            if not self.done:
                self.done = True
                real.set_registered_model_alias(name, alias, version)  # the concurrent writer's insert
                raise MlflowException(self.error)
            return real.set_registered_model_alias(name, alias, version)

    held = settle_aliases(Colliding("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: "
                                    "registered_model_aliases.name, registered_model_aliases.alias"),
                          "collide", ["candidate", "champion"])
    assert held == {"candidate": first.version, "champion": first.version}
    assert {a: str(v) for a, v in real.get_registered_model("collide").aliases.items()} == held
    real.delete_registered_model_alias("collide", "champion")
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        settle_aliases(Colliding("PERMISSION_DENIED: not allowed"), "collide", ["champion"])
