"""The pipeline's stages, driven by a spec. `qops run` and the Airflow operators call the same functions.

Each stage reads what earlier stages wrote under the run's folder (``<artifact_root>/<pipeline>/<run_id>``)
and returns small JSON; artifacts stay in the folder, never in XCom.
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from qops import __version__
from qops.artifacts import read_json, run_dir, sha256_file, to_jsonable, write_json_atomic
from qops.errors import QopsError
from qops.run_folder import claim, new_run_id
from qops.spec import PipelineSpec

log = logging.getLogger(__name__)


def claimed(scope: str):
    """A stage holds its run folder while it runs (:func:`qops.run_folder.claim`): ``run`` exclusive (run-level
    stages that write shared inputs), ``shared`` (summary), ``target`` (the run folder shared, the target's own
    folder exclusive). The spec binding is checked first, so a run id reused with another spec fails here."""
    def wrap(fn):
        @functools.wraps(fn)
        def stage(spec: PipelineSpec, run_id: str, *args, **kwargs):
            target = (args[0] if args else kwargs.get("target")) if scope == "target" else None
            with claim(_rdir(spec, run_id), spec.digest(), spec.name, run_id, scope=scope, target=target):
                return fn(spec, run_id, *args, **kwargs)
        return stage
    return wrap


def _rdir(spec: PipelineSpec, run_id: str) -> Path:
    return run_dir(spec.artifact_root, spec.name, run_id)


def _tdir(spec: PipelineSpec, run_id: str, target: str) -> Path:
    return _rdir(spec, run_id) / "targets" / target


def _mlflow(spec: PipelineSpec) -> None:
    from qops.registry import configure_mlflow

    configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)


def _load(path: Path, stage: str) -> dict:
    if not path.is_file():
        from qops.errors import QopsError

        raise QopsError(f"{path} is missing: stage {stage!r} has not run for this run id.",
                        f"run the {stage} stage first (same spec and run id).")
    return read_json(path)


@claimed("run")
def stage_source(spec: PipelineSpec, run_id: str, source_uri: str | None = None) -> dict:
    """Resolve the source model (MLflow URI or .onnx path) to a local FP32 ONNX file. ``source_uri``: the exact
    version a run was triggered for (``models:/NAME/VERSION``, from a registry alias event), instead of the
    spec's ``source_model``."""
    from qops.preflight import check_spec_data
    from qops.registry import fetch_source_model

    check_spec_data(spec)  # label/slice columns and slice_overrides before any work
    uri = source_uri or spec.source_model
    if _llm(spec):
        from qops.llm import stages

        return stages.source(spec, _rdir(spec, run_id), uri)
    if uri.startswith("models:/"):
        _mlflow(spec)
    src = fetch_source_model(uri, _rdir(spec, run_id))
    out = to_jsonable(src)
    write_json_atomic(_rdir(spec, run_id) / "source.json", out)
    return out


def _llm(spec: PipelineSpec) -> bool:
    return spec.data.kind == "causal_lm"


@claimed("run")
def stage_finetune(spec: PipelineSpec, run_id: str) -> dict:
    """QLoRA fine-tuning (``qlora`` block, causal LMs): the merged full-precision model replaces the source."""
    from qops.errors import QopsError
    from qops.llm import stages

    if spec.qlora is None:
        raise QopsError("The spec has no qlora block: there is nothing to fine-tune.", "add a qlora block "
                        "(docs/llm.md#qlora) or skip this stage.")
    return stages.finetune(spec, _rdir(spec, run_id))


def _features(spec: PipelineSpec, source: dict):
    """Tabular: the feature column list; other kinds: the :class:`~qops.data.DataKind` built from the spec."""
    from qops.data import Tabular, kind_from_spec, onnx_io

    inputs, meta = onnx_io(source["path"])
    kind = kind_from_spec(spec.data, inputs, meta)
    return kind.features if isinstance(kind, Tabular) else kind


