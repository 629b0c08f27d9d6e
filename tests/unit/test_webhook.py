"""The webhook fast path's checks, against MLflow's own signing code: deliveries signed with the secret pass,
forged, unsigned, stale and malformed ones are refused with a reason, other events and unwatched models are
ignored, all before Airflow or the registry is contacted. (The full path — MLflow server -> receiver -> Airflow
REST API -> DAG run — runs in tests/integration/test_celery_stack.py.)"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from qops.alias_events import AirflowClient, Rejected, WebhookReceiver, receiver_from_env, sign, verify
from qops.alias_webhook import serve

SECRET = "s3cret"


def _headers(body: bytes, secret: str = SECRET, ts: int | None = None, delivery: str = "d-1") -> dict:
    ts = str(int(time.time()) if ts is None else ts)
    return {"X-MLflow-Signature": sign(secret, delivery, ts, body), "X-MLflow-Timestamp": ts,
            "X-MLflow-Delivery-Id": delivery}


def _body(entity="model_version_alias", action="created", **data) -> bytes:
    data = data or {"name": "m", "alias": "champion", "version": "2"}
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-29T00:00:00Z",
                       "data": data}).encode()


def test_signature_matches_mlflow_and_is_verified():
    body = _body()
    assert sign(SECRET, "d-1", "1700000000", body) == _generate_hmac_signature(SECRET, "d-1", "1700000000",
                                                                              body.decode())
    assert verify(SECRET, _headers(body), body) == "d-1"


@pytest.mark.parametrize("case, reason", [
    ("wrong secret", "bad signature"), ("tampered body", "bad signature"), ("unsigned", "unsigned delivery"),
    ("stale", "stale delivery"), ("bad timestamp", "not a Unix time")])
def test_forged_or_replayed_deliveries_are_refused(case, reason):
    body = _body()
    headers = {"wrong secret": _headers(body, "guess"), "tampered body": _headers(_body(version="666")),
               "unsigned": {}, "stale": _headers(body, ts=int(time.time()) - 3600),
               "bad timestamp": {**_headers(body), "X-MLflow-Timestamp": "yesterday"}}[case]
    with pytest.raises(Rejected, match=reason) as e:
        verify(SECRET, headers, body)
    assert e.value.status == 401


class _NoAirflow(AirflowClient):
    def _request(self, *a, **k):  # these cases must be decided before any call to Airflow
        raise AssertionError("Airflow was contacted")


def test_the_receiver_ignores_other_events_and_unwatched_models_over_http():
    receiver = WebhookReceiver(SECRET, _NoAirflow("http://127.0.0.1:9"), {("m", "champion")})
    server = serve(receiver, "127.0.0.1", 0).start()  # uvicorn on a free loopback port
    url = f"http://127.0.0.1:{server.port}/mlflow-webhook"

    def post(body, headers, path=url):
        req = urllib.request.Request(path, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    try:
        b = _body(entity="model_version", action="created", name="m", version="3")
        assert post(b, _headers(b)) == (202, {"status": "ignored", "reason": "event model_version.created"})
        b = _body(name="other", alias="champion", version="3")
        assert post(b, _headers(b))[1]["reason"] == "other@champion is not watched"
        b = _body(name="m", alias="champion")  # version missing
        status, out = post(b, _headers(b))
        assert status == 400 and "needs name, alias and version" in out["error"]
        assert post(b"not json", _headers(b"not json"))[0] == 400
        assert post(_body(), _headers(_body(), "guess"))[0] == 401
        assert post(_body(), _headers(_body()), url.replace("/mlflow-webhook", "/elsewhere")) == (
            404, {"error": "post MLflow webhooks to /mlflow-webhook"})
    finally:
        server.shutdown()


def test_the_receiver_needs_a_secret_and_well_formed_watches(monkeypatch):
    monkeypatch.delenv("QOPS_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="QOPS_WEBHOOK_SECRET"):
        receiver_from_env("http://127.0.0.1:8080", ["m@champion"])
    monkeypatch.setenv("QOPS_WEBHOOK_SECRET", SECRET)
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        receiver_from_env("http://127.0.0.1:8080", ["m"])
    assert receiver_from_env("http://127.0.0.1:8080", ["m@champion", "n@prod"]).watch == {("m", "champion"),
                                                                                         ("n", "prod")}


def test_refused_airflow_credentials_are_named_and_mlflow_retries(monkeypatch):
    """Airflow refusing the token request: 502 (MLflow retries the delivery) and a message naming the variables
    to set — checked against a real HTTP server that answers /auth/token with 401, after a verified delivery."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    airflow = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=airflow.serve_forever, daemon=True).start()
    client = AirflowClient(f"http://127.0.0.1:{airflow.server_address[1]}", username="hook", password="wrong")
    receiver = WebhookReceiver(SECRET, client, {("m", "champion")})
    # the registry side is not what this test is about: the watermark says version 1 was announced
    monkeypatch.setattr("qops.alias_events.watermark", lambda *a, **k: "1")
    try:
        body = _body()
        status, out = receiver.handle(_headers(body), body)
        assert status == 502 and "refused a token as 'hook' (HTTP 401)" in out["error"]
        assert "AIRFLOW_API_USERNAME and AIRFLOW_API_PASSWORD" in out["error"] and "wrong" not in out["error"]
    finally:
        airflow.shutdown()
        airflow.server_close()


