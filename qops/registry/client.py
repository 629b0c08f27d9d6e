"""The MLflow client side: where the tracking server is (``configure_mlflow``; a local SQLite store is created on
first use), whether it answers, and the ``models:/`` URI grammar."""

from __future__ import annotations

import logging
import os
import re

from qops.errors import RegistryError, RegistryUnavailable
from qops.mlflow_store import ensure_sqlite_store
from qops.redact import redact, split_credentials

log = logging.getLogger(__name__)


MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def configure_mlflow(tracking_uri: str | None = None, registry_uri: str | None = None) -> str:
    """Point MLflow at the tracking (and registry) store. Credentials in the URI (``http://user:pass@host``) move
    to ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, so MLflow never holds them in a URI it prints; MLflow's own
    "View run at" lines are suppressed when the URI still carries a secret (a ``?token=``). A SQLite store is
    created or checked once, under a lock (:mod:`qops.mlflow_store`). Returns the URI without credentials."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("No MLflow tracking URI configured.",
                            "set mlflow.tracking_uri in the spec or the MLFLOW_TRACKING_URI environment variable "
                            "(e.g. sqlite:///mlflow.db).")
    uri, user, password = split_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:  # subprocesses read it too: without its credentials
        os.environ["MLFLOW_TRACKING_URI"] = split_credentials(env_uri)[0]
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    ensure_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    if registry_uri:
        registry_uri = split_credentials(registry_uri)[0]
        ensure_sqlite_store(registry_uri)
        mlflow.set_registry_uri(registry_uri)
    return uri


def reachable(client, attempts: int = 4, backoff_s: float = 1.0) -> None:
    """Check that the tracking server answers before anything is written: ``attempts`` tries with exponential
    backoff (MLflow's own HTTP retries are turned off for the check, so the bound is ours), then a clear error.
    Nothing has been registered when it fails, and a retry of the task registers idempotently."""
    import time

    from mlflow.exceptions import MlflowException

    uri = redact(mlflow_tracking_uri())
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    last = None
    try:
        for i in range(attempts):
            try:
                client.search_experiments(max_results=1)
                return
            except (MlflowException, OSError) as e:  # connection refused, timeouts, 5xx
                last = e
                log.warning("MLflow at %s did not answer (attempt %d of %d): %s", uri, i + 1, attempts,
                            redact(str(e).splitlines()[0][:200]))
                if i + 1 < attempts:
                    time.sleep(backoff_s * 2 ** i)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous
    raise RegistryUnavailable(f"The MLflow tracking server at {uri} did not answer after {attempts} attempts "
                              f"({redact(str(last).splitlines()[0][:200]) if last else 'no response'}); nothing "
                              "was registered.",
                              "start the server or fix the tracking URI (spec mlflow.tracking_uri, MLFLOW_TRACKING_URI "
                              "or the Airflow connection); the task's retry registers idempotently.")


def mlflow_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
