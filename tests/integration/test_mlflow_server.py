"""Server mode: the pipeline registers into a real `mlflow server` (SQLite backend) whose artifacts live on an
S3-compatible store (moto in server mode, on loopback) — proxied (`--artifacts-destination`, the client holds no
S3 credentials) and direct (`--default-artifact-root s3://...`, the client writes to S3 itself through
MLFLOW_S3_ENDPOINT_URL). Versions, tags, aliases and cards are read back with MlflowClient, the objects are
found in the bucket, and `models:/NAME@champion` loads and predicts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from servers import free_port, start_moto, wait_http

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
BUCKET = "qops-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "qops-test", "AWS_SECRET_ACCESS_KEY": "qops-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    import boto3

    proc, endpoint = start_moto(S3_ENV)
    try:
        boto3.client("s3", endpoint_url=endpoint, **_creds()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


def _creds() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


@pytest.fixture(params=["proxied", "direct"])
def mlflow_server(request, s3, tmp_path):
    port = free_port()
    mode = request.param
    store = ["--artifacts-destination", f"s3://{BUCKET}/proxied"] if mode == "proxied" else \
        ["--default-artifact-root", f"s3://{BUCKET}/direct", "--no-serve-artifacts"]
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *store],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc)
        yield mode, uri, s3
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pipeline_registers_into_a_tracking_server_with_s3_artifacts(mlflow_server, fp32_model, data_dir, tmp_path,
                                                                     monkeypatch):
    import boto3
    import mlflow
    from mlflow import MlflowClient

    from qops.pipeline import run_pipeline
    from qops.spec import load_spec

    mode, uri, endpoint = mlflow_server
    for k in ("MLFLOW_S3_ENDPOINT_URL", *S3_ENV):
        monkeypatch.delenv(k, raising=False)
    if mode == "direct":  # the client uploads to S3 itself; proxied: it holds no S3 credentials at all
        for k, v in {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    spec = {"name": "server-mode", "source_model": str(fp32_model),
            "data": {"pool": str(data_dir / "pool.parquet"), "reference": str(data_dir / "train.parquet"),
                     "validation": str(data_dir / "validation.parquet"), "label": "risk",
                     "slice_columns": ["sex"]},
            "calibration": {"size": 100},
            "targets": ["x86_64_int8_dynamic"],
            # what this test checks is the registry, not the model: bounds every quantized model meets
            "gates": {"max_overall_drop": 1.0, "max_slice_drop": 1.0, "max_fairness_increase": 1.0,
                      "max_latency_ratio": 100.0, "bootstrap": 100, "latency_runs": 20},
            "mlflow": {"experiment": f"qops-server-{mode}"},
            "artifact_root": str(tmp_path / "artifacts")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    summary = run_pipeline(load_spec(tmp_path / "spec.yaml"), run_id=f"server-{mode}", progress=False)
    row = summary["targets"][0]
    assert row["gate"] == "passed" and row["mlflow"]["registered"], row
    name = row["mlflow"]["name"]
    client = MlflowClient(tracking_uri=uri)
    mv = client.get_model_version_by_alias(name, "champion")
    assert str(mv.version) == str(row["mlflow"]["version"])
    assert mv.tags["qops.target"] == "x86_64_int8_dynamic" and mv.tags["qops.gate"] == "passed"
    assert sorted(client.get_registered_model(name).aliases) == ["candidate", "champion"]
    assert {a.path for a in client.list_artifacts(mv.run_id, "card")} >= {"card/card.md", "card/card.json"}
    # the objects are in the bucket, under the mode's prefix
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint, **_creds())
            .list_objects_v2(Bucket=BUCKET, Prefix=mode + "/").get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("/card/card.md") for k in keys), keys[:20]
    # serving: load by alias and predict; the ONNX flavor declares the target's providers (CPU only)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@champion",
                                                     dst_path=str(tmp_path / "dl")))
    assert yaml.safe_load((local / "MLmodel").read_text())["flavors"]["onnx"]["providers"] == ["CPUExecutionProvider"]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    import json

    feats = json.loads((data_dir / "encoding.json").read_text())["features"]
    x = pd.read_parquet(data_dir / "validation.parquet")[feats].to_numpy(np.float32)[:16]
    out = model.predict(x)
    out = np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)  # {output name: array}
    assert out.shape == (16, 2) and np.isfinite(out).all()


def test_registration_with_the_server_down_fails_fast_and_clearly(fp32_model, tmp_path, monkeypatch):
    """No server on the port: bounded retries with backoff, then an error naming the URI (without its
    credentials) and the fix; nothing half-written (the server was never reached)."""
    from qops.errors import RegistryError
    from qops.quantize import quantize
    from qops.registry import configure_mlflow, register

    port = free_port()  # nothing listens here
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # configure_mlflow moves the URI's
        monkeypatch.setenv(k, "")  # credentials here: the test's end restores what was there before
    configure_mlflow(f"http://qops:s3cret@127.0.0.1:{port}")
    q = tmp_path / "q.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", q)
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    t0 = time.time()
    with pytest.raises(RegistryError) as e:
        register(model_path=q, name="down", run_key="k", gate_passed=True, card_files=[card], tags={})
    took = time.time() - t0
    msg = str(e.value)
    assert "did not answer after 4 attempts" in msg and "nothing was registered" in msg and "Fix:" in msg
    assert f"127.0.0.1:{port}" in msg and "s3cret" not in msg
    assert 7 <= took < 60  # 1 + 2 + 4 s of backoff, not MLflow's default minutes of retries


class _FaultyS3Proxy:
    """An HTTP proxy in front of the S3 server that answers 500 to every PUT whose path contains ``fail_on``
    (while set), as a store failing in the middle of an upload does; everything else is forwarded unchanged."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.fail_on: str | None = None
        self.failed: list[str] = []
        up = urlparse(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and proxy.fail_on and proxy.fail_on in self.path:
                    proxy.failed.append(self.path)
                    err = b"<Error><Code>InternalError</Code><Message>injected fault</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("fail_on", ["/model.onnx", "/card/card.md"])
def test_s3_failing_mid_upload_leaves_no_version_and_the_retry_registers_once(s3, fail_on, fp32_model, tmp_path,
                                                                              monkeypatch):
    """Direct mode through a proxy that fails the model's upload (before any version exists) or the card's
    (after the version was created): the registration fails clearly and no version points at missing
    artifacts; the task's retry, once S3 is back, registers exactly one complete version."""
    import boto3
    import mlflow
    from mlflow import MlflowClient

    from qops.errors import RegistryError
    from qops.quantize import quantize
    from qops.registry import configure_mlflow, register

    proxy = _FaultyS3Proxy(s3)
    port = free_port()
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--default-artifact-root",
                             f"s3://{BUCKET}/faults", "--no-serve-artifacts"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc)
        for k, v in {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "2"}.items():
            monkeypatch.setenv(k, v)
        configure_mlflow(uri)
        q = tmp_path / "q.onnx"
        quantize(fp32_model, "x86_64_int8_dynamic", q)
        card = tmp_path / "card.md"
        card.write_text("# card\n")
        kw = dict(model_path=q, name="s3-faults", run_key=f"run-1:{fail_on}", gate_passed=True, card_files=[card],
                  tags={"qops.target": "x86_64_int8_dynamic"})
        proxy.fail_on = fail_on
        with pytest.raises(RegistryError, match="failed and was rolled back") as e:
            register(**kw)
        assert proxy.failed and "Fix:" in str(e.value)
        client = MlflowClient(uri)
        assert client.search_model_versions("name = 's3-faults'") == []  # nothing points at missing artifacts
        if fail_on == "/card/card.md":  # the version existed for a moment; its aliases went with it
            assert client.get_registered_model("s3-faults").aliases == {}
        proxy.fail_on = None  # S3 is back: the retry
        res = register(**kw)
        again = register(**kw)  # and a retry of a task that had in fact finished
        (mv,) = client.search_model_versions("name = 's3-faults'")
        assert (res.version, again.version, again.reused) == (mv.version, mv.version, True)
        assert mv.tags["qops.complete"] == "true"
        assert client.get_model_version_by_alias("s3-faults", "champion").version == mv.version
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3, **_creds())
                .list_objects_v2(Bucket=BUCKET, Prefix="faults/").get("Contents", [])]
        assert any(k.endswith(f"{mv.run_id}/artifacts/card/card.md") for k in keys), keys
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/s3-faults/{mv.version}",
                                                         dst_path=str(tmp_path / "dl")))
        assert (local / "MLmodel").is_file()
    finally:
        proxy.close()
        proc.terminate()
        proc.wait(20)


