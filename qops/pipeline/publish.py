"""Per-target stages that publish: the model card, the MLflow registration, the promotion of the serving alias.
Each decides for itself when it has nothing to do (its skip rule), so ``qops run``, ``qops stage`` and Airflow
skip alike."""

from __future__ import annotations

from pathlib import Path

from qops.artifacts import read_json, to_jsonable, write_json_atomic
from qops.cards import build_card_data, qat_section, write_card
from qops.engines import engine_of_result
from qops.engines.base import changed_files
from qops.errors import QopsError
from qops.modality import modality_for
from qops.pipeline.common import claimed, registered_name, required, skipped
from qops.pipeline.per_target import candidate
from qops.pipeline.runs import close_target, track_target, tracking_configured
from qops.registry import MODELS_URI, configure_mlflow, promote, providers_for, register, source_signature
from qops.run_folder import RunLayout


@claimed("target")
def stage_card(spec, run_id: str, target: str, dag_id: str | None = None) -> dict:
    """The model card of the target's candidate (Markdown, HTML, JSON, chart); written after a failed gate too, to
    document it. Skipped when the candidate has no gate result (an upstream stage failed before its gate)."""
    return write_target_card(spec, run_id, target, dag_id)


def write_target_card(spec, run_id: str, target: str, dag_id: str | None = None,
                      recommendation: dict | None = None) -> dict:
    """The card of one target (the card stage's work); ``recommendation``: the target of the same run that passed
    its gates and is recommended instead of a failed one (the summary stage writes failed cards again with it)."""
    layout = RunLayout.of(spec, run_id)
    tdir = layout.target(target)
    folder, method, why = candidate(spec, run_id, target)
    if not folder.gate.is_file():
        return skipped(target, f"no gate result for the {method.upper()} model of {target}: an upstream stage "
                       "failed before its gate")
    q = required(folder.quantize, "quantize" if method == "ptq" else "qat")
    evaluation = required(folder.evaluation, "evaluate" if method == "ptq" else "qat")
    gate_result = required(folder.gate, "gate")
    qat = None
    if method == "qat":
        qat = qat_section(required(tdir.evaluation, "evaluate"), required(tdir.gate, "gate"),
                          evaluation, q, why, spec.qat.targets[target].when)
    card = build_card_data(
        pipeline=spec.name,
        source=required(layout.source, "source"),
        target_recipe=q["recipe"],  # the recipe actually used (target options and tuning applied)
        calibration=read_json(layout.calibration) if q.get("calibration_path") and layout.calibration.is_file()
        else None,
        quantization=q,
        evaluation=evaluation,
        gate_result=gate_result,
        gate_settings=spec.gates_for(target).model_dump(),
        qat=qat,
        human=spec.card.model_dump(),
        lineage={"dag_id": dag_id or "qops-cli", "run_id": run_id, "spec_sha256": spec.digest(),
                 "artifact_dir": str(folder.path)},
        recommendation=recommendation,
    )
    out = to_jsonable(write_card(card, tdir.card_dir))
    out["method"] = method
    write_json_atomic(tdir.card, out)
    return out


def check_model_hash(q: dict) -> None:
    """The artifact about to be registered is the one this run's quantize stage wrote: its digest is recomputed by
    its engine (a manifest of file digests for checkpoint folders) and compared with the recorded one."""
    path = Path(q["model_path"])
    if not path.exists():
        raise QopsError(f"{path}, the model this run quantized, is gone.",
                        "rerun the quantize stage for this target (same spec and run id), then register.")
    engine = engine_of_result(q)
    actual = engine.digest(path)
    files = changed_files(q["manifest"], engine.manifest(path.parent if engine.primary else path)) \
        if q.get("manifest") else []
    if actual != q["model_sha256"] or files:
        changed = f" (changed since: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''})" if files else ""
        raise QopsError(f"{path} is not the model this run quantized: its sha256 is {actual}, the "
                        f"quantize stage recorded {q['model_sha256']}{changed}; another process changed it.",
                        "rerun the quantize stage for this target (same spec and run id), then register.")


def registry_tags(spec, run_id: str, target: str, source: dict, q: dict, method: str, layout: RunLayout) -> dict:
    recipe = q["recipe"]
    tags = {
        "qops.pipeline": spec.name, "qops.target": target, "qops.precision": recipe["precision"],
        "qops.mode": q.get("mode") or recipe["mode"], "qops.granularity": recipe["granularity"],
        "qops.source_model": source["name"], "qops.source_version": source["version"] or "",
        "qops.source_uri": source["uri"], "qops.model_sha256": q["model_sha256"],
        "qops.calibration_sha256": read_json(layout.calibration)["sha256"] if q.get("calibration_path") else "none",
        "qops.run_id": run_id, "qops.method": method,
    }
    if (q.get("technique") or {}).get("serving_format"):  # what a serving stack loads, and which version wrote it
        tags["qops.format"] = q["technique"]["serving_format"]
    if method == "qat":
        tags["qops.qat_scheme"] = f"{q['qat']['plan']['engine']}:{q['qat']['plan']['scheme']}"
        tags["qops.calibration_sha256"] = "none"  # activation ranges were observed during training
    return tags


def register_params(q: dict, target: str, method: str) -> dict[str, str]:
    recipe = q["recipe"]
    return {"target": target, "mode": recipe["mode"], "granularity": recipe["granularity"], "method": method,
            "precision": recipe["precision"], **({"engine": recipe["engine"]} if recipe.get("engine") else {}),
            **({"kv_cache_type": recipe["kv_cache_type"]} if recipe.get("engine") == "llama.cpp" else {})}


