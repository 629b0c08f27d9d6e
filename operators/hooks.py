"""Hooks own connections: the MLflow tracking server comes from an Airflow connection or the environment."""

from __future__ import annotations

import os

from airflow.sdk import BaseHook

CONN_TYPE = "qops_mlflow"  # its own name: "mlflow" is another public provider's connection type
EXTRA_FIELDS = ("tracking_uri", "registry_uri", "token")  # the connection form's fields (provider info: conn-fields)


class MlflowHook(BaseHook):
    """The MLflow tracking server of a ``qops_mlflow`` connection (default ``mlflow_default``).

    The tracking URI is the connection's ``tracking_uri`` field (extra) if set, else ``http(s)://host:port`` (schema
    ``https`` for TLS); ``registry_uri`` (extra) names a separate model registry. Login/password go to MLflow as
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` and ``token`` as ``MLFLOW_TRACKING_TOKEN`` (MLflow reads credentials only
    from the environment; a task runs in its own process), so they never appear in URIs, logs or tags. The
    operators use the connection's URI over the spec's ``mlflow.tracking_uri``. When the connection id is the default
    and no such connection is defined, the spec's URI (else ``$MLFLOW_TRACKING_URI``) is used.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = CONN_TYPE
    hook_name = "MLflow (qops)"

    def __init__(self, mlflow_conn_id: str | None = default_conn_name) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id

    def _connection(self):
        """The connection, or None when none is named or the default one is not defined."""
        if not self.mlflow_conn_id:
            return None
        try:
            return self.get_connection(self.mlflow_conn_id)
        except Exception as e:  # AirflowNotFoundException (its module moved between Airflow releases)
            if self.mlflow_conn_id == self.default_conn_name and type(e).__name__ == "AirflowNotFoundException":
                return None
            raise

    @staticmethod
    def _extra(conn, name: str):
        extra = conn.extra_dejson
        return extra.get(name) or extra.get(f"extra__{CONN_TYPE}__{name}") or None

    def configure(self) -> str | None:
        """Export the tracking settings to the environment of this task; returns the URI (no credentials), or None
        when no connection applies (the caller keeps the spec's URI, else ``$MLFLOW_TRACKING_URI``)."""
        conn = self._connection()
        if conn is None:
            return None
        uri = self._extra(conn, "tracking_uri")
        if not uri:
            scheme = conn.schema if conn.schema in ("http", "https") else "http"
            uri = f"{scheme}://{conn.host}" + (f":{conn.port}" if conn.port else "")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        if self._extra(conn, "registry_uri"):
            os.environ["MLFLOW_REGISTRY_URI"] = self._extra(conn, "registry_uri")
        if conn.login:
            os.environ["MLFLOW_TRACKING_USERNAME"] = conn.login
        if conn.password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = conn.password
        if self._extra(conn, "token"):  # bearer token (Databricks-style or an auth proxy): MLflow reads it from here
            os.environ["MLFLOW_TRACKING_TOKEN"] = self._extra(conn, "token")
        return uri

    def get_conn(self):
        """An ``MlflowClient`` for the connection (or the environment's server when none applies)."""
        from mlflow import MlflowClient

        uri = self.configure() or os.environ.get("MLFLOW_TRACKING_URI")
        return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or None)

    def test_connection(self) -> tuple[bool, str]:
        """The UI's Test button: one request to the tracking server, without MLflow's retries (an answer within
        seconds, not after minutes of back-off)."""
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        saved = {k: os.environ.get(k) for k in quick}
        os.environ.update(quick)
        try:
            client = self.get_conn()
            n = len(client.search_experiments(max_results=5))
            return True, f"MLflow at {client.tracking_uri} answered ({n} experiment(s) visible)"
        except Exception as e:  # shown to the user as the test's message; credentials are never in it
            from qops import redact

            return False, f"MLflow did not answer: {redact.redact(str(e).splitlines()[0][:300] if str(e) else e)}"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