@claimed("run")
def stage_calibrate(spec: PipelineSpec, run_id: str) -> dict:
    from qops.calibration import select_calibration
    from qops.calibration.select import Diversity, Recency
    from qops.calibration.sources import S3Options
    from qops.data import onnx_io

    source = _load(_rdir(spec, run_id) / "source.json", "source")
    if _llm(spec):
        from qops.llm import stages

        if not source.get("path"):
            from qops.errors import QopsError

            raise QopsError("The source model has not been exported yet: the spec fine-tunes it first (qlora).",
                            "run the finetune stage first (same spec and run id).")
        return stages.calibrate(spec, _rdir(spec, run_id))
    c = spec.calibration
    res = select_calibration(
        pool=spec.data.pool, reference=spec.data.reference, output_dir=_rdir(spec, run_id) / "calibration",
        size=c.size, features=_features(spec, source), slice_columns=spec.data.slice_columns, strategy=c.strategy,
        seed=c.seed, stratify_by=c.stratify_by, drift_enabled=c.drift.enabled,
        quantile_tolerance=c.drift.quantile_tolerance, max_kl=c.drift.max_kl_divergence, on_drift=c.drift.on_drift,
        min_per_slice=c.min_per_slice, on_small_slice=c.on_small_slice,
        recency=Recency(**c.recency.model_dump()) if c.recency else None,
        diversity=Diversity(**c.diversity.model_dump()) if c.diversity else None,
        max_psi=c.drift.max_psi, min_ks_pvalue=c.drift.min_ks_pvalue, max_reselect=c.drift.max_reselect,
        reference_sample=c.reference_sample, validation=spec.data.validation,
        model_inputs=onnx_io(source["path"])[0],
        s3=S3Options(spec.storage.s3_endpoint_url, spec.storage.s3_region),
    )
    return to_jsonable(res)


def _source_for(recipe, source: dict) -> str:
    """The FP32 model a target quantizes: the ONNX export, or the torch.export program for torchao targets."""
    if recipe.engine != "torchao":
        return source["path"]
    if not source.get("pt2_path"):
        from qops.errors import QopsError

        raise QopsError(
            f"Target {recipe.target!r} quantizes PyTorch programs, but the source model {source['uri']} is "
            f"{source['flavor']}-flavored (no torch.export program).",
            "log the FP32 model with mlflow.pytorch.log_model(..., serialization_format='pt2') or set source_model "
            "to a .pt2 file; or drop the torch_* targets from this spec.")
    return source["pt2_path"]


def _judge(spec: PipelineSpec, fp32_path: str, features: list[str]):
    """The tuner's judge: the evaluate stage's evaluation (fewer resamples/timed runs) and the spec's gates."""
    from qops.quantize.tune import gate_judge

    return gate_judge(fp32_path, spec.data.validation, _label(spec), spec.gates,
                      slice_columns=spec.data.slice_columns, features=features,
                      intersections=spec.data.intersections, latency_runs=spec.tuning.latency_runs,
                      bootstrap=spec.tuning.bootstrap)


def _label(spec: PipelineSpec) -> str | None:
    return None if spec.gates.task == "embedding" else spec.data.label


@claimed("target")
def stage_quantize(spec: PipelineSpec, run_id: str, target: str) -> dict:
    from qops.quantize import quantize

    rdir, tdir = _rdir(spec, run_id), _tdir(spec, run_id, target)
    if _llm(spec):
        from qops.llm import stages

        return stages.quantize(spec, rdir, tdir, target)
    source = _load(rdir / "source.json", "source")
    recipe = spec.recipe(target)
    src = _source_for(recipe, source)
    cal_json = rdir / "calibration" / "calibration.json"
    calibration = None
    if recipe.needs_calibration or cal_json.is_file():
        cal = _load(cal_json, "calibrate")
        # ONNX engines read the materialised feeds (named arrays, as checked against the graph); torch the table
        calibration = cal.get("feeds_path") if recipe.engine != "torchao" and cal.get("feeds_path") else cal["path"]
    features = _features(spec, source)
    out_path = tdir / f"model{recipe.output_suffix}"
    t = spec.tuning
    if t.enabled and (t.targets is None or target in t.targets):
        from qops.quantize.tune import tune

        log.info("tuning %s: up to %d trials / %.0f s", target, t.max_trials, t.timeout_s)
        res = tune(src, recipe, out_path, _judge(spec, src, features), calibration=calibration, features=features,
                   config=t, ranking_data=calibration or spec.data.validation, validation=spec.data.validation)
    else:
        res = quantize(src, recipe, out_path, calibration=calibration, features=features)
    out = to_jsonable(res)
    write_json_atomic(tdir / "quantize.json", out)
    return out


