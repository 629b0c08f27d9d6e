"""Run-level stages: resolve the source model, fine-tune it (QLoRA), select and drift-check the calibration set."""

from __future__ import annotations

from qops.artifacts import to_jsonable
from qops.calibration import S3Options, select_calibration
from qops.errors import QopsError
from qops.modality import modality_for
from qops.pipeline.common import claimed, required
from qops.preflight import check_spec_data
from qops.run_folder import RunLayout


@claimed("run")
def stage_source(spec, run_id: str, source_uri: str | None = None) -> dict:
    """Resolve the source model (MLflow URI, .onnx/.pt2 path, or a Hugging Face folder for causal LMs) to local
    files. ``source_uri``: the exact version a run was triggered for (``models:/NAME/VERSION``, from a registry
    alias event), instead of the spec's ``source_model``."""
    check_spec_data(spec)  # label/slice columns and slice_overrides before any work
    return modality_for(spec).source(spec, RunLayout.of(spec, run_id), source_uri or spec.source_model)


@claimed("run")
def stage_finetune(spec, run_id: str) -> dict:
    """QLoRA fine-tuning (``qlora`` block, causal LMs): the merged full-precision model replaces the source."""
    if spec.qlora is None:
        raise QopsError("The spec has no qlora block: there is nothing to fine-tune.", "add a qlora block "
                        "(docs/llm.md#qlora) or skip this stage.")
    return modality_for(spec).finetune(spec, RunLayout.of(spec, run_id))


@claimed("run")
def stage_calibrate(spec, run_id: str) -> dict:
    layout = RunLayout.of(spec, run_id)
    source = required(layout.source, "source")
    kind, inputs = modality_for(spec).calibration_kind(spec, source)
    d = spec.data
    res = select_calibration(spec.calibration, pool=d.pool, reference=d.reference, output_dir=layout.calibration_dir,
                             features=kind, slice_columns=d.slice_columns, validation=d.validation,
                             model_inputs=inputs, s3=S3Options(spec.storage.s3_endpoint_url, spec.storage.s3_region))
    return to_jsonable(res)