def _start_cli(*flags):
    """``qops webhook`` in a subprocess on a free port: (process, URL of the webhook path) once it listens."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "QOPS_WEBHOOK_SECRET": SECRET}
    p = subprocess.Popen([sys.executable, "-m", "qops.cli", "webhook", "--watch", "m@champion", "--airflow-url",
                          "http://127.0.0.1:9", "--port", "0", *flags], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    stream = p.stdout if "--json" in flags else p.stderr
    seen = ""
    while True:
        line = stream.readline()
        if not line:
            p.kill()
            raise AssertionError(f"qops webhook exited: {seen}{p.stderr.read()}")
        seen += line
        if "--json" in flags:
            try:
                return p, json.loads(seen)["url"], json.loads(seen)
            except ValueError:
                continue
        m = re.search(r"MLflow posts to (\S+);", line)
        if m:
            return p, m.group(1), None


def test_qops_webhook_serves_on_uvicorn_and_prints_json_only_with_the_flag():
    """The real command: --port 0 binds a free port; --json prints where it listens as one JSON document (and only
    then: without it stdout stays empty, the log line goes to stderr); /health answers, an unsigned delivery is 401,
    an oversized body 413; Ctrl-C (SIGINT) stops it with exit 0."""
    import signal

    for flags in (("--json",), ()):
        p, url, doc = _start_cli(*flags)
        try:
            if doc is not None:
                assert doc["watching"] == ["m@champion"] and doc["airflow_url"] == "http://127.0.0.1:9"
            base = url.rsplit("/", 1)[0]
            with urllib.request.urlopen(base + "/health", timeout=10) as r:
                assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
            req = urllib.request.Request(url, data=_body(), method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 401
            # an oversized delivery is refused on its declared length, before the body is read (the body is not
            # sent here: the server answers first, and a client still sending would see the connection close)
            parts = urllib.parse.urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            conn.putrequest("POST", parts.path)
            conn.putheader("Content-Length", str((1 << 20) + 1))
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 413 and json.loads(r.read()) == {"error": "payload over 1 MiB"}
            conn.close()
        finally:
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        if doc is None:
            assert out == "", out


def test_a_port_in_use_is_bad_input_naming_it(monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "qops.cli", "webhook", "--watch", "m@champion", "--airflow-url",
                            "http://127.0.0.1:9", "--port", str(port)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "QOPS_WEBHOOK_SECRET": SECRET})
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Fix:" in r.stderr, r.stderr