def _evaluate_in(spec: PipelineSpec, run_id: str, folder: Path) -> dict:
    from qops.evaluate import evaluate

    if _llm(spec):
        from qops.llm import stages

        _load(folder / "quantize.json", "quantize")
        return stages.evaluate(spec, _rdir(spec, run_id), folder)
    source = _load(_rdir(spec, run_id) / "source.json", "source")
    q = _load(folder / "quantize.json", "quantize")
    g = spec.gates
    res = evaluate(q["source_path"], q["model_path"], spec.data.validation, _label(spec), spec.data.slice_columns,
                   features=_features(spec, source), metric=g.metric, latency_runs=g.latency_runs, task=g.task,
                   metrics=g.metrics, custom_metrics=g.custom_metrics, intersections=spec.data.intersections,
                   min_slice_size=g.min_slice_size, bootstrap=g.bootstrap, confidence=g.confidence, seed=g.seed,
                   target=q["recipe"], outputs=g.outputs, output=g.output, embedding_output=g.embedding_output,
                   batch_size=g.batch_size)
    out = to_jsonable(res)
    write_json_atomic(folder / "evaluation.json", out)
    return out


def _gate_in(spec: PipelineSpec, folder: Path, target: str, qat_next=None) -> dict:
    from qops.gates import gate

    res = gate(_load(folder / "evaluation.json", "evaluate"), spec.gates)
    out = to_jsonable(res)
    out["target"] = target
    out["message"] = res.message()
    if qat_next is not None:
        out["qat_next"] = qat_next(out["passed"])
    write_json_atomic(folder / "gate.json", out)
    return out


@claimed("target")
def stage_evaluate(spec: PipelineSpec, run_id: str, target: str) -> dict:
    return _evaluate_in(spec, run_id, _tdir(spec, run_id, target))


@claimed("target")
def stage_gate(spec: PipelineSpec, run_id: str, target: str) -> dict:
    """Gate verdict (never raises on failure: the caller decides; the operator fails the task). ``qat_next`` says
    that a failed PTQ gate is not the target's last word: QAT runs next (``qat.when: ptq_fails``) or always."""
    t = spec.qat.targets.get(target) if spec.qat else None
    return _gate_in(spec, _tdir(spec, run_id, target), target,
                    qat_next=lambda passed: bool(t and (t.when == "always" or not passed)))


def candidate(spec: PipelineSpec, run_id: str, target: str) -> tuple[Path, str, str]:
    """Folder of the target's candidate model (the one carded and registered), its method and why:
    the PTQ model, or the QAT model (``qat.when: always``, or ``ptq_fails`` after a failed PTQ gate)."""
    tdir = _tdir(spec, run_id, target)
    t = spec.qat.targets.get(target) if spec.qat else None
    if t is None:
        return tdir, "ptq", "no QAT configured for this target"
    if t.when == "always":
        return tdir / "qat", "qat", "qat.when is always"
    g = tdir / "gate.json"
    if g.is_file() and not read_json(g)["passed"]:
        return tdir / "qat", "qat", "the PTQ model failed its gates (qat.when: ptq_fails)"
    return tdir, "ptq", "the PTQ model passed its gates (qat.when: ptq_fails)"


def _training_table(spec: PipelineSpec, source: dict):
    """The QAT training split as a table, the data kind, and labels (None for distillation)."""
    from qops.data import Tabular, read_table
    from qops.qat_job import task_labels

    q = spec.qat
    path = q.data or spec.data.reference
    df = read_table(path, "QAT training set")
    if q.max_rows and len(df) > q.max_rows:
        df = df.sample(q.max_rows, random_state=q.seed).sort_index()
    kind = _features(spec, source)
    kind = Tabular(kind) if isinstance(kind, list) else kind
    label = q.label or spec.data.label
    labels = None
    if q.resolved_loss(has_label=bool(label)) == "task":
        labels = task_labels(df, label, path, "set qat.label (or data.label) to the training split's label column "
                             "of class indices, or qat.loss: distill (label-free).")
    return df, kind, labels, path


