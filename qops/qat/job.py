"""The QAT job of one target: the trainable FP32 program (checked against the ONNX model it was exported from),
training on the given rows (:mod:`qops.qat.train`), and the deployment artifact in the target's format
(:mod:`qops.qat.export`); which engine and scheme serve a target is :mod:`qops.qat.plan`. :func:`qat_files` is
``qops qat``: the same job outside a pipeline, with the FP32/PTQ/QAT report on held-out rows."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from qops.artifacts import sha256_file, to_jsonable, write_json_atomic
from qops.data import data_kind, onnx_io, read_table
from qops.errors import QopsError
from qops.evaluate import output_fidelity, run_model
from qops.programs import load_program, program_inputs
from qops.qat import export as qat_export
from qops.qat.config import DEFAULT_LENGTH, QatConfig
from qops.qat.plan import QatPlan, config_for, plan_for, require_cuda_for
from qops.qat.qdq import qdq_qat
from qops.qat.train import convert, holdout_split, train_qat
from qops.quantize import QuantizeResult, quantize
from qops.quantize.graph import check_model, choose_mode
from qops.quantize.torch_engine import linear_modules
from qops.registry import fetch_source_model
from qops.runtime import open_session
from qops.spec import QatSpec, QatTargetSpec
from qops.targets import get_target

log = logging.getLogger(__name__)
DEFAULT_STEPS = 100  # `qops qat` without --steps or --epochs (engine qdq: its DEFAULT_LENGTH)


def _program_feeds(ep, onnx_inputs, feeds: dict[str, np.ndarray]) -> list[str]:
    """Order of the program's inputs as names of ``feeds``: by name, or the one input of a tabular model."""
    prog = [n for n, _, _ in program_inputs(ep)]
    if len(prog) == 1 and len(feeds) == 1:
        return list(feeds)
    missing = [n for n in prog if n not in feeds]
    if missing:
        raise QopsError(f"The torch program takes inputs {prog}; the ONNX model's feeds are {list(feeds)}.",
                        "give qat.program the program the ONNX model was exported from (same input names).")
    return prog


def check_program_matches(module, onnx_path: str, feeds: dict[str, np.ndarray], order: list[str],
                          tolerance: float = 1e-3) -> float:
    """Run the FP32 torch program and the FP32 ONNX model on the same rows; a program that computes something
    else (another model version) is refused. Returns the largest difference relative to the output scale."""
    import torch

    rows = len(next(iter(feeds.values())))
    with torch.no_grad():
        try:
            out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in order])
        except Exception as e:  # a program exported with a fixed batch size refuses any other (a shape guard)
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise QopsError(
                f"The torch program does not run on a batch of {rows} rows: {first}. QAT trains on batches, so the "
                ".pt2 needs a dynamic batch dimension (a program exported from a batch-1 example is fixed to 1).",
                "export it again with a dynamic batch: torch.export.export(model, (x,), dynamic_shapes="
                "{'x': {0: torch.export.Dim('batch')}}) (x: the forward's argument name), then "
                "torch.export.save(ep, 'model.pt2').") from None
    ref = open_session(onnx_path).run(None, feeds)[0]
    out = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    if out.shape != ref.shape:
        raise QopsError(f"The torch program's first output has shape {out.shape}, the ONNX model's {ref.shape}.",
                        "give qat.program the program the ONNX source model was exported from.")
    diff = float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-6))
    if diff > tolerance:
        raise QopsError(f"The torch program and the ONNX source model disagree (largest difference {diff:.2e} of "
                        "the output scale): they are not the same model.",
                        "give qat.program the .pt2 exported from the same model version as the ONNX source.")
    return diff


def _head(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in feeds.items()}


