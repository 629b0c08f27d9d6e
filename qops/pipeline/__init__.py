"""The pipeline's stages, driven by a spec: the stage table (:mod:`qops.pipeline.table`) that ``qops run``, ``qops
stage`` and the Airflow DAG factory all read, the stage functions, the run loop and the summary.

Each stage reads what earlier stages wrote under the run's folder (:class:`qops.run_folder.RunLayout`) and returns
small JSON; artifacts stay in the folder, never in XCom. What differs between model families lives in
:mod:`qops.modality`."""

from qops.pipeline.per_target import candidate, stage_evaluate, stage_gate, stage_qat, stage_quantize
from qops.pipeline.prepare import stage_calibrate, stage_finetune, stage_source
from qops.pipeline.publish import check_model_hash, registered_name, stage_card, stage_promote, stage_register
from qops.pipeline.run import run_pipeline
from qops.pipeline.summary import format_summary, stage_summary
from qops.pipeline.table import STAGES, Stage, call_stage, plan, stage
from qops.run_folder import RunLayout

__all__ = ["STAGES", "RunLayout", "Stage", "call_stage", "candidate", "check_model_hash", "format_summary", "plan",
           "registered_name", "run_pipeline", "stage", "stage_calibrate", "stage_card", "stage_evaluate",
           "stage_finetune", "stage_gate", "stage_promote", "stage_qat", "stage_quantize", "stage_register",
           "stage_source", "stage_summary"]