def _torch_program(spec: PipelineSpec, source: dict) -> str:
    from qops.errors import QopsError

    program = spec.qat.program or source.get("pt2_path")
    if not program or not Path(program).is_file():
        raise QopsError(
            f"QAT trains a PyTorch program, and the source model {source['uri']} has none "
            f"({'not found: ' + str(program) if program else source['flavor'] + '-flavored'}).",
            "log the FP32 model with mlflow.pytorch.log_model(..., serialization_format='pt2'), tag its model version "
            "qops.torch_program with the artifact URI of its .pt2 program (the retraining examples do), or set "
            "qat.program to the .pt2 file the ONNX model was exported from.")
    return program


@claimed("target")
def stage_qat(spec: PipelineSpec, run_id: str, target: str) -> dict:
    """Quantization-aware training for ``target`` when the spec asks for it: after a failed PTQ gate
    (``qat.when: ptq_fails``) or always. Trains (resuming from the checkpoint of an earlier attempt of the same
    run), writes the target's artifact, evaluates and gates it like the PTQ model, into ``targets/<t>/qat/``."""
    from qops.data import onnx_io
    from qops.qat_job import run_qat

    tdir = _tdir(spec, run_id, target)
    folder, method, why = candidate(spec, run_id, target)
    if method != "qat":
        return {"target": target, "ran": False, "reason": why}
    rdir = _rdir(spec, run_id)
    source = _load(rdir / "source.json", "source")
    ptq = _load(tdir / "quantize.json", "quantize")
    plan = spec.qat_plan(target, mode=ptq.get("mode"))
    df, kind, labels, path = _training_table(spec, source)
    inputs = onnx_io(source["path"])[0]
    feeds = kind.feeds(df, inputs, "QAT training set")
    cfg = spec.qat.config_for(target, plan, has_label=labels is not None)
    log.info("QAT for %s (%s): %s %s on %d rows of %s", target, why, plan.engine, plan.scheme, len(df), path)
    res = run_qat(source_onnx=source["path"], program=_torch_program(spec, source), recipe=spec.recipe(target),
                  plan=plan, cfg=cfg, train_feeds=feeds, labels=labels, out_dir=folder, work_dir=folder / "work")
    res["qat"]["why"], res["qat"]["data"] = why, path
    write_json_atomic(folder / "quantize.json", to_jsonable(res))
    _evaluate_in(spec, run_id, folder)
    g = _gate_in(spec, folder, target)
    return {"target": target, "ran": True, "reason": why, "passed": g["passed"], "message": g["message"],
            "model_path": res["model_path"], "size_bytes": res["size_bytes"], "steps": res["qat"]["training"]["steps"],
            "resumed_from": res["qat"]["training"]["resumed_from"], "seconds": res["seconds"]}


@claimed("target")
def stage_card(spec: PipelineSpec, run_id: str, target: str, dag_id: str | None = None) -> dict:
    from qops.cards import build_card_data, write_card

    rdir, tdir = _rdir(spec, run_id), _tdir(spec, run_id, target)
    folder, method, why = candidate(spec, run_id, target)
    q = _load(folder / "quantize.json", "quantize" if method == "ptq" else "qat")
    cal_path = rdir / "calibration" / "calibration.json"
    qat = None
    if method == "qat":
        from qops.cards import qat_section

        qat = qat_section(_load(tdir / "evaluation.json", "evaluate"), _load(tdir / "gate.json", "gate"),
                          _load(folder / "evaluation.json", "qat"), q, why, spec.qat.targets[target].when)
    card = build_card_data(
        pipeline=spec.name,
        source=_load(rdir / "source.json", "source"),
        target_recipe=q["recipe"],  # the recipe actually used (target options and tuning applied)
        calibration=read_json(cal_path) if q.get("calibration_path") and cal_path.is_file() else None,
        quantization=q,
        evaluation=_load(folder / "evaluation.json", "evaluate"),
        gate_result=_load(folder / "gate.json", "gate"),
        gate_settings=spec.gates.model_dump(),
        qat=qat,
        human=spec.card.model_dump(),
        lineage={"dag_id": dag_id or "qops-cli", "run_id": run_id, "spec_sha256": spec.digest(),
                 "artifact_dir": str(folder)},
    )
    out = to_jsonable(write_card(card, tdir / "card"))
    out["method"] = method
    write_json_atomic(tdir / "card.json", out)
    return out