def test_concurrent_registrations_leave_the_aliases_on_the_newest_version(fp32_model, tmp_path, monkeypatch):
    """Two DAG runs registering the same target at once (threads against one tracking server): every version is
    complete, and candidate and champion end on the same, newest one — whatever the interleaving. A late
    registration of an older source version does not take the aliases back."""
    import threading

    from mlflow import MlflowClient

    from qops.quantize import quantize
    from qops.registry import configure_mlflow, register

    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--artifacts-destination",
                             str(tmp_path / "artifacts")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc)
        configure_mlflow(uri)
        q = tmp_path / "q.onnx"
        quantize(fp32_model, "x86_64_int8_dynamic", q)
        card = tmp_path / "card.md"
        card.write_text("# card\n")
        client = MlflowClient(uri)

        def reg(key: str, source_version: str, out: list) -> None:
            try:
                out.append(register(model_path=q, name="raced", run_key=key, gate_passed=True, card_files=[card],
                                    tags={"qops.source_version": source_version}).version)
            except Exception as e:  # noqa: BLE001 - surfaced below
                out.append(e)

        for round_ in range(3):
            out: list = []
            threads = [threading.Thread(target=reg, args=(f"run-{round_}-{i}", "7", out)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not [o for o in out if isinstance(o, Exception)], out
            versions = client.search_model_versions("name = 'raced'")
            assert all(mv.tags["qops.complete"] == "true" for mv in versions)
            newest = str(max(int(mv.version) for mv in versions))
            assert {a: str(v) for a, v in client.get_registered_model("raced").aliases.items()} == {
                "candidate": newest, "champion": newest}, (round_, out)
        late = register(model_path=q, name="raced", run_key="late-run-of-source-6", gate_passed=True,
                        card_files=[card], tags={"qops.source_version": "6"})
        assert late.aliases == [] and client.get_registered_model("raced").aliases["champion"] == newest
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_connection_test_button_reaches_a_real_tracking_server(tmp_path, monkeypatch):
    """The Airflow UI's Test button calls ``Connection.test_connection()``, which finds the hook by the connection
    type through the provider info, with the form's connection exported as ``AIRFLOW_CONN_<ID>`` as Airflow's
    ``POST /connections/test`` does: against a real `mlflow server` on loopback it passes and names the server;
    against a port nothing listens on it fails with a message, and no credential appears in either."""
    from airflow.models.connection import Connection

    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=tmp_path)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(k, "placeholder")
        monkeypatch.delenv(k)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        def test_button(conn):
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn.conn_id.upper()}", conn.as_json())
            return conn.test_connection()

        ok, msg = test_button(Connection(conn_id="mlflow_up", conn_type="qops_mlflow", host="127.0.0.1", port=port,
                                         login="u", password="s3cret-pw"))
        assert ok and f"http://127.0.0.1:{port}" in msg and "s3cret-pw" not in msg, msg
        ok, msg = test_button(Connection(conn_id="mlflow_down", conn_type="qops_mlflow", host="127.0.0.1",
                                         port=free_port(), password="s3cret-pw"))
        assert not ok and "MLflow did not answer" in msg and "s3cret-pw" not in msg, msg
    finally:
        proc.terminate()
        proc.wait(20)
