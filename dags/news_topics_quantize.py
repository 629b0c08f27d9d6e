"""Quantization DAG for the text example, built from dags/specs/news_topics.yaml.

Scheduled on the Asset that news_topics_retrain updates (mlflow://news-topics/champion): text calibration
(tokenized with the model's own tokenizer, drift-checked on token length, unknown-token rate and token
frequencies), tuning, accuracy gates per topic and article length plus embedding fidelity gates, cards and
registration per target.
"""

from pathlib import Path

from qops_airflow.dag_factory import build_quantization_dag

dag = build_quantization_dag(Path(__file__).parent / "specs" / "news_topics.yaml", dag_id="news_topics_quantize")
