"""Retraining DAG for the German Credit example.

Trains the credit-risk MLP on the shipped data, logs it to MLflow as ONNX, sets alias `champion`, and
updates the Asset that schedules the quantization DAG. ``QOPS_RETRAIN_SEED`` (default 0) seeds the training.
"""

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from qops_airflow.dag_factory import spec_asset

MODEL_ASSET = spec_asset("mlflow://german-credit/champion")
WORK_DIR = os.environ.get("QOPS_HOME", str(Path(__file__).resolve().parent.parent / ".demo"))
SEED = int(os.environ.get("QOPS_RETRAIN_SEED", "0"))

with DAG(
    "german_credit_retrain",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["qops", "retraining", "example"],
    doc_md=__doc__,
) as dag:

    @task(outlets=[MODEL_ASSET])
    def retrain() -> dict:
        from qops.examples.german_credit import retrain_and_register

        result = retrain_and_register(str(Path(WORK_DIR) / "retrain"), model_name="german-credit", seed=SEED)
        return {k: result[k] for k in ("model_uri", "version", "val_accuracy")}

    retrain()
