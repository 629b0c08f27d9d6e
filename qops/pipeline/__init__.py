"""The pipeline's stages, driven by a spec: the stage table (:mod:`qops.pipeline.table`) that ``qops run``, ``qops
stage`` and the Airflow DAG factory all read, the stage functions, the run loop and the summary.

Each stage reads what earlier stages wrote under the run's folder (:class:`qops.run_folder.RunLayout`) and returns
small JSON; artifacts stay in the folder, never in XCom. What differs between model families lives in
:mod:`qops.modality`.

The names below are imported on first access (PEP 562): importing :mod:`qops.pipeline.table` runs this file first,
and a DAG file parsed by a scheduler with the light install (docs/deployment.md) must not pull in the stage modules'
NumPy, pandas, ONNX Runtime and MLflow."""

from __future__ import annotations

import importlib

_WHERE = {
    "qops.pipeline.per_target": ("candidate", "stage_evaluate", "stage_gate", "stage_qat", "stage_quantize"),
    "qops.pipeline.prepare": ("stage_calibrate", "stage_finetune", "stage_source"),
    "qops.pipeline.common": ("registered_name",),
    "qops.pipeline.publish": ("check_model_hash", "stage_card", "stage_promote", "stage_register"),
    "qops.pipeline.run": ("run_pipeline",),
    "qops.pipeline.summary": ("format_summary", "stage_summary"),
    "qops.pipeline.table": ("STAGES", "Stage", "call_stage", "plan", "stage"),
    "qops.run_folder": ("RunLayout",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'qops.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
