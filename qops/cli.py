"""`qops` command line. Subcommands mirror the Airflow operators one to one."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from qops.artifacts import to_jsonable
from qops.errors import GateFailed, QopsError
from qops.metric_names import known_metrics


def _csv(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t] if text else None


def _emit(args, result, human: str | None = None) -> None:
    if args.json:
        print(json.dumps(to_jsonable(result), indent=2, sort_keys=True))
    else:
        print(human if human is not None else json.dumps(to_jsonable(result), indent=2, sort_keys=True))


def cmd_targets(args) -> int:
    from qops.targets import list_targets

    targets = list_targets()
    if args.json:
        _emit(args, {n: r.to_dict() for n, r in targets.items()})
        return 0
    print(f"{'target':<22} {'precision':<9} {'mode':<11} {'engine':<11} {'granularity':<17} {'queue':<5} "
          f"{'runtime / EP':<38} hardware")
    for name, r in targets.items():
        print(f"{name:<22} {r.precision:<9} {r.mode:<11} {r.engine:<11} {r.granularity:<17} {r.queue:<5} "
              f"{r.runtime + ' / ' + r.execution_provider:<38} {r.hardware}")
    return 0


def calibration_section(args):
    """The spec's ``calibration`` section from ``qops calibrate``'s flags (unset flags: the section's defaults)."""
    from qops.spec import CalibrationSpec, DiversitySpec, DriftSpec, RecencySpec

    def given(**kw):
        return {k: v for k, v in kw.items() if v is not None}

    drift = DriftSpec(**given(enabled=False if args.no_drift_check else None, on_drift=args.on_drift,
                              max_reselect=args.max_reselect))
    return CalibrationSpec(**given(
        size=args.size, strategy=args.strategy, seed=args.seed, min_per_slice=args.min_per_slice,
        on_small_slice=args.on_small_slice, drift=drift,
        recency=RecencySpec(column=args.recency_column, window_days=args.recency_days) if args.recency_column
        else None,
        diversity=DiversitySpec(**given(embedding_column=args.embedding_column)) if args.strategy == "diversity"
        else None))


def cmd_calibrate(args) -> int:
    from qops.calibration import S3Options, select_calibration
    from qops.data import onnx_io

    features = _data_kind(args) or _csv(args.features) or _model_kind(args.model, args.pool)
    res = select_calibration(calibration_section(args), pool=args.pool, reference=args.reference,
                             output_dir=args.output_dir, features=features, slice_columns=_csv(args.slice_columns),
                             validation=args.validation, model_inputs=onnx_io(args.model)[0] if args.model else None,
                             s3=S3Options(args.s3_endpoint_url))
    feeds = f"; feeds by input name: {res.feeds_path}" if res.feeds_path else ""
    _emit(args, res, f"calibration set: {res.path} ({res.rows} rows, sha256 {res.sha256}){feeds}; "
                     f"drift {'passed' if res.drift_passed else 'DRIFT in ' + ', '.join(res.drifted_columns)}")
    return 0


def _kind_args(sp) -> None:
    sp.add_argument("--tokenizer", help="text data: a local tokenizer directory (never downloaded)")
    sp.add_argument("--text-column", help="text data: the text column (two, comma-separated, for pairs)")
    sp.add_argument("--max-length", type=int, default=128, help="text data: tokens per row after truncation")
    sp.add_argument("--data-kind", choices=["image"], help="image: the tables hold image paths (the spec's "
                    "data.kind image); their preprocessing is set with the --image-* options")
    sp.add_argument("--path-column", default="path", help="image data: the column of image paths")
    sp.add_argument("--image-root", help="image data: folder relative paths are read from (default: as given)")
    sp.add_argument("--resize", type=int, default=256, help="image data: shorter side resized to this (0: off)")
    sp.add_argument("--crop", type=int, default=224, help="image data: centre crop size (0: off)")
    sp.add_argument("--mean", default="0.485,0.456,0.406", help="image data: per-channel mean on the 0..1 scale")
    sp.add_argument("--std", default="0.229,0.224,0.225", help="image data: per-channel std on the 0..1 scale")
    sp.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="image data: tensor layout")


