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
        "operators": [{"integration-name": "qops", "python-modules": ["qops_airflow.operators"]}],
        "hooks": [{"integration-name": "qops", "python-modules": ["qops_airflow.hooks"]}],
        "triggers": [{"integration-name": "qops", "python-modules": ["qops_airflow.triggers"]}],
        "connection-types": [{"hook-class-name": "qops_airflow.hooks.MlflowHook", "connection-type": "mlflow"}],
        "extra-links": ["qops_airflow.links.QopsMlflowModelLink", "qops_airflow.links.QopsModelCardLink"],
    }
