"""qops_airflow: the Airflow layer of qops (hooks, operators, DAG factory).

Installed from the ``operators/`` folder under the import name ``qops_airflow`` and registered as an
Airflow provider through the ``apache_airflow_provider`` entry point.
"""

from __future__ import annotations

from qops import __version__  # one version for both import packages (qops/__init__.py)


def get_provider_info() -> dict:
    return {
        "package-name": "qops",
        "name": "qops",
        "description": "Quantization pipeline: calibration with drift checks, PTQ per hardware target, "
        "accuracy/fairness gates, model cards and MLflow registration.",
        "versions": [__version__],
        "integrations": [{"integration-name": "qops", "tags": ["software"]}],
        "operators": [{"integration-name": "qops", "python-modules": ["qops_airflow.operators",
                                                                              "qops_airflow.approval"]}],
        "hooks": [{"integration-name": "qops", "python-modules": ["qops_airflow.hooks"]}],
        "triggers": [{"integration-name": "qops", "python-modules": ["qops_airflow.triggers"]}],
        "connection-types": [{
            "hook-class-name": "qops_airflow.hooks.MlflowHook", "connection-type": "qops_mlflow",
            "hook-name": "MLflow (qops)",
            "conn-fields": {
                "tracking_uri": {"label": "Tracking URI", "schema": {"type": "string"},
                                 "description": "MLflow tracking URI (http(s)://..., databricks, sqlite:///...); "
                                 "empty: http(s)://host:port"},
                "registry_uri": {"label": "Registry URI", "description": "A separate model registry (default: the "
                                 "tracking server)", "schema": {"type": "string"}},
                "token": {"label": "Token", "description": "Bearer token (MLFLOW_TRACKING_TOKEN)",
                          "schema": {"type": "string", "format": "password"}},
            },
            "ui-field-behaviour": {"hidden-fields": ["extra"], "relabeling": {"login": "Username", "schema": "Scheme"},
                                   "placeholders": {"host": "mlflow.example.com", "port": "5000",
                                                    "schema": "http or https"}},
        }],
        "extra-links": ["qops_airflow.links.QopsMlflowModelLink", "qops_airflow.links.QopsModelCardLink"],
    }
