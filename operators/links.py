"""Operator extra links: from a gate, card or register task in the Airflow UI to the MLflow model
(version) and to the model card.

Airflow 3 evaluates ``get_link`` on the worker when the task finishes and stores the URL in XCom, so
the links are built from the run folder as it is then: the register task links the exact model
version; gate and card tasks, which run before registration, link the registered model's page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from qops.run_folder import TargetFolder


def mlflow_ui_base() -> str:
    """``$QOPS_MLFLOW_UI_URL``, else an http(s) tracking URI, else the local UI of ``make mlflow-ui``."""
    url = os.environ.get("QOPS_MLFLOW_UI_URL")
    if not url:
        tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
        url = tracking if tracking.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return url.rstrip("/")


def _target_dir(operator) -> tuple[TargetFolder, dict]:
    from qops.artifacts import read_json
    from qops.run_folder import RunLayout
    from qops.spec import load_spec

    spec = load_spec(operator.spec_path)
    layout = RunLayout.of(spec, operator.run_key)
    source = read_json(layout.source) if layout.source.is_file() else {"name": "model"}
    return layout.target(operator.target), {"spec": spec, "source": source}


class QopsMlflowModelLink(BaseOperatorLink):
    name = "MLflow model"

    def get_link(self, operator, *, ti_key) -> str:
        from qops.artifacts import read_json
        from qops.pipeline import registered_name

        tdir, ctx = _target_dir(operator)
        name = registered_name(ctx["spec"], ctx["source"]["name"], operator.target)
        reg = tdir.register
        if reg.is_file() and read_json(reg).get("registered"):
            return f"{mlflow_ui_base()}/#/models/{name}/versions/{read_json(reg)['version']}"
        return f"{mlflow_ui_base()}/#/models/{name}"


class QopsModelCardLink(BaseOperatorLink):
    name = "Model card"

    def get_link(self, operator, *, ti_key) -> str:
        from qops.artifacts import read_json

        tdir, _ = _target_dir(operator)
        card = tdir.card
        if not card.is_file():
            return ""
        return Path(read_json(card)["html_path"]).resolve().as_uri()
