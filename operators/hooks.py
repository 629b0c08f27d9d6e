"""Hooks own connections: the MLflow tracking server comes from an Airflow connection or the environment."""

from __future__ import annotations

import os

from airflow.sdk import BaseHook


class MlflowHook(BaseHook):
    """Resolves the MLflow tracking URI.

    With ``mlflow_conn_id`` set, the connection's ``extra.tracking_uri`` is used if present, else the
    connection's URI with an ``http``/``https`` scheme (``host``, ``port``, optional login/password,
    passed to MLflow through ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` so they never appear in URIs,
    logs or tags; ``extra.token`` goes to ``MLFLOW_TRACKING_TOKEN``); the operators then use it over the spec's
    ``mlflow.tracking_uri``. Without it: the spec's ``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str | None = None) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id

    def configure(self) -> str | None:
        """Export the tracking settings to the environment of this task; returns the URI (no credentials)."""
        if not self.mlflow_conn_id:
            return os.environ.get("MLFLOW_TRACKING_URI")
        conn = self.get_connection(self.mlflow_conn_id)
        extra = conn.extra_dejson
        uri = extra.get("tracking_uri")
        if not uri:
            scheme = conn.schema if conn.schema in ("http", "https") else "http"
            uri = f"{scheme}://{conn.host}" + (f":{conn.port}" if conn.port else "")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        if conn.login:
            os.environ["MLFLOW_TRACKING_USERNAME"] = conn.login
        if conn.password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = conn.password
        if extra.get("token"):  # bearer token (Databricks-style or an auth proxy): MLflow reads it from here
            os.environ["MLFLOW_TRACKING_TOKEN"] = extra["token"]
        return uri