def check_model_hash(q: dict) -> None:
    """The file about to be registered is the model this run's quantize stage wrote (its recorded sha256)."""
    path = Path(q["model_path"])
    actual = sha256_file(path) if path.is_file() else q["model_sha256"]
    if actual != q["model_sha256"]:
        raise QopsError(f"{path} is not the model this run quantized: its sha256 is {actual}, the "
                        f"quantize stage recorded {q['model_sha256']} (another process wrote the file).",
                        "rerun the quantize stage for this target (same spec and run id), then register.")


def registered_name(spec: PipelineSpec, source_name: str, target: str) -> str:
    return spec.mlflow.model_name.format(source=source_name, target=target.replace("_", "-"), pipeline=spec.name)


@claimed("target")
def stage_register(spec: PipelineSpec, run_id: str, target: str) -> dict:
    from qops.cards import write_card
    from qops.registry import providers_for, register

    _mlflow(spec)
    rdir, tdir = _rdir(spec, run_id), _tdir(spec, run_id, target)
    folder, method, _ = candidate(spec, run_id, target)
    source = _load(rdir / "source.json", "source")
    q = _load(folder / "quantize.json", "quantize")
    g = _load(folder / "gate.json", "gate")
    card = _load(tdir / "card.json", "card")
    ev = _load(folder / "evaluation.json", "evaluate")
    recipe, m = q["recipe"], ev["primary_metric"]
    check_model_hash(q)
    tags = {
        "qops.pipeline": spec.name, "qops.target": target, "qops.precision": recipe["precision"],
        "qops.mode": q.get("mode") or recipe["mode"], "qops.granularity": recipe["granularity"],
        "qops.source_model": source["name"], "qops.source_version": source["version"] or "",
        "qops.source_uri": source["uri"], "qops.model_sha256": q["model_sha256"],
        "qops.calibration_sha256": (read_json(rdir / "calibration" / "calibration.json")["sha256"]
                                    if q.get("calibration_path") else "none"),
        "qops.run_id": run_id, "qops.method": method,
    }
    if method == "qat":
        tags["qops.qat_scheme"] = f"{q['qat']['plan']['engine']}:{q['qat']['plan']['scheme']}"
        tags["qops.calibration_sha256"] = "none"  # activation ranges were observed during training

    def finalize_card(mlflow_info: dict | None) -> list[str]:
        """Re-render the card with the MLflow run and model version it is registered as."""
        data = read_json(card["json_path"])
        data["lineage"]["mlflow"] = mlflow_info
        files = write_card(data, Path(card["json_path"]).parent)
        write_json_atomic(tdir / "card.json", files)
        return files.files

    example, extra = None, []
    if _llm(spec):
        from qops.llm.stages import register_extras

        example, extra = register_extras(spec, source, q)
    try:
        res = register(
            model_path=q["model_path"], name=registered_name(spec, source["name"], target),
            run_key=f"{spec.name}|{run_id}|{target}|{q['model_sha256'][:16]}", tags=tags, gate_passed=g["passed"],
            card_files=[p for p in (card["markdown_path"], card["html_path"], card["json_path"], card["chart_path"],
                                    card.get("qat_chart_path")) if p],
            register_failed=spec.mlflow.register_failed, promote=True, candidate_alias=spec.mlflow.candidate_alias,
            promote_alias=spec.mlflow.promote_alias, experiment=spec.mlflow.experiment,
            metrics={"fp32_" + m: ev["overall"][m]["fp32"], "quantized_" + m: ev["overall"][m]["quantized"],
                     "latency_p50_ms": ev["performance"]["latency_p50_ms"]["quantized"],
                     "size_bytes": ev["performance"]["size_bytes"]["quantized"]},
            params={"target": target, "mode": recipe["mode"], "granularity": recipe["granularity"], "method": method},
            finalize_card=finalize_card, execution_providers=providers_for(recipe), example=example,
            extra_files=extra,
        )
    except Exception:
        finalize_card(None)  # the version was rolled back: the card must not name it
        raise
    out = to_jsonable(res)
    write_json_atomic(tdir / "register.json", out)
    return out


