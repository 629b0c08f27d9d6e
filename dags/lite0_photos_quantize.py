"""Quantization DAG for the image example, built from dags/specs/lite0_photos.yaml.

Scheduled on the Asset that lite0_photos_publish updates (mlflow://lite0-photos/champion): image calibration
(drift-checked on image features), static INT8 with an integer graph and layer-wise bias correction, tuning,
label-free gates on top-1 agreement and logit fidelity per photo, cards and registration per target.
"""

from pathlib import Path

from qops_airflow.dag_factory import build_quantization_dag

dag = build_quantization_dag(Path(__file__).parent / "specs" / "lite0_photos.yaml", dag_id="lite0_photos_quantize")