def trainable_module(ep, plan: QatPlan, what: str = "the program"):
    """The FP32 program as the module QAT trains for ``plan``, and (torchao) its linear weights before training.

    torchao: ``aten.linear`` calls become ``nn.Linear`` modules (what ``quantize_`` swaps). For MatMulNBits output
    only the linear weights train: they become MatMulNBits nodes, and everything else in the ONNX graph
    (biases, norms, embeddings) stays the FP32 model's, so the torch and ONNX models remain the same model."""
    import torch

    module = ep.module()
    if plan.engine != "torchao":
        return module, None
    if linear_modules(module) == 0:
        raise QopsError(f"{what} has no linear layers for torchao's QAT.",
                        "torchao QAT fake-quantizes Linear layers; use a target with engine pt2e (INT8).")
    fp32_weights = {n: m.weight.detach().clone() for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    if plan.output == "onnx_matmulnbits":
        weights = {f"{n}.weight" for n in fp32_weights}
        for name, p in module.named_parameters():
            p.requires_grad_(name in weights)
    return module, fp32_weights


def _train_program(source_onnx, program, recipe, plan, cfg, train_feeds, labels, out_dir: Path, work_dir: Path):
    """PT2E or torchao QAT of ``program``: (artifact path, training record, export detail, notes, the program's
    largest difference to the ONNX model)."""
    ep, meta = load_program(program)
    order = _program_feeds(ep, onnx_io(source_onnx)[0], train_feeds)
    diff = check_program_matches(ep.module(), source_onnx, _head(train_feeds, 64), order)
    module, fp32_weights = trainable_module(ep, plan, Path(program).name)
    teacher = load_program(program)[0].module() if cfg.loss == "distill" else None
    data = {k: train_feeds[k] for k in order}
    trained, res = train_qat(module, data, cfg, work_dir, labels=labels, teacher=teacher)
    quantized = convert(trained, cfg)
    examples = {k: v[:2] for k, v in data.items()}
    notes = [f"QAT ({plan.engine} {plan.scheme}) trained {res.steps} steps on {res.rows} rows"
             + (f", resumed at step {res.resumed_from}" if res.resumed_from else "")
             + (f"; stopped by the time budget ({cfg.time_budget_s:.0f} s) before step {res.planned_steps}"
                if res.stopped_by_budget else "")]
    if plan.output == "onnx_qdq":
        path = qat_export.pt2e_to_onnx(quantized, examples, source_onnx, out_dir / "model.onnx")
        detail = {}
    elif plan.output == "onnx_matmulnbits":
        path, detail = qat_export.torchao_int4_to_matmulnbits(quantized, fp32_weights, source_onnx,
                                                              out_dir / "model.onnx", plan.group_size,
                                                              recipe.accuracy_level)
        notes.append(f"MatMulNBits written from torchao's integers for {detail['layers']} layers "
                     f"(largest difference to torchao's dequantized weight {detail['max_abs_diff']:.2e})")
        if "Gather" in recipe.op_types:  # embedding tables as the PTQ recipe stores them (they did not train)
            path = qat_export.quantize_embeddings(path, recipe)
            notes.append(f"embedding tables (Gather): INT4 blocks of {recipe.block_size} (RTN, as the PTQ recipe; "
                         "they are not trained)")
    else:
        path = qat_export.save_program_any(quantized, examples, dict(meta, **{"qops.torch_compile": False}),
                                           out_dir / "model.pt2")
        detail = {}
    return path, res, detail, notes, diff


def run_qat(*, source_onnx: str, program: str | None, recipe, plan: QatPlan, cfg: QatConfig, train_feeds: dict,
            labels: np.ndarray | None, out_dir: str | os.PathLike, work_dir: str | os.PathLike,
            ptq_model: str | None = None, ptq_recipe: dict | None = None) -> dict:
    """Train with QAT per ``plan`` and write the target's artifact into ``out_dir``: engine ``qdq`` fine-tunes
    ``ptq_model`` (the target's static QDQ PTQ model, :mod:`qops.qat.qdq`); the others train ``program`` (the FP32
    ``.pt2``; ``ptq_recipe``: the recipe the PTQ model was made with, e.g. as tuned, which the qdq model keeps).
    Returns the quantize-stage record (model path, sha256, sizes, recipe, notes) plus ``qat``: the
    training record (config, losses, steps, resume point, seconds)."""
    t0 = time.perf_counter()
    require_cuda_for(plan)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    if plan.engine == "qdq":
        if not ptq_model:
            raise QopsError(f"QAT engine qdq fine-tunes the PTQ model of {recipe.target!r}, and none was given.",
                            "quantize the target first (the quantize stage, or qops quantize), or choose engine pt2e.")
        path, res, detail = qdq_qat(ptq_model=ptq_model, source_onnx=source_onnx, cfg=cfg, train_feeds=train_feeds,
                                    labels=labels, out_path=out_dir / "model.onnx")
        diff = None
        moved = detail["learned_ranges"]
        notes = [f"QAT (qdq int8_static) fine-tuned the PTQ model ({Path(ptq_model).name}) {res.steps} steps on "
                 f"{res.rows} rows; kept step {res.best_step} ({detail['stopped']}); held-out agreement "
                 f"{detail['held_out_before']['agreement']:.3f} -> {detail['held_out_after']['agreement']:.3f}, "
                 f"cosine {detail['held_out_before']['cosine']:.4f} -> {detail['held_out_after']['cosine']:.4f}; "
                 f"{moved['activation_scales']} activation and {moved['weight_channels']} weight-channel scales "
                 f"learned (largest change {100 * max(moved['activation_max_rel_change'], moved['weight_max_rel_change']):.1f}%)"]
    else:
        if not program:
            raise QopsError(f"QAT engine {plan.engine} trains the model's PyTorch program (.pt2), and none was given.",
                            "give the .pt2 the ONNX model was exported from (qat.program, qops qat --model), or use "
                            "engine qdq for a static INT8 ONNX target.")
        path, res, detail, notes, diff = _train_program(source_onnx, program, recipe, plan, cfg, train_feeds, labels,
                                                        out_dir, work_dir)
    src_size = Path(source_onnx if plan.output != "pt2" else program).stat().st_size
    size = path.stat().st_size
    rec = dict(ptq_recipe) if plan.engine == "qdq" and ptq_recipe else recipe.to_dict()
    mode = {"int8_static": "static", "int8_dynamic": "dynamic"}.get(plan.scheme, recipe.mode)
    facts = {}  # what the exported model is, where QAT's scheme differs from the PTQ recipe's options (the card reads it)
    if plan.engine == "qdq":
        facts["calibration_method"] = (f"{rec.get('calibration_method', 'minmax')} on the calibration rows (the PTQ "
                                       "model's), then learned during QAT (LSQ step sizes)")
    elif plan.engine == "pt2e":  # X86InductorQuantizer: int8 symmetric per-channel weights, uint8 activations
        scheme = dict(mode=mode, per_channel=True, symmetric_weights=True, weight_type="int8",
                      activation_type="uint8", nodes_to_exclude=[])
        rec.update({k: v for k, v in scheme.items() if recipe.has_option(k)}, granularity="per-channel")
        facts["calibration_method"] = "ranges observed during QAT (moving-average min/max over the training batches)"
    elif plan.output == "onnx_matmulnbits":
        rec.update(block_size=plan.group_size, granularity=f"block-wise ({plan.group_size})")
    rec["qat"] = {"engine": plan.engine, "scheme": plan.scheme, "output": plan.output, "card_facts": facts}
    src = source_onnx if plan.output != "pt2" else program
    out = to_jsonable(QuantizeResult(
        target=recipe.target, model_path=str(path), model_sha256=sha256_file(path), recipe_path="",
        source_path=str(src), source_sha256=sha256_file(src), size_bytes=size, source_size_bytes=src_size,
        size_ratio=round(size / src_size, 4), calibration_path=None, calibration_rows=0,
        seconds=round(time.perf_counter() - t0, 2), recipe=rec, mode=mode, engine=recipe.engine, notes=notes,
        qat={"plan": asdict(plan), "training": asdict(res), "program": str(program) if program else None,
             "program_onnx_max_rel_diff": diff, "export": detail}))
    write_json_atomic(out_dir / "qat_result.json", out)
    return out


def resolve_mode(recipe, onnx_path, ptq_mode: str | None = None) -> str:
    """The INT8 mode QAT matches: the PTQ model's (the pipeline: as quantize/tuning decided), else an ``auto``
    recipe's choice for the graph (``qops qat``), else the recipe's own."""
    if ptq_mode:
        return ptq_mode
    return choose_mode(check_model(str(onnx_path)).kind) if recipe.mode == "auto" else recipe.mode


def task_labels(df, label: str | None, where: str, fix: str):
    """The class indices the task loss trains on, from ``df[label]``; errors name the column and ``fix``."""
    if not label or label not in df.columns:
        raise QopsError(f"The QAT training set {where} has no label column {label!r}.", fix)
    labels = df[label].to_numpy()
    if labels.dtype.kind not in "iub":
        raise QopsError(f"QAT label column {label!r} holds {labels.dtype} values; the task loss is cross-entropy "
                        "over class indices 0..C-1.", "encode the classes as integers, or train label-free by "
                        "distillation.")
    return labels


def qat_files(*, program: str | os.PathLike, target: str, train: str | os.PathLike, out_dir: str | os.PathLike,
              work_dir: str | os.PathLike | None = None, label: str | None = None, distill: bool = False,
              features=None, onnx: str | os.PathLike | None = None, target_options: dict | None = None,
              engine: str | None = None, scheme: str | None = None, compare: bool = True, **training) -> dict:
    """QAT outside a pipeline (``qops qat``): train ``program`` for ``target`` on the rows of ``train`` and write
    the target's artifact into ``out_dir``. ``onnx``: the ONNX model the program was exported to (default:
    exported here); ``features``: tabular columns or a data kind; ``training``: :class:`~qops.qat.QatConfig`
    fields (steps or epochs, lr, batch_size, ...). A second call with the same ``work_dir`` resumes. ``compare``:
    also quantize with the target's PTQ recipe on the training rows and report FP32/PTQ/QAT fidelity on the rows
    QAT held out (``comparison`` in the result; :func:`compare_on_holdout`)."""
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir else out_dir / "work"
    suffix = Path(program).suffix.lower()
    if suffix not in (".pt2", ".onnx") or not Path(program).is_file():
        raise QopsError(f"QAT trains an FP32 .pt2 program or fine-tunes an ONNX model's PTQ graph; {program} is not an "
                        "existing .pt2 or .onnx file.",
                        "export the FP32 model with torch.export (qops' retraining examples write one) or to ONNX.")
    if suffix == ".onnx":
        onnx, program = str(program), None
    else:
        onnx = str(onnx) if onnx else fetch_source_model(str(program), out_dir / "fp32").path
    recipe = get_target(target, target_options)
    plan = plan_for(recipe, engine=engine, scheme=scheme, mode=resolve_mode(recipe, onnx))
    training = {k: v for k, v in training.items() if v is not None}
    if "steps" not in training and "epochs" not in training:
        training["steps"] = DEFAULT_LENGTH.get(plan.engine, {}).get("steps", DEFAULT_STEPS)
    try:
        qat = QatSpec(targets={target: QatTargetSpec(when="always", engine=engine, scheme=scheme)},
                      loss="distill" if distill else "task", label=label, **training)
    except ValidationError as e:
        raise QopsError("Invalid QAT settings: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                                             for err in e.errors()),
                        "see `qops qat --help` for each option's range.") from None
    df = read_table(train, "QAT training set")
    inputs, _ = onnx_io(onnx)
    kind = data_kind(onnx, features, df)
    feeds = kind.feeds(df, inputs, "QAT training set")
    labels = None if distill else task_labels(df, label, train, "give the label column (--label), or train by "
                                              "distillation from the FP32 model (--distill, label-free).")
    cfg = config_for(qat, target, plan, has_label=labels is not None)
    ptq, train_feeds, train_labels = None, feeds, labels
    train_rows, _ = holdout_split(len(df), cfg.holdout, cfg.seed)
    if plan.engine == "qdq":  # the PTQ model it starts from, calibrated on the rows the report does not hold out
        ptq = ptq_on_rows(onnx, recipe, train, df, train_rows, out_dir / "ptq" / "model.onnx", features)
        train_feeds = {k: v[train_rows] for k, v in feeds.items()}
        train_labels = labels[train_rows] if labels is not None else None
    res = run_qat(source_onnx=onnx, program=str(program) if program else None, recipe=recipe, plan=plan, cfg=cfg,
                  train_feeds=train_feeds, labels=train_labels, out_dir=out_dir, work_dir=work_dir,
                  ptq_model=ptq.model_path if ptq else None, ptq_recipe=ptq.recipe if ptq else None)
    if compare:
        src = onnx if plan.output != "pt2" else str(program)
        res["comparison"] = compare_on_holdout(source=src, qat_model=res["model_path"], train=train, df=df,
                                               feeds=feeds, cfg=cfg, recipe=recipe, features=features,
                                               out_dir=out_dir, labels=labels, options=target_options, ptq=ptq)
        write_json_atomic(out_dir / "qat_result.json", res)
    return res


def ptq_on_rows(source: str, recipe, train, df, rows: np.ndarray, dest: Path, features) -> QuantizeResult:
    """The target's PTQ model at ``dest``, calibrated on ``rows`` of the training file (what QAT is compared with
    and, for engine qdq, starts from)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    calib = _subset_file(train, df, rows, dest.parent / "calibration")
    log.info("PTQ of %s on %d training rows", recipe.target, len(rows))
    return quantize(source, recipe, dest, calibration=calib, features=features)


def _subset_file(train: str | os.PathLike, df, rows: np.ndarray, dest: Path) -> Path:
    """The training file's ``rows`` in its own format (``.npz`` arrays stay arrays), for PTQ's calibration."""
    if Path(train).suffix.lower() == ".npz":
        with np.load(train, allow_pickle=False) as z:
            arrays = {k: z[k][rows] for k in z.files}
        out = dest.with_suffix(".npz")
        np.savez(out, **arrays)
        return out
    out = dest.with_suffix(".parquet")
    df.iloc[rows].to_parquet(out)
    return out


def compare_on_holdout(*, source: str, qat_model: str, train, df, feeds: dict, cfg: QatConfig, recipe, features,
                       out_dir: Path, labels: np.ndarray | None = None, options: dict | None = None,
                       ptq: QuantizeResult | None = None) -> dict:
    """FP32 vs PTQ vs QAT on the rows QAT held out (never trained on, never calibrated on): the target's PTQ recipe
    calibrated on the training rows (or ``ptq``, already made so), then each model's output fidelity to FP32 (and accuracy where labels are
    known). Returns ``{"rows": n, "fp32": {...}, "ptq": {...}, "qat": {...}, "ptq_model": path}``."""
    train_rows, held = holdout_split(len(df), cfg.holdout, cfg.seed)
    if not len(held):
        return {"rows": 0, "note": "no held-out rows (holdout 0): nothing to compare on"}
    if ptq is None:
        ptq = ptq_on_rows(source, recipe, train, df, train_rows, out_dir / "ptq" / Path(qat_model).name, features)
    log.info("QAT report: FP32/PTQ/QAT on %d held-out rows", len(held))
    feed = {k: v[held] for k, v in feeds.items()}
    ref = run_model(source, feed, recipe.to_dict())
    out: dict = {"rows": int(len(held)), "ptq_model": str(ptq.model_path)}
    y = labels[held] if labels is not None else None
    for name, path in (("fp32", source), ("ptq", ptq.model_path), ("qat", qat_model)):
        got = ref if name == "fp32" else run_model(path, feed, recipe.to_dict())
        out[name] = output_fidelity("classification" if got.shape[1] > 1 else "regression", ref, got)
        if y is not None and got.shape[1] > 1:
            out[name]["accuracy"] = round(float((got.argmax(1) == y).mean()), 6)
    return out