def _options(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` recipe overrides; values parsed as YAML (numbers, booleans, lists)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QopsError(f"--option {pair!r} is not KEY=VALUE.", "e.g. --option calibration_method=percentile")
        if len(value) > 4096:
            raise QopsError(f"--option {key.strip()} has a {len(value)}-character value.",
                            "recipe options are short scalars or lists (e.g. --option block_size=32).")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError, ValueError) as e:
            raise QopsError(f"--option {key.strip()}'s value is not a YAML scalar or list "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}).",
                            "give a number, a boolean, a word or a short list, e.g. --option "
                            "nodes_to_exclude='[fc1, fc2]'.") from None
    return out


_THRESHOLD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


def parse_threshold(text: str) -> dict:
    """``metric>=value`` (a lower bound on the quantized model's value) or ``metric<=value`` (an upper bound)."""
    m = _THRESHOLD.match(text or "")
    if not m:
        raise QopsError(f"--threshold {text!r} is not METRIC>=VALUE or METRIC<=VALUE.",
                        "e.g. --threshold 'cosine>=0.995' --threshold 'neighbor_agreement>=0.95'")
    metric, op, value = m.group(1), m.group(2), float(m.group(3))
    return {"metric": metric, "min_value" if op == ">=" else "max_value": value}


def _cli_gates(args):
    """The gates ``quantize --tune`` judges with: the spec's GateSpec from the command line."""
    from pydantic import ValidationError

    from qops.errors import SpecError
    from qops.spec import GateSpec

    thresholds = [parse_threshold(t) for t in args.threshold or []]
    named = {t["metric"] for t in thresholds}
    task = args.task or ("embedding" if not args.label and named & {"neighbor_agreement"} else "classification")
    fields = {"task": task, "thresholds": thresholds}
    if task != "embedding":
        fields["metric"] = "accuracy" if args.label else "agreement"
    if args.output_name:
        fields["output"] = args.output_name
    if args.embedding_output:
        fields["embedding_output"] = args.embedding_output
    try:
        return GateSpec(**fields)
    except ValidationError as e:
        raise SpecError("Invalid --threshold/--task: " + "; ".join(err["msg"].removeprefix("Value error, ")
                                                                   for err in e.errors()),
                        "name a known metric, e.g. --threshold 'cosine>=0.995'.") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise QopsError(f"{flag} {text!r} is not a comma-separated list of numbers.",
                        f"e.g. {flag} 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise QopsError(f"{flag} {text!r} has {len(values)} values, not one per RGB channel.",
                        f"e.g. {flag} 0.485,0.456,0.406")
    return values


def _data_kind(args):
    """The data kind the flags name: text (--tokenizer), image (--data-kind image); None otherwise (tabular or
    inferred from the data and the model)."""
    if getattr(args, "data_kind", None) == "image":
        from qops.data import Image

        return Image(path_column=args.path_column, root=args.image_root, resize=args.resize or None,
                     crop=args.crop or None, mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"),
                     layout=args.layout)
    if not getattr(args, "tokenizer", None):
        return None
    from qops.data import Text

    return Text(_csv(args.text_column) or ["text"], args.tokenizer, max_length=args.max_length)


def _model_kind(model, data):
    """The kind a bare model and data file imply (tensors for an .npz or input-named columns)."""
    if not model:
        raise QopsError("qops calibrate needs --features, --model or --tokenizer.", "pass one of them.")
    from qops.data import data_kind

    return data_kind(model, None, data)


def cmd_quantize(args) -> int:
    from qops.quantize import quantize
    from qops.quantize.api import resolve_recipe

    options = _options(args.option)
    if args.tune:
        from qops.gates import gate_judge
        from qops.quantize.tune import tune
        from qops.spec import TuningSpec

        if not args.validation:
            raise QopsError("--tune needs --validation (the rows the gates judge each candidate on).",
                            "pass --validation FILE [--label COLUMN] [--slice-columns a,b].")
        recipe = resolve_recipe(args.target, options)
        features = _data_kind(args) or _csv(args.features) or None  # None: from the data (.npz) or model metadata
        tcfg = TuningSpec(max_trials=args.max_trials, timeout_s=args.timeout)
        judge = gate_judge(args.model, args.validation, args.label, _cli_gates(args),
                           slice_columns=_csv(args.slice_columns), features=features,
                           latency_runs=tcfg.latency_runs, bootstrap=tcfg.bootstrap)
        res = tune(args.model, recipe, args.output, judge, calibration=args.calibration, features=features,
                   config=tcfg, ranking_data=args.calibration or args.validation,
                   validation=args.validation, failed_output=failed_name(args.output))
        if not args.json:
            for t in res.trials:
                print(f"  trial {t['trial']:>2} {t['phase']:<8} {t['config']:<52} {t['verdict']:<7} "
                      f"latency x{t['latency_ratio'] if t['latency_ratio'] is not None else '-'} "
                      f"cos {t['cosine'] if t['cosine'] is not None else '-'}{'  <- chosen' if t['chosen'] else ''}")
            print(f"  tuning stopped: {res.tuning['stopped']}")
            if res.tuning["node_ranking"]:
                print("  most sensitive nodes: " + ", ".join(
                    f"{r['node']} ({r['sqnr_lost_db']} dB lost on {r.get('worst_on', 'all rows')})"
                    for r in res.tuning["node_ranking"][:5]))
    else:
        res = quantize(args.model, args.target, args.output, calibration=args.calibration,
                       features=_data_kind(args) or _csv(args.features), options=options)
    verdict = "" if res.passed is None else (" — passed the gates" if res.passed else
                                              " — NO candidate passed the gates (exit 3)")
    _emit(args, res, f"{res.model_path}: {res.size_bytes} bytes ({1 / res.size_ratio:.2f}x smaller), mode {res.mode}, "
                     f"recipe {res.recipe_path}{verdict}" + "".join(f"\n  note: {n}" for n in res.notes))
    return 3 if res.passed is False else 0


def failed_name(output: str) -> str:
    """Where ``quantize --tune`` writes its most faithful candidate when none passes: ``q.onnx`` -> ``q.failed.onnx``."""
    from pathlib import Path

    p = Path(output)
    return str(p.with_name(f"{p.stem}.failed{p.suffix}"))


def cmd_qat(args) -> int:
    from qops.qat.job import qat_files

    res = qat_files(program=args.model, target=args.target, train=args.train, out_dir=args.output_dir,
                    work_dir=args.work_dir, label=args.label, distill=args.distill,
                    features=_data_kind(args) or _csv(args.features), onnx=args.onnx, engine=args.engine,
                    scheme=args.scheme, target_options=_options(args.option), group_size=args.group_size,
                    steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    optimizer=args.optimizer, weight_decay=args.weight_decay, seed=args.seed,
                    checkpoint_every=args.checkpoint_every, time_budget_s=args.time_budget_s, holdout=args.holdout,
                    patience=args.patience, freeze_after=args.freeze_after,
                    bn_freeze_after=args.bn_freeze_after, logit_mse=args.logit_mse,
                    compare=not args.no_compare)
    t = res["qat"]["training"]
    resumed = f", resumed from step {t['resumed_from']}" if t["resumed_from"] is not None else ""
    best = (f"; kept step {t['best_step']} (lowest loss on {t['holdout_rows']} held-out rows"
            + (", stopped early" if t["stopped_early"] else "") + ")") if t["best_step"] is not None else ""
    _emit(args, res, f"{res['model_path']}: QAT ({res['qat']['plan']['engine']} {res['qat']['plan']['scheme']}) "
                     f"{t['steps']} steps{resumed}, loss {t['losses'][0] if t['losses'] else 'n/a'} -> "
                     f"{t['losses'][-1] if t['losses'] else 'n/a'}{best}; {res['size_bytes']} bytes "
                     f"({1 / res['size_ratio']:.2f}x smaller)" + "".join(f"\n  note: {n}" for n in res["notes"])
                     + _comparison_table(res.get("comparison")))
    return 0


def _comparison_table(cmp: dict | None) -> str:
    """FP32/PTQ/QAT on the held-out rows, as lines under ``qops qat``'s summary."""
    if not cmp or not cmp.get("rows"):
        return f"\n  {cmp['note']}" if cmp else ""
    cols = [c for c in ("accuracy", "top1_agreement", "cosine_mean", "sqnr_db") if c in cmp["qat"]]
    lines = [f"\n  on {cmp['rows']} held-out rows (neither trained nor calibrated on):",
             "    " + f"{'model':<6}" + "".join(f"{c:>16}" for c in cols)]
    for name in ("fp32", "ptq", "qat"):
        lines.append("    " + f"{name.upper():<6}" + "".join(
            f"{'-' if cmp[name].get(c) is None else cmp[name][c]:>16}" for c in cols))
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from qops.artifacts import write_json_atomic
    from qops.evaluate import evaluate

    res = evaluate(args.fp32, args.quantized, args.validation, args.label, _csv(args.slice_columns),
                   features=_data_kind(args) or _csv(args.features), metric=args.metric,
                   latency_runs=args.latency_runs, task=args.task,
                   intersections=[c.split("&") for c in args.intersection or []], bootstrap=args.bootstrap,
                   min_slice_size=args.min_slice_size, outputs=args.outputs, output=args.output_name,
                   embedding_output=args.embedding_output)
    if args.output:
        write_json_atomic(args.output, res)
    o, p = res.overall[res.primary_metric], res.performance
    f = lambda v: "n/a" if v is None else f"{v:+.4f}"  # noqa: E731
    _emit(args, res, f"{res.primary_metric}: FP32 {o['fp32']:.4f} -> quantized {o['quantized']:.4f} "
                     f"(change {f(o['delta'])}, 95% interval [{f(o['ci_low'])}, {f(o['ci_high'])}]); "
                     f"p50 {p['latency_p50_ms']['fp32']:.4f} -> {p['latency_p50_ms']['quantized']:.4f} ms")
    return 0


def cmd_gate(args) -> int:
    from pydantic import ValidationError

    from qops.artifacts import read_json, write_json_atomic
    from qops.errors import SpecError
    from qops.gates import gate
    from qops.spec import GateSpec

    inconclusive = {k: v for k, v in {"overall": args.inconclusive_overall,
                                      "slices": args.inconclusive_slices}.items() if v is not None}
    settings = {"metric": args.metric, "decision": args.decision, "inconclusive": inconclusive or None,
                "multiplicity": args.multiplicity, "confidence": args.confidence,
                "max_overall_drop": args.max_overall_drop, "max_slice_drop": args.max_slice_drop,
                "max_fairness_increase": args.max_fairness_increase, "max_latency_ratio": args.max_latency_ratio,
                "min_slice_size": args.min_slice_size}
    try:
        g = GateSpec(**{k: v for k, v in settings.items() if v is not None})
    except ValidationError as e:
        raise SpecError("Invalid gate settings: " + "; ".join(err["msg"] for err in e.errors()),
                        "pass either --decision or --inconclusive-overall/--inconclusive-slices.") from None
    res = gate(read_json(args.evaluation), g)
    if args.output:
        write_json_atomic(args.output, res)
    _emit(args, res, res.message())
    return 0 if res.passed else 3


def cmd_card(args) -> int:
    from qops.pipeline import stage_card
    from qops.spec import load_spec

    res = stage_card(load_spec(args.spec), args.run_id, args.target, dag_id=args.dag_id)
    _emit(args, res, f"card: {res['markdown_path']} and {res['json_path']}")
    return 0


def cmd_register(args) -> int:
    from qops.pipeline import stage_register
    from qops.spec import load_spec

    res = stage_register(load_spec(args.spec), args.run_id, args.target)
    _emit(args, res)
    return 0


def cmd_stage(args) -> int:
    """Run one stage exactly as its Airflow operator does (same spec, same run folder, same stage table: a skipped
    stage exits 0 and says why, a result the stage's failure rule rejects exits 3)."""
    from qops.pipeline import call_stage, stage
    from qops.spec import load_spec

    st = stage(args.stage)
    res = call_stage(st, load_spec(args.spec), args.run_id, args.target, dag_id=args.dag_id, approved=args.approve)
    _emit(args, res)
    if res.get("skipped"):
        print(f"qops stage {st.name}: skipped: {res['reason']}", file=sys.stderr)
        return 0
    failure = st.failed(res) if st.failed else None
    if failure:
        print(failure, file=sys.stderr)
        return 3
    return 0


def cmd_promote(args) -> int:
    from qops.registry import configure_mlflow, promote

    configure_mlflow(args.tracking_uri)
    better = dict(kv.split(":", 1) for kv in args.better_on or [])
    res = promote(args.name, args.version, args.alias, approved=args.approve, require_approval=args.require_approval,
                  better_on=better or None, by=args.by)
    _emit(args, res, f"{res['name']}: {res['reason']}")
    return 0


def cmd_webhook(args) -> int:
    from qops.alias_events import receiver_from_env, serve

    try:
        receiver = receiver_from_env(args.airflow_url, args.watch, args.tracking_uri)
    except ValueError as e:
        raise QopsError(str(e)) from None
    server = serve(receiver, args.host, args.port, args.path)
    logging.getLogger("qops").info("qops webhook: MLflow posts to http://%s:%d%s; watching %s; Airflow at %s",
                                   args.host, server.server_address[1], args.path,
                                   ", ".join(sorted(f"{n}@{a}" for n, a in receiver.watch)), args.airflow_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_run(args) -> int:
    from qops.pipeline import format_summary, run_pipeline
    from qops.spec import load_spec

    summary = run_pipeline(load_spec(args.spec), run_id=args.run_id, progress=not args.json, approved=args.approve)
    if args.json:
        _emit(args, summary)
    else:
        print(format_summary(summary))
        print(f"summary: {summary['run_dir']}/summary.json")
    return 0 if any(r.get("gate") == "passed" for r in summary["targets"]) else 3


def cmd_summary(args) -> int:
    from pathlib import Path

    from qops.artifacts import read_json
    from qops.pipeline import format_summary

    path = Path(args.path)
    if path.name == "latest_summary.json":
        path = Path(read_json(path)["summary"])
    summary = read_json(path)
    print(format_summary(summary))
    print(f"summary: {path}")
    return 0 if any(r.get("gate") == "passed" for r in summary["targets"]) else 3


def cmd_train_example(args) -> int:
    from qops.examples.german_credit import retrain_and_register

    _emit(args, retrain_and_register(args.work_dir, model_name=args.model_name, tracking_uri=args.tracking_uri))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qops", description="Quantize, gate, document and register models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print a machine-readable result")
        sp.set_defaults(func=fn)
        return sp

    add("targets", cmd_targets, "list hardware targets")
    sp = add("calibrate", cmd_calibrate, "select a calibration set from a pool and check it for drift")
    sp.add_argument("--pool", required=True)
    sp.add_argument("--reference", required=True)
    sp.add_argument("--size", type=int, required=True)
    sp.add_argument("--output-dir", required=True)
    sp.add_argument("--strategy", choices=["random", "stratified", "diversity"], help="default: stratified")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--slice-columns", help="comma-separated")
    sp.add_argument("--min-per-slice", type=int)
    sp.add_argument("--on-small-slice", choices=["warn", "fail"])
    sp.add_argument("--recency-column", help="timestamp column for a recency window")
    sp.add_argument("--recency-days", type=float, default=30.0)
    sp.add_argument("--embedding-column", help="diversity sampling over this list/array column")
    sp.add_argument("--validation", help="validation set whose schema the calibration set must match")
    sp.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--features", help="comma-separated feature columns")
    g.add_argument("--model", help="ONNX model: its qops.feature_columns metadata names the features, or its input "
                   "names the pool's array columns; with --tokenizer, the inputs the calibration feeds are checked "
                   "against")
    _kind_args(sp)
    sp.add_argument("--no-drift-check", action="store_true")
    sp.add_argument("--on-drift", choices=["fail", "warn", "reselect"], help="default: fail")
    sp.add_argument("--max-reselect", type=int)

    sp = add("quantize", cmd_quantize, "quantize a model (ONNX, or .pt2 for torch_* targets) for a hardware target")
    sp.add_argument("--model", required=True)
    sp.add_argument("--target", required=True)
    sp.add_argument("--output", required=True)
    sp.add_argument("--calibration", help="parquet/CSV calibration set (static targets, GPTQ, SmoothQuant)")
    sp.add_argument("--features", help="comma-separated; default: the model's metadata")
    sp.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="override a recipe field, e.g. calibration_method=percentile, per_channel=false")
    sp.add_argument("--tune", action="store_true", help="accuracy-aware tuning against --validation")
    sp.add_argument("--validation", help="validation set for --tune")
    sp.add_argument("--label", help="label column for --tune (omit: gate on fidelity to FP32)")
    sp.add_argument("--slice-columns", help="slices gated by --tune")
    sp.add_argument("--threshold", action="append", metavar="METRIC>=VALUE",
                    help="a gate bound for --tune (repeatable), e.g. 'cosine>=0.995' 'neighbor_agreement>=0.95'; "
                    f"metrics: {', '.join(known_metrics())}")
    sp.add_argument("--task", choices=["classification", "regression", "embedding"],
                    help="gated task for --tune (default: classification with --label; without, embedding when a "
                    "threshold names neighbor_agreement, else top-1 agreement)")
    sp.add_argument("--output-name", help="model output the task reads (default: the first)")
    sp.add_argument("--embedding-output", help="a further output of embeddings (embedding_cosine, neighbor_agreement)")
    _kind_args(sp)
    sp.add_argument("--max-trials", type=int, default=12)
    sp.add_argument("--timeout", type=float, default=900.0, help="tuning budget in seconds")

    sp = add("qat", cmd_qat, "quantization-aware training of a .pt2 program for a target, resumable")
    sp.add_argument("--model", required=True, help="the FP32 torch.export program (.pt2)")
    sp.add_argument("--onnx", help="the ONNX model the program was exported to (default: exported here)")
    sp.add_argument("--target", required=True, help="hardware target (qops targets); sets the output format")
    sp.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                    help="recipe field override, repeatable (e.g. block_size=32)")
    sp.add_argument("--engine", choices=["pt2e", "torchao"], help="default: the target's")
    sp.add_argument("--scheme", help="default: the target's (docs/qat.md#targets)")
    sp.add_argument("--train", required=True, help="training rows (parquet/CSV/.npz) with the model's inputs")
    sp.add_argument("--label", help="label column (task loss); omit with --distill")
    sp.add_argument("--distill", action="store_true", help="label-free: KL to the FP32 program's outputs")
    sp.add_argument("--features", help="comma-separated; default: the program's qops.feature_columns")
    _kind_args(sp)
    sp.add_argument("--group-size", type=int, help="int4 group size of torchao schemes (default 32)")
    sp.add_argument("--steps", type=int)
    sp.add_argument("--epochs", type=float)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--optimizer", choices=["adamw", "sgd"])
    sp.add_argument("--weight-decay", type=float)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--checkpoint-every", type=int)
    sp.add_argument("--time-budget-s", type=float)
    sp.add_argument("--holdout", type=float, help="fraction of the rows held out: best checkpoint, early stop, "
                    "and the FP32/PTQ/QAT report (default 0.2)")
    sp.add_argument("--patience", type=int, help="checkpoints without a better held-out loss before stopping "
                    "(default 8)")
    sp.add_argument("--freeze-after", type=float, help="fraction of the steps after which activation ranges and "
                    "weight scales freeze (default 0.5)")
    sp.add_argument("--bn-freeze-after", type=float, help="fraction of the steps after which batch norm uses its "
                    "running statistics (default 0: the pretrained ones throughout)")
    sp.add_argument("--logit-mse", type=float, help="distill: weight of the logits' relative MSE (default 1.0)")
    sp.add_argument("--no-compare", action="store_true", help="skip the PTQ model and the FP32/PTQ/QAT report")
    sp.add_argument("--work-dir", help="checkpoints (safetensors + JSON; default OUTPUT_DIR/work); a rerun resumes")
    sp.add_argument("--output-dir", required=True, help="where the QAT model (the target's format) is written")

    sp = add("evaluate", cmd_evaluate, "evaluate FP32 vs quantized on a validation set")
    sp.add_argument("--fp32", required=True)
    sp.add_argument("--quantized", required=True)
    sp.add_argument("--validation", required=True)
    sp.add_argument("--label", help="label column; omit for label-free fidelity metrics")
    sp.add_argument("--slice-columns")
    sp.add_argument("--intersection", action="append", help="slice columns joined by '&', e.g. sex&age_group")
    sp.add_argument("--features")
    sp.add_argument("--task", choices=["classification", "regression", "embedding"], default="classification")
    sp.add_argument("--metric", help="primary metric (default: accuracy, mae, or agreement without labels)")
    sp.add_argument("--output-name", help="model output the task reads (default: the first)")
    sp.add_argument("--embedding-output", help="a further output of embeddings (embedding_cosine, neighbor_agreement)")
    _kind_args(sp)
    sp.add_argument("--bootstrap", type=int, default=1000)
    sp.add_argument("--min-slice-size", type=int, default=20)
    sp.add_argument("--latency-runs", type=int, default=300)
    sp.add_argument("--outputs", choices=["auto", "logits", "probabilities"], default="auto",
                    help="how classifier outputs are read (auto: decided on the FP32 model's outputs)")
    sp.add_argument("--output", help="write the evaluation JSON here")

    sp = add("gate", cmd_gate, "apply gates to an evaluation JSON (exit 3 when a gate fails)")
    sp.add_argument("--evaluation", required=True)
    sp.add_argument("--metric", help="primary metric (default accuracy)")
    sp.add_argument("--decision", choices=["point", "bound"],
                    help="older alias: point = --inconclusive-* point, bound = --inconclusive-* fail")
    sp.add_argument("--inconclusive-overall", choices=["warn", "fail", "point"],
                    help="what an inconclusive overall check decides (default warn)")
    sp.add_argument("--inconclusive-slices", choices=["warn", "fail", "point"],
                    help="what an inconclusive slice/fairness check decides (default warn)")
    sp.add_argument("--multiplicity", choices=["holm", "bonferroni", "none"],
                    help="correction of the slice/fairness family (default holm)")
    sp.add_argument("--confidence", type=float, help="interval confidence (default 0.95)")
    sp.add_argument("--max-overall-drop", type=float)
    sp.add_argument("--max-slice-drop", type=float)
    sp.add_argument("--max-fairness-increase", type=float)
    sp.add_argument("--max-latency-ratio", type=float)
    sp.add_argument("--min-slice-size", type=int)
    sp.add_argument("--output")

    for name, fn, help_ in (("card", cmd_card, "write the model card of one target of a run"),
                            ("register", cmd_register, "register one target of a run in MLflow")):
        sp = add(name, fn, help_)
        sp.add_argument("--spec", required=True)
        sp.add_argument("--run-id", required=True)
        sp.add_argument("--target", required=True)
        if name == "card":
            sp.add_argument("--dag-id")

    sp = add("stage", cmd_stage, "run one pipeline stage of a spec exactly as its Airflow operator does")
    sp.add_argument("stage", help="a stage of the stage table: source, finetune, calibrate, quantize, evaluate, gate, "
                    "qat, card, register, promote, summary (docs/architecture.md#the-stage-table)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--run-id", required=True)
    sp.add_argument("--target")
    sp.add_argument("--dag-id")
    sp.add_argument("--approve", action="store_true", help="promote: the manual approval a policy may require")

    sp = add("promote", cmd_promote, "point an alias at a registered version whose gates passed, by policy")
    sp.add_argument("--name", required=True)
    sp.add_argument("--version", required=True)
    sp.add_argument("--alias", default="champion")
    sp.add_argument("--require-approval", action="store_true", help="refuse unless --approve is given")
    sp.add_argument("--approve", action="store_true", help="the manual approval")
    sp.add_argument("--better-on", action="append", metavar="METRIC:max|min",
                    help="repeatable: the version's logged metric must be at least as good as the holder's")
    sp.add_argument("--by", help="who promotes (tagged on the replaced version)")
    sp.add_argument("--tracking-uri")

    sp = add("webhook", cmd_webhook, "receive MLflow's model_version_alias.created webhooks (HMAC-verified with "
             "QOPS_WEBHOOK_SECRET) and post them as asset events to Airflow")
    sp.add_argument("--watch", action="append", required=True, metavar="NAME@ALIAS",
                    help="repeatable: a watched source model alias (the spec's source_model with watch:)")
    sp.add_argument("--airflow-url", required=True, help="Airflow api-server base URL (token: AIRFLOW_API_TOKEN, "
                    "or AIRFLOW_API_USERNAME/AIRFLOW_API_PASSWORD)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8790)
    sp.add_argument("--path", default="/mlflow-webhook")
    sp.add_argument("--tracking-uri", help="MLflow server holding the watermark tags (default MLFLOW_TRACKING_URI)")

    sp = add("run", cmd_run, "run the whole pipeline of a spec without Airflow (the DAG's stages, promotion included)")
    sp.add_argument("spec")
    sp.add_argument("--run-id")
    sp.add_argument("--approve", action="store_true", help="the manual approval mlflow.promotion may require")

    sp = add("summary", cmd_summary, "print a run's summary table (exit 3 when no target passed its gates)")
    sp.add_argument("path", help="summary.json or latest_summary.json")

    sp = add("train-example", cmd_train_example, "retrain the German Credit example model and register it")
    sp.add_argument("--work-dir", required=True)
    sp.add_argument("--model-name", default="german-credit")
    sp.add_argument("--tracking-uri")
    return p


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    """SIGTERM unwinds like Ctrl-C, so temporary files and locks are cleaned up on the way out."""
    raise SystemExit(128 + signum)


QUIET_LOGGERS = ("torchao", "torch.onnx._internal.exporter._registration", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    import signal

    from qops import redact

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("qops").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # harmless at import/export: torchao's extensions for other Pythons/GPUs, no triton; no
        for name in QUIET_LOGGERS:  # torchvision ops to register with torch.onnx. --verbose shows them.
            logging.getLogger(name).setLevel(logging.ERROR)
    redact.install()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except GateFailed as e:
        print(f"qops: {redact.redact(e)}", file=sys.stderr)
        return 3
    except QopsError as e:
        print(f"qops: error: {redact.redact(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "MlflowException":
            raise
        print(f"qops: error: MLflow refused the request: {redact.redact(str(e).splitlines()[0][:400])} Fix: check "
              "the tracking URI, the model name and version, and the server's log.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
