"""The register stage's MLflow runs: the pipeline run's parent run and the target's nested run, filled from what the
run folder holds (evaluation, gate, quantization trials, card, calibration and validation tables). Every target gets
its nested run, registered or not; :mod:`qops.registry.tracking` does the logging."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qops.artifacts import read_json
from qops.redact import redact
from qops.registry import (
    configure_mlflow,
    evaluation_metrics,
    find_pipeline_run,
    finish,
    gate_metrics,
    log_dataset,
    log_target,
    pipeline_run,
    reachable,
    target_run,
)
from qops.run_folder import ModelFolder, RunLayout

log = logging.getLogger(__name__)


def tracking_configured(spec) -> bool:
    """Whether the spec or the environment names an MLflow tracking store (a target that is not registered is
    still tracked when one is; without one, only registration needs it)."""
    return bool(spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def track_target(spec, run_id: str, target: str, folder: ModelFolder, gate_result: dict, *, tags: dict[str, str],
                 params: dict[str, str], card_files: list[str]) -> str:
    """Find or create the parent run of ``run_id`` and the nested run of ``target``; log into the nested run the
    evaluation's overall and per-slice metrics with their interval bounds, the gate verdict per check, the tuning
    trials (a tuned target), the card and the calibration and validation sets as dataset inputs. Returns the
    nested run's id (the registered version's ``run_id``). MLflow must be configured by the caller."""
    from mlflow import MlflowClient

    layout = RunLayout.of(spec, run_id)
    client = MlflowClient()
    reachable(client)
    source = read_json(layout.source) if layout.source.is_file() else {}
    parent = pipeline_run(client, experiment=spec.mlflow.experiment, pipeline=spec.name, run_id=run_id,
                          lock_path=layout.mlflow_lock,
                          tags={"qops.spec_sha256": spec.digest(), "qops.source_uri": source.get("uri", ""),
                                "qops.source_version": source.get("version") or ""})
    child = target_run(client, parent_id=parent, pipeline=spec.name, run_id=run_id, target=target)
    metrics = evaluation_metrics(read_json(folder.evaluation)) if folder.evaluation.is_file() else {}
    gm, gtags = gate_metrics(gate_result)
    q = read_json(folder.quantize) if folder.quantize.is_file() else {}
    log_target(client, child, metrics={**metrics, **gm}, params=params,
               tags={**tags, **gtags, "qops.gate": "passed" if gate_result.get("passed") else "failed"},
               card_files=card_files, trials=q.get("trials") or None)
    label = spec.data.label
    cal = layout.calibration_files.table
    if cal.is_file() and q.get("calibration_path"):
        log_dataset(client, child, cal, name=f"{spec.name}-calibration", context="calibration", label=label)
    if spec.data.validation and Path(spec.data.validation).is_file():
        log_dataset(client, child, spec.data.validation, name=f"{spec.name}-validation", context="validation",
                    label=label)
    return child


def close_target(run_id_mlflow: str, *, registered: dict | None, failed: bool = False) -> None:
    """Mark the target's nested run with what registration did (``qops.registered``, the model name and version)
    and end it; the parent run ends with it (a later target moves its end time on)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = {"qops.registered": "true" if registered and registered.get("registered") else "false"}
    if registered and registered.get("version"):
        tags.update({"qops.model_name": registered["name"], "qops.model_version": str(registered["version"])})
    for k, v in tags.items():
        client.set_tag(run_id_mlflow, k, v)
    finish(client, run_id_mlflow, "FAILED" if failed else "FINISHED")
    parent = client.get_run(run_id_mlflow).data.tags.get("mlflow.parentRunId")
    if parent:
        finish(client, parent)


def log_summary(spec, run_id: str, summary: dict) -> str | None:
    """Attach the run's summary to its parent run (``summary.json``; metrics ``targets``, ``targets_passed``,
    ``targets_registered``) when a register stage created one. MLflow trouble is logged, not raised: the summary
    is the run folder's report first. Returns the parent's id, or None."""
    if not tracking_configured(spec):
        return None
    from mlflow import MlflowClient

    try:
        configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)
        client = MlflowClient()
        parent = find_pipeline_run(client, experiment=spec.mlflow.experiment, pipeline=spec.name, run_id=run_id)
        if parent is None:
            return None
        rows = summary["targets"]
        for k, v in {"targets": len(rows), "targets_passed": sum(r.get("gate") == "passed" for r in rows),
                     "targets_registered": sum(bool((r.get("mlflow") or {}).get("registered")) for r in rows)}.items():
            client.log_metric(parent, k, float(v))
        client.log_text(parent, redact(json.dumps(summary, indent=2, default=str)), RunLayout.SUMMARY)
        for r in rows:  # a failed target's card was written again with its recommendation: its run gets that copy
            if r.get("recommended_instead") and r.get("card"):
                child = target_run(client, parent_id=parent, pipeline=spec.name, run_id=run_id, target=r["target"])
                client.set_tag(child, "qops.recommended_instead", r["recommended_instead"])
                for f in (r["card"]["markdown"], r["card"]["html"], r["card"]["json"]):
                    client.log_artifact(child, str(f), artifact_path="card")
        finish(client, parent)
        return parent
    except Exception as e:  # noqa: BLE001 - the summary stands without its MLflow copy
        log.warning("the summary of %s could not be attached to its MLflow parent run: %s", run_id,
                    redact(str(e).splitlines()[0][:200]) if str(e) else type(e).__name__)
        return None
