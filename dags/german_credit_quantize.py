"""Quantization DAG for the German Credit example, built from dags/specs/german_credit.yaml.

Scheduled on the Asset that the retraining DAG updates (mlflow://german-credit/champion): every
retraining triggers quantization for each hardware target in the spec.
"""

from pathlib import Path

from qops_airflow.dag_factory import build_quantization_dag

dag = build_quantization_dag(Path(__file__).parent / "specs" / "german_credit.yaml", dag_id="german_credit_quantize")
