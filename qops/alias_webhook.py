"""The HTTP side of ``qops webhook``: a FastAPI app around a :class:`~qops.alias_events.WebhookReceiver`, served by
uvicorn on a socket bound before the server starts (so a port in use is an error at start-up, and port 0 gives a
free port the caller can read).

Routes: ``POST <path>`` (MLflow's deliveries; bodies over 1 MiB get 413), ``GET /health`` (``{"status": "ok"}``);
anything else 404. The receiver's checks and its Airflow calls block, so deliveries run in the thread pool, as the
threaded ``http.server`` of earlier versions ran them: one slow Airflow call does not hold the others up.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the routes' annotations in these globals
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from qops.alias_events import WebhookReceiver

log = logging.getLogger("qops.alias_events")

MAX_BODY = 1 << 20


def create_app(receiver: WebhookReceiver, path: str = "/mlflow-webhook"):
    """The ASGI app of the receiver (a FastAPI app; no OpenAPI or docs routes)."""
    app = FastAPI(title="qops webhook", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        response = await call_next(request)
        client = request.client.host if request.client else "-"
        log.info("%s \"%s %s\" %d", client, request.method, request.url.path, response.status_code)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post(path)
    async def deliver(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return JSONResponse({"error": "payload over 1 MiB"}, status_code=413)
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no Content-Length: count what arrives
            body += chunk
            if len(body) > MAX_BODY:
                return JSONResponse({"error": "payload over 1 MiB"}, status_code=413)
        status, out = await run_in_threadpool(receiver.handle, request.headers, bytes(body))
        return JSONResponse(out, status_code=status)

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def elsewhere(request: Request, rest: str):  # noqa: ARG001 - the catch-all's path parameter
        if request.method == "POST":
            return JSONResponse({"error": f"post MLflow webhooks to {path}"}, status_code=404)
        return JSONResponse({}, status_code=404)

    return app


class WebhookServer:
    """uvicorn serving :func:`create_app` on ``host:port``; the socket is bound at construction (``port`` is the
    bound one, also when 0 was asked for). :meth:`serve_forever` runs in the calling thread until SIGINT/SIGTERM
    (main thread) or :meth:`shutdown`; :meth:`start` runs it in a daemon thread and returns once it accepts."""

    def __init__(self, receiver: WebhookReceiver, host: str = "127.0.0.1", port: int = 8790,
                 path: str = "/mlflow-webhook") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.host, self.path = host, path
        config = uvicorn.Config(create_app(receiver, path), log_config=None, access_log=False, lifespan="off",
                                server_header=False)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout_s: float = 30) -> "WebhookServer":
        self._thread = threading.Thread(target=self.serve_forever, name="qops-webhook", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError(f"the webhook server did not start within {timeout_s} s")
        return self

    def shutdown(self, timeout_s: float = 30) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.socket.close()


def serve(receiver: WebhookReceiver, host: str = "127.0.0.1", port: int = 8790,
          path: str = "/mlflow-webhook") -> WebhookServer:
    """A server for ``receiver`` bound on ``host:port`` (call ``serve_forever``, or ``start`` for a thread)."""
    return WebhookServer(receiver, host, port, path)