def card_paths(card: dict) -> list[str]:
    return [p for p in (card["markdown_path"], card["html_path"], card["json_path"], card["chart_path"],
                        card.get("qat_chart_path")) if p]


@claimed("target")
def stage_register(spec, run_id: str, target: str) -> dict:
    """Track the target in MLflow (the pipeline run's parent run, the target's nested run: metrics per slice,
    gate checks, trials, card, datasets), then register the candidate with tags, card and aliases. Skipped without
    a model card, and after failed gates unless ``mlflow.register_failed`` (then ``register.json`` says why it was
    not registered; the nested run is still logged when a tracking store is configured). Retries reuse both runs
    and the version."""
    layout = RunLayout.of(spec, run_id)
    tdir = layout.target(target)
    folder, method, _ = candidate(spec, run_id, target)
    if not tdir.card.is_file() or not folder.gate.is_file():
        return skipped(target, f"no model card for {target}: an upstream stage failed", registered=False)
    g = read_json(folder.gate)
    source = required(layout.source, "source")
    q = required(folder.quantize, "quantize")
    card = required(tdir.card, "card")
    name = registered_name(spec, source["name"], target)
    tags = registry_tags(spec, run_id, target, source, q, method, layout)
    params = register_params(q, target, method)

    def track() -> str:
        return track_target(spec, run_id, target, folder, g, tags=tags, params=params, card_files=card_paths(card))

    if not g["passed"] and not spec.mlflow.register_failed:
        mlflow_run = None
        if tracking_configured(spec):
            configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)
            mlflow_run = track()
            close_target(mlflow_run, registered=None)
        out = skipped(target, f"gates failed for the {method.upper()} model of {target}: not registered "
                      "(mlflow.register_failed is off)", registered=False, name=name, version=None, aliases=[],
                      run_id=mlflow_run)
        write_json_atomic(tdir.register, out)
        return out
    configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)
    ev = required(folder.evaluation, "evaluate")
    m = ev["primary_metric"]
    check_model_hash(q)
    mlflow_run = track()

    def finalize_card(mlflow_info: dict | None) -> list[str]:
        """Re-render the card with the MLflow run and model version it is registered as."""
        data = read_json(card["json_path"])
        data["lineage"]["mlflow"] = mlflow_info
        files = write_card(data, Path(card["json_path"]).parent)
        write_json_atomic(tdir.card, files)
        return files.files

    modality = modality_for(spec)
    example, extra = modality.register_extras(spec, layout, source, q)
    # a graph keeps its source's inputs: the source version's signature and example fit it (a decoder's do not:
    # its ONNX graph takes token ids and a KV cache, its source a prompt)
    signature, input_example = source_signature(source["name"], source.get("version")) \
        if MODELS_URI.match(source["uri"]) and spec.data.kind != "causal_lm" else (None, None)
    try:
        res = register(
            model_path=q["model_path"], name=name, run_key=f"{spec.name}|{run_id}|{target}|{q['model_sha256'][:16]}",
            tags=tags, gate_passed=g["passed"], card_files=card_paths(card),
            register_failed=spec.mlflow.register_failed, promote=spec.mlflow.promote_alias is not None,
            candidate_alias=spec.mlflow.candidate_alias, promote_alias=spec.mlflow.promote_alias,
            experiment=spec.mlflow.experiment,
            metrics={"fp32_" + m: ev["overall"][m]["fp32"], "quantized_" + m: ev["overall"][m]["quantized"],
                     "latency_p50_ms": ev["performance"]["latency_p50_ms"]["quantized"],
                     "size_bytes": ev["performance"]["size_bytes"]["quantized"]},
            params=params, finalize_card=finalize_card, execution_providers=providers_for(q["recipe"]),
            example=example, extra_files=extra, serves=modality.serves(spec),
            flavor=engine_of_result(q).flavor if q.get("engine_name") else None,
            run_id=mlflow_run, signature=signature, input_example=input_example, log_input_example=not extra,
        )
    except Exception:
        finalize_card(None)  # the version was rolled back: the card must not name it
        close_target(mlflow_run, registered=None, failed=True)
        raise
    out = to_jsonable(res)
    close_target(mlflow_run, registered=out)
    write_json_atomic(tdir.register, out)
    return out


@claimed("target")
def stage_promote(spec, run_id: str, target: str, approved: bool = False) -> dict:
    """Move ``mlflow.promotion.alias`` to the version this run registered for ``target``, by the spec's policy.
    Skipped when nothing was registered for the target in this run (failed gates, or an upstream failure)."""
    p = spec.mlflow.promotion
    if p is None:
        return skipped(target, "no mlflow.promotion in the spec", promoted=False)
    tdir = RunLayout.of(spec, run_id).target(target)
    reg = tdir.register
    r = read_json(reg) if reg.is_file() else {}
    if not r.get("registered") or not r.get("version"):
        return skipped(target, f"nothing was registered for {target} in run {run_id}: nothing to promote",
                       promoted=False)
    configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)
    # approval: airflow -- the DAG's approval task (or qops run --approve) is the manual approval
    out = promote(r["name"], r["version"], p.alias, approved=approved,
                  require_approval=p.require_approval or p.approval is not None,
                  better_on=p.better_on or None, by=f"{spec.name} run {run_id}")
    write_json_atomic(tdir.promote, out)
    return {"target": target, **out}
