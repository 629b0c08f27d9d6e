"""Helpers for tests that start real servers on loopback (moto's S3, MLflow): a free port, waiting for an HTTP
endpoint, a moto S3 server. Importable from any test (pytest puts tests/ on sys.path for its conftest)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, seconds: float = 90) -> None:
    """Until ``url`` answers (any HTTP status), or fail if ``proc`` exits first."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {seconds} s")


def start_moto(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """moto in server mode on a free loopback port: (process, endpoint URL). The caller kills it."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(extra_env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc, endpoint