@claimed("target")
def stage_promote(spec: PipelineSpec, run_id: str, target: str, approved: bool = False) -> dict:
    """Move ``mlflow.promotion.alias`` to the version this run registered for ``target``, by the spec's policy."""
    from qops.errors import QopsError
    from qops.registry import promote

    p = spec.mlflow.promotion
    if p is None:
        return {"target": target, "promoted": False, "reason": "no mlflow.promotion in the spec"}
    r = _load(_tdir(spec, run_id, target) / "register.json", "register")
    if not r.get("registered") or not r.get("version"):
        raise QopsError(f"Nothing was registered for {target} in run {run_id}: nothing to promote.",
                        "promote after a registration whose gates passed.")
    _mlflow(spec)
    out = promote(r["name"], r["version"], p.alias, approved=approved, require_approval=p.require_approval,
                  better_on=p.better_on or None, by=f"{spec.name} run {run_id}")
    write_json_atomic(_tdir(spec, run_id, target) / "promote.json", out)
    return {"target": target, **out}


@claimed("shared")
def stage_summary(spec: PipelineSpec, run_id: str, dag_id: str | None = None) -> dict:
    from qops.evaluate import degradation

    rdir = _rdir(spec, run_id)
    rows = []
    for target in spec.targets:
        tdir, (cdir, method, why) = _tdir(spec, run_id, target), candidate(spec, run_id, target)
        row: dict = {"target": target, "method": method}
        if method == "qat" or spec.qat and target in spec.qat.targets:
            row["method_reason"] = why
            if (tdir / "gate.json").is_file():
                row["ptq_gate"] = "passed" if read_json(tdir / "gate.json")["passed"] else "failed"
        if not (cdir / "gate.json").is_file() and method == "qat":
            row["qat_error"] = "QAT did not finish (see the qat task's log)"
        tdir = cdir
        if (tdir / "evaluation.json").is_file():
            ev = read_json(tdir / "evaluation.json")
            m = ev["primary_metric"]
            worst = max(
                ((s["key"], s["metrics"][m]) for s in ev["slices"]
                 if s["n"] >= spec.gates.min_slice_size and s["metrics"][m]["delta"] is not None),
                key=lambda kv: degradation(m, kv[1]["fp32"], kv[1]["quantized"]), default=(None, None),
            )
            perf = ev["performance"]
            row.update({
                "size_bytes": perf["size_bytes"]["quantized"], "fp32_size_bytes": perf["size_bytes"]["fp32"],
                "latency_p50_ms": perf["latency_p50_ms"]["quantized"],
                "fp32_latency_p50_ms": perf["latency_p50_ms"]["fp32"],
                "metric": m, "metric_quantized": ev["overall"][m]["quantized"], "metric_fp32": ev["overall"][m]["fp32"],
                "worst_slice": worst[0], "worst_slice_delta": None if worst[1] is None else worst[1]["delta"],
                "on_target_hardware": ev["hardware_match"].get("matches"),
            })
        if (tdir / "gate.json").is_file():
            g = read_json(tdir / "gate.json")
            row["gate"] = "passed" if g["passed"] else "failed"
            row["failed_checks"] = g["failed"]
            row["inconclusive_checks"] = g.get("inconclusive") or []
            row["unprotected_slices"] = [u["slice"] for u in g.get("unprotected") or []]
        else:
            row["gate"] = "not run"
        tdir = _tdir(spec, run_id, target)
        if (tdir / "register.json").is_file():
            r = read_json(tdir / "register.json")
            row["mlflow"] = {"name": r["name"], "version": r["version"], "aliases": r["aliases"],
                             "registered": r["registered"]}
        if (tdir / "card.json").is_file():
            c = read_json(tdir / "card.json")
            row["card"] = {"markdown": c["markdown_path"], "json": c["json_path"], "html": c["html_path"]}
        rows.append(row)
    summary = {"pipeline": spec.name, "run_id": run_id, "dag_id": dag_id, "qops_version": __version__,
               "source_model": spec.source_model, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "targets": rows, "run_dir": str(rdir)}
    write_json_atomic(rdir / "summary.json", summary)
    write_json_atomic(Path(spec.artifact_root) / spec.name / "latest_summary.json", {"summary": str(rdir / "summary.json")})
    return summary


