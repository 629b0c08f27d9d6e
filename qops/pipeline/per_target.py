"""Per-target stages: quantize, evaluate, gate, and QAT when the spec asks for it."""

from __future__ import annotations

import logging

from qops.artifacts import read_json, to_jsonable, write_json_atomic
from qops.gates import gate
from qops.modality import modality_for
from qops.pipeline.common import claimed, required
from qops.run_folder import ModelFolder, RunLayout

log = logging.getLogger(__name__)


@claimed("target")
def stage_quantize(spec, run_id: str, target: str) -> dict:
    layout = RunLayout.of(spec, run_id)
    required(layout.source, "source")
    recipe = spec.recipe(target)
    calibration = None
    if recipe.needs_calibration or layout.calibration.is_file():
        calibration = required(layout.calibration, "calibrate")
    out = to_jsonable(modality_for(spec).quantize(spec, layout, target, calibration))
    write_json_atomic(layout.target(target).quantize, out)
    return out


def evaluate_in(spec, layout: RunLayout, folder: ModelFolder) -> dict:
    quantized = required(folder.quantize, "quantize")
    required(layout.source, "source")
    out = modality_for(spec).evaluate(spec, layout, folder, quantized)
    write_json_atomic(folder.evaluation, out)
    return out


def gate_in(spec, folder: ModelFolder, target: str, qat_next=None) -> dict:
    res = gate(required(folder.evaluation, "evaluate"), spec.gates_for(target))
    out = to_jsonable(res)
    out["target"] = target
    out["message"] = res.message()
    if qat_next is not None:
        out["qat_next"] = qat_next(out["passed"])
    write_json_atomic(folder.gate, out)
    return out


@claimed("target")
def stage_evaluate(spec, run_id: str, target: str) -> dict:
    layout = RunLayout.of(spec, run_id)
    return evaluate_in(spec, layout, layout.target(target))


@claimed("target")
def stage_gate(spec, run_id: str, target: str) -> dict:
    """Gate verdict (never raises on failure: the stage table's ``failed`` rule decides; Airflow fails the task,
    ``qops stage`` exits 3). ``qat_next`` says that a failed PTQ gate is not the target's last word: QAT runs next
    (``qat.when: ptq_fails``) or always."""
    t = spec.qat.targets.get(target) if spec.qat else None
    return gate_in(spec, RunLayout.of(spec, run_id).target(target), target,
                   qat_next=lambda passed: bool(t and (t.when == "always" or not passed)))


def candidate(spec, run_id: str, target: str) -> tuple[ModelFolder, str, str]:
    """Folder of the target's candidate model (the one carded and registered), its method and why:
    the PTQ model, or the QAT model (``qat.when: always``, or ``ptq_fails`` after a failed PTQ gate)."""
    tdir = RunLayout.of(spec, run_id).target(target)
    t = spec.qat.targets.get(target) if spec.qat else None
    if t is None:
        return tdir, "ptq", "no QAT configured for this target"
    if t.when == "always":
        return tdir.qat, "qat", "qat.when is always"
    g = tdir.gate
    if g.is_file() and not read_json(g)["passed"]:
        return tdir.qat, "qat", "the PTQ model failed its gates (qat.when: ptq_fails)"
    return tdir, "ptq", "the PTQ model passed its gates (qat.when: ptq_fails)"


@claimed("target")
def stage_qat(spec, run_id: str, target: str) -> dict:
    """Quantization-aware training for ``target`` when the spec asks for it: after a failed PTQ gate
    (``qat.when: ptq_fails``) or always. Trains (resuming from the checkpoint of an earlier attempt of the same
    run), writes the target's artifact, evaluates and gates it like the PTQ model, into ``targets/<t>/qat/``."""
    folder, method, why = candidate(spec, run_id, target)
    if method != "qat":
        return {"target": target, "ran": False, "skipped": True, "reason": why}
    layout = RunLayout.of(spec, run_id)
    required(layout.source, "source")
    required(layout.target(target).quantize, "quantize")
    res = modality_for(spec).qat(spec, layout, target, folder, why)
    write_json_atomic(folder.quantize, to_jsonable(res))
    evaluate_in(spec, layout, folder)
    g = gate_in(spec, folder, target)
    return {"target": target, "ran": True, "reason": why, "passed": g["passed"], "message": g["message"],
            "model_path": res["model_path"], "size_bytes": res["size_bytes"], "steps": res["qat"]["training"]["steps"],
            "resumed_from": res["qat"]["training"]["resumed_from"], "seconds": res["seconds"]}
