"""ONNX-graph models fed by input name: tabular, tensors, text and image data (:mod:`qops.data.kinds`). Quantized
by ONNX Runtime (or torchao for ``torch_*`` targets), optionally tuned, evaluated by :func:`qops.evaluate.evaluate`,
trained further by QAT (:mod:`qops.qat`)."""

from __future__ import annotations

import logging
from pathlib import Path

from qops.artifacts import read_json, to_jsonable, write_json_atomic
from qops.data import Tabular, feature_matrix, kind_from_spec, onnx_io, read_table
from qops.errors import QopsError
from qops.evaluate import evaluate_with_gates
from qops.gates import gate_judge
from qops.modality.base import registry_for, unsupported
from qops.qat.job import resolve_mode, run_qat, task_labels
from qops.qat.plan import config_for, plan_for
from qops.quantize import quantize
from qops.quantize.tune import tune
from qops.registry import fetch_source_model
from qops.run_folder import ModelFolder, RunLayout

log = logging.getLogger(__name__)


def features(spec, source: dict, graph_io=None):
    """Tabular: the feature column list; other kinds: the :class:`~qops.data.DataKind` built from the spec.
    ``graph_io``: the source graph's ``onnx_io`` when the caller already read it."""
    inputs, meta = graph_io or onnx_io(source["path"])
    kind = kind_from_spec(spec.data, inputs, meta)
    return kind.features if isinstance(kind, Tabular) else kind


def label(spec) -> str | None:
    return None if spec.gates.task == "embedding" else spec.data.label


def source_for(recipe, source: dict) -> str:
    """The FP32 model a target quantizes: the ONNX export, or the torch.export program for torchao targets."""
    if recipe.engine != "torchao":
        return source["path"]
    if not source.get("pt2_path"):
        raise QopsError(
            f"Target {recipe.target!r} quantizes PyTorch programs, but the source model {source['uri']} is "
            f"{source['flavor']}-flavored (no torch.export program).",
            "log the FP32 model with mlflow.pytorch.log_model(..., serialization_format='pt2') or set source_model "
            "to a .pt2 file; or drop the torch_* targets from this spec.")
    return source["pt2_path"]


def torch_program(spec, source: dict) -> str:
    program = spec.qat.program or source.get("pt2_path")
    if not program or not Path(program).is_file():
        raise QopsError(
            f"QAT trains a PyTorch program, and the source model {source['uri']} has none "
            f"({'not found: ' + str(program) if program else source['flavor'] + '-flavored'}).",
            "log the FP32 model with mlflow.pytorch.log_model(..., serialization_format='pt2'), tag its model version "
            "qops.torch_program with the artifact URI of its .pt2 program (the retraining examples do), or set "
            "qat.program to the .pt2 file the ONNX model was exported from.")
    return program


class GraphModality:
    name = "graph"

    def source(self, spec, layout: RunLayout, uri: str) -> dict:
        registry_for(spec, uri)
        out = to_jsonable(fetch_source_model(uri, layout.root))
        write_json_atomic(layout.source, out)
        return out

    def finetune(self, spec, layout: RunLayout) -> dict:
        unsupported("ONNX-graph", "QLoRA fine-tuning", "set data.kind: causal_lm, or remove the qlora block.")

    def calibration_kind(self, spec, source: dict):
        graph_io = onnx_io(source["path"])  # read the graph once for the kind and the inputs its feeds must fit
        return features(spec, source, graph_io), graph_io[0]

    def quantize(self, spec, layout: RunLayout, target: str, calibration: dict | None):
        source = read_json(layout.source)
        recipe = spec.recipe(target)
        src = source_for(recipe, source)
        cal = None
        if calibration is not None:
            # ONNX engines read the materialised feeds (named arrays, as checked against the graph); torch the table
            cal = calibration.get("feeds_path") if recipe.engine != "torchao" and calibration.get("feeds_path") \
                else calibration["path"]
        feats = features(spec, source)
        out_path = layout.target(target).model(recipe.output_suffix)
        t = spec.tuning
        if t.enabled and (t.targets is None or target in t.targets):
            log.info("tuning %s: up to %d trials / %.0f s", target, t.max_trials, t.timeout_s)
            judge = gate_judge(src, spec.data.validation, label(spec), spec.gates,
                               slice_columns=spec.data.slice_columns, features=feats,
                               intersections=spec.data.intersections, latency_runs=t.latency_runs,
                               bootstrap=t.bootstrap)
            return tune(src, recipe, out_path, judge, calibration=cal, features=feats, config=t,
                        ranking_data=cal or spec.data.validation, validation=spec.data.validation)
        return quantize(src, recipe, out_path, calibration=cal, features=feats)

    def evaluate(self, spec, layout: RunLayout, folder: ModelFolder, quantized: dict) -> dict:
        source = read_json(layout.source)
        d = spec.data
        res = evaluate_with_gates(quantized["source_path"], quantized["model_path"], d.validation, spec.gates,
                                  label=label(spec), slice_columns=d.slice_columns, intersections=d.intersections,
                                  features=features(spec, source), target=quantized["recipe"])
        return to_jsonable(res)

    def training_table(self, spec, source: dict):
        """The QAT training split as a table, the data kind, and labels (None for distillation)."""
        q = spec.qat
        path = q.data or spec.data.reference
        df = read_table(path, "QAT training set")
        if q.max_rows and len(df) > q.max_rows:
            df = df.sample(q.max_rows, random_state=q.seed).sort_index()
        kind = features(spec, source)
        kind = Tabular(kind) if isinstance(kind, list) else kind
        lab = q.label or spec.data.label
        labels = None
        if q.resolved_loss(has_label=bool(lab)) == "task":
            labels = task_labels(df, lab, path, "set qat.label (or data.label) to the training split's label "
                                 "column of class indices, or qat.loss: distill (label-free).")
        return df, kind, labels, path

    def qat(self, spec, layout: RunLayout, target: str, folder: ModelFolder, why: str) -> dict:
        source = read_json(layout.source)
        ptq = read_json(layout.target(target).quantize)
        recipe = spec.recipe(target)
        t = spec.qat.targets[target]
        plan = plan_for(recipe, engine=t.engine, scheme=t.scheme, mode=resolve_mode(recipe, source["path"], ptq.get("mode")))
        df, kind, labels, path = self.training_table(spec, source)
        feeds = kind.feeds(df, onnx_io(source["path"])[0], "QAT training set")
        cfg = config_for(spec.qat, target, plan, has_label=labels is not None)
        log.info("QAT for %s (%s): %s %s on %d rows of %s", target, why, plan.engine, plan.scheme, len(df), path)
        program = None if plan.engine == "qdq" else torch_program(spec, source)
        res = run_qat(source_onnx=source["path"], program=program, recipe=recipe, plan=plan, cfg=cfg,
                      train_feeds=feeds, labels=labels, out_dir=folder.path, work_dir=folder.work,
                      ptq_model=ptq["model_path"], ptq_recipe=ptq.get("recipe"))
        res["qat"]["why"], res["qat"]["data"] = why, path
        return res

    def register_extras(self, spec, layout: RunLayout, source: dict, quantized: dict) -> tuple[dict | None, list[str]]:
        """The feed of two real rows — of the run's calibration table, else of the validation set — for the
        signature and input example (never a made-up input)."""
        cal = layout.calibration_files.table
        table = cal if cal.is_file() else Path(spec.data.validation)
        df = read_table(table, "input example").head(2)
        return feature_matrix(df, source["path"], features(spec, source), "input example"), []

    def serves(self, spec):
        return None  # the register stage's own load (signature from a real run of the graph) is the check