def format_summary(summary: dict) -> str:
    head = (f"{'target':<27}{'size MB':>8}{'smaller':>8}{'p50 ms':>8}{'faster':>7}  {'metric q / fp32':<16}"
            f"{'worst slice (delta)':<30}{'gate':<7}MLflow name v[aliases]")
    lines = [f"qops run {summary['run_id']} of pipeline {summary['pipeline']} (source {summary['source_model']})",
             head, "-" * (len(head) + 30)]
    cards = []
    for r in summary["targets"]:
        if "size_bytes" not in r:
            lines.append(f"{r['target']:<27}{'(not evaluated)':<46}{r['gate']}")
            continue
        ws = f"{r['worst_slice']} ({r['worst_slice_delta']:+.4f}) " if r.get("worst_slice") else "n/a "
        ml = r.get("mlflow") or {}
        mls = (f"{ml['name']} v{ml['version']} [{','.join(ml['aliases'])}]" if ml.get("registered")
               else "not registered")
        name = r["target"] + (" (QAT)" if r.get("method") == "qat" else "")
        lines.append(
            f"{name:<27}{r['size_bytes'] / 1e6:>8.3f}{r['fp32_size_bytes'] / r['size_bytes']:>7.2f}x"
            f"{r['latency_p50_ms']:>8.4f}{r['fp32_latency_p50_ms'] / r['latency_p50_ms']:>6.2f}x  "
            f"{r['metric_quantized']:.4f} / {r['metric_fp32']:.4f} {ws:<30}{r['gate']:<7}{mls}"
        )
        if r.get("card"):
            cards.append(f"  {r['target']:<27}{r['card']['markdown']}")
    first = summary["targets"][0] if summary["targets"] else {}
    if "fp32_size_bytes" in first:
        lines.append(f"{'FP32 source':<27}{first['fp32_size_bytes'] / 1e6:>8.3f}{'':>8}"
                     f"{first['fp32_latency_p50_ms']:>8.4f}")
    if cards:
        lines += ["", "model cards (Markdown; card.html, card.json and card_chart.png beside each):", *cards]
    return "\n".join(lines)


def run_pipeline(spec: PipelineSpec, run_id: str | None = None, progress: bool = True) -> dict:
    """Run every stage for every target, in order, without Airflow. Gate failures do not stop other targets."""
    from tqdm import tqdm

    run_id = run_id or new_run_id()
    steps = [("source", None)] + ([("finetune", None)] if spec.qlora else []) + [("calibrate", None)] + [
        (s, t) for t in spec.targets for s in ("quantize", "evaluate", "gate", "qat", "card", "register")]
    funcs = {"source": stage_source, "finetune": stage_finetune, "calibrate": stage_calibrate, "quantize": stage_quantize,
             "evaluate": stage_evaluate, "gate": stage_gate, "qat": stage_qat, "card": stage_card,
             "register": stage_register}
    with claim(_rdir(spec, run_id), spec.digest(), spec.name, run_id, scope="run"):  # one run per folder
        bar = tqdm(steps, disable=not progress, unit="step")
        for stage, target in bar:
            bar.set_description(f"{stage}{' ' + target if target else ''}")
            t0 = time.perf_counter()
            funcs[stage](spec, run_id) if target is None else funcs[stage](spec, run_id, target)
            log.info("%s %s done in %.1fs", stage, target or "", time.perf_counter() - t0)
        return stage_summary(spec, run_id)
