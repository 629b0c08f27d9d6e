"""`qops` command line. Subcommands mirror the Airflow operators one to one."""

from __future__ import annotations

import logging
import sys

from qops.cli.args import (
    calibration_section,
    comparison_table,
    csv_list,
    emit,
    failed_name,
    gate_section,
    kind_from_args,
    kind_from_model,
    recipe_options,
)
from qops.cli.parser import build_parser
from qops.errors import GateFailed, PromotionRefused, QopsError, SpecError


def cmd_targets(args) -> int:
    from qops.targets import list_targets

    targets = list_targets()
    if args.json:
        emit(args, {n: r.to_dict() for n, r in targets.items()})
        return 0
    print(f"{'target':<22} {'precision':<9} {'mode':<11} {'engine':<11} {'granularity':<17} {'queue':<5} "
          f"{'runtime / EP':<38} hardware")
    for name, r in targets.items():
        print(f"{name:<22} {r.precision:<9} {r.mode:<11} {r.engine:<11} {r.granularity:<17} {r.queue:<5} "
              f"{r.runtime + ' / ' + r.execution_provider:<38} {r.hardware}")
    return 0


def cmd_calibrate(args) -> int:
    from qops.calibration import S3Options, select_calibration
    from qops.data import onnx_io

    features = kind_from_args(args) or csv_list(args.features) or kind_from_model(args.model, args.pool)
    res = select_calibration(calibration_section(args), pool=args.pool, reference=args.reference,
                             output_dir=args.output_dir, features=features, slice_columns=csv_list(args.slice_columns),
                             validation=args.validation, model_inputs=onnx_io(args.model)[0] if args.model else None,
                             s3=S3Options(args.s3_endpoint_url))
    feeds = f"; feeds by input name: {res.feeds_path}" if res.feeds_path else ""
    emit(args, res, f"calibration set: {res.path} ({res.rows} rows, sha256 {res.sha256}){feeds}; "
                     f"drift {'passed' if res.drift_passed else 'DRIFT in ' + ', '.join(res.drifted_columns)}")
    return 0


def cmd_quantize(args) -> int:
    from qops.engines import LlmEngine, engine_for, quantize
    from qops.quantize.api import resolve_recipe
    from qops.spec import TuningSpec
    from qops.spec.data import CausalLMSpec

    options = recipe_options(args.option)
    recipe = resolve_recipe(args.target, options)
    tcfg = TuningSpec(max_trials=args.max_trials, timeout_s=args.timeout) if args.tune else None
    if isinstance(engine_for(recipe), LlmEngine):  # decoder targets: --tune scores on held-out calibration texts
        res = quantize(args.model, args.target, args.output, calibration=args.calibration, options=options,
                       causal_lm=CausalLMSpec(column=args.text_column or "text", seq_len=args.max_length,
                                              stride=min(64, args.max_length)),
                       tuning=tcfg, gates=gate_section(args, "causal_lm") if args.tune else None)
    elif args.tune:
        res = _tune_graph(args, recipe, tcfg)
    else:
        res = quantize(args.model, args.target, args.output, calibration=args.calibration,
                       features=kind_from_args(args) or csv_list(args.features), options=options)
    if args.tune and not args.json:
        for t in res.trials:
            fidelity = t.get("fidelity_text") or f"cos {t['cosine'] if t.get('cosine') is not None else '-'}"
            print(f"  trial {t['trial']:>2} {t['phase']:<8} {t['config']:<52} {t['verdict']:<7} "
                  f"latency x{t['latency_ratio'] if t.get('latency_ratio') is not None else '-'} "
                  f"{fidelity}{'  <- chosen' if t.get('chosen') else ''}")
        if res.tuning.get("stopped"):
            print(f"  tuning stopped: {res.tuning['stopped']}")
        if res.tuning.get("node_ranking"):
            print("  most sensitive nodes: " + ", ".join(
                f"{r['node']} ({r['sqnr_lost_db']} dB lost on {r.get('worst_on', 'all rows')})"
                for r in res.tuning["node_ranking"][:5]))
    verdict = "" if res.passed is None else (" — passed the gates" if res.passed else
                                              " — NO candidate passed the gates (exit 3)")
    emit(args, res, f"{res.model_path}: {res.size_bytes} bytes ({1 / res.size_ratio:.2f}x smaller), mode {res.mode}, "
                     f"recipe {res.recipe_path}{verdict}" + "".join(f"\n  note: {n}" for n in res.notes))
    return 3 if res.passed is False else 0


def _tune_graph(args, recipe, tcfg):
    """``quantize --tune`` for a graph target: candidates judged by the gates on ``--validation``."""
    from qops.gates import gate_judge
    from qops.quantize.tune import tune

    if not args.validation:
        raise QopsError("--tune needs --validation (the rows the gates judge each candidate on).",
                        "pass --validation FILE [--label COLUMN] [--slice-columns a,b].")
    features = kind_from_args(args) or csv_list(args.features) or None  # None: from the data (.npz) or model metadata
    judge = gate_judge(args.model, args.validation, args.label, gate_section(args),
                       slice_columns=csv_list(args.slice_columns), features=features,
                       latency_runs=tcfg.latency_runs, bootstrap=tcfg.bootstrap)
    return tune(args.model, recipe, args.output, judge, calibration=args.calibration, features=features,
                config=tcfg, ranking_data=args.calibration or args.validation,
                validation=args.validation, failed_output=failed_name(args.output))


def cmd_sensitivity(args) -> int:
    from qops.data.tables import read_table
    from qops.llm.data import causal_lm_kind
    from qops.llm.sensitivity import layer_sensitivity, write_overrides
    from qops.llm.source import LlmInfo, check_hf_dir
    from qops.quantize.api import resolve_recipe
    from qops.spec.data import CausalLMSpec

    recipe = resolve_recipe(args.target)
    if recipe.model_kind != "causal_lm" or recipe.precision != "int4" or args.keep < 0:
        raise QopsError(f"qops sensitivity ranks layers for an INT4 decoder target, not {args.target!r} "
                        f"(keep {args.keep}).", "pass --target llm_int4_rtn (or another llm_int4_*) and --keep >= 0.")
    hf = check_hf_dir(args.model)
    c = CausalLMSpec(column=args.text_column, seq_len=args.max_length, stride=min(64, args.max_length))
    windows = causal_lm_kind(c, str(hf), LlmInfo.from_hf(hf)).windows(read_table(args.calibration, "calibration set"),
                                                                      "calibration set", 1)[: args.windows]
    doc = layer_sensitivity(hf, windows, recipe.block_size, keep=args.keep, granularity=args.granularity)
    path = write_overrides(doc, args.output)
    top = sorted(doc["layers"].items(), key=lambda kv: kv[1]["rank"])[:5]
    emit(args, {**doc, "path": str(path)}, f"{path}: {len(doc['layers'])} groups in {doc['seconds']} s; costliest: "
         + ", ".join(f"{k} (KL {v['kl']:.4f})" for k, v in top) + f"; 8-bit: {', '.join(doc['overrides']) or 'none'}"
         + f"\n  use: --option tensor_overrides={path}")
    return 0


def cmd_qat(args) -> int:
    from qops.qat.job import qat_files

    res = qat_files(program=args.model, target=args.target, train=args.train, out_dir=args.output_dir,
                    work_dir=args.work_dir, label=args.label, distill=args.distill,
                    features=kind_from_args(args) or csv_list(args.features), onnx=args.onnx, engine=args.engine,
                    scheme=args.scheme, target_options=recipe_options(args.option), group_size=args.group_size,
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
    emit(args, res, f"{res['model_path']}: QAT ({res['qat']['plan']['engine']} {res['qat']['plan']['scheme']}) "
                     f"{t['steps']} steps{resumed}, loss {t['losses'][0] if t['losses'] else 'n/a'} -> "
                     f"{t['losses'][-1] if t['losses'] else 'n/a'}{best}; {res['size_bytes']} bytes "
                     f"({1 / res['size_ratio']:.2f}x smaller)" + "".join(f"\n  note: {n}" for n in res["notes"])
                     + comparison_table(res.get("comparison")))
    return 0


def cmd_evaluate(args) -> int:
    from qops.artifacts import write_json_atomic
    from qops.evaluate import evaluate

    res = evaluate(args.fp32, args.quantized, args.validation, args.label, csv_list(args.slice_columns),
                   features=kind_from_args(args) or csv_list(args.features), metric=args.metric,
                   latency_runs=args.latency_runs, task=args.task,
                   intersections=[c.split("&") for c in args.intersection or []], bootstrap=args.bootstrap,
                   min_slice_size=args.min_slice_size, outputs=args.outputs, output=args.output_name,
                   embedding_output=args.embedding_output)
    if args.output:
        write_json_atomic(args.output, res)
    o, p = res.overall[res.primary_metric], res.performance
    f = lambda v: "n/a" if v is None else f"{v:+.4f}"  # noqa: E731
    emit(args, res, f"{res.primary_metric}: FP32 {o['fp32']:.4f} -> quantized {o['quantized']:.4f} "
                     f"(change {f(o['delta'])}, 95% interval [{f(o['ci_low'])}, {f(o['ci_high'])}]); "
                     f"p50 {p['latency_p50_ms']['fp32']:.4f} -> {p['latency_p50_ms']['quantized']:.4f} ms")
    return 0


def cmd_gate(args) -> int:
    from pydantic import ValidationError

    from qops.artifacts import read_json, write_json_atomic
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
    emit(args, res, res.message())
    return 0 if res.passed else 3


def cmd_card(args) -> int:
    from qops.pipeline import stage_card
    from qops.spec import load_spec

    res = stage_card(load_spec(args.spec), args.run_id, args.target, dag_id=args.dag_id)
    emit(args, res, f"card: {res['markdown_path']} and {res['json_path']}")
    return 0


def cmd_register(args) -> int:
    from qops.pipeline import stage_register
    from qops.spec import load_spec

    res = stage_register(load_spec(args.spec), args.run_id, args.target)
    emit(args, res)
    return 0


def cmd_stage(args) -> int:
    """Run one stage exactly as its Airflow operator does (same spec, same run folder, same stage table: a skipped
    stage exits 0 and says why, a result the stage's failure rule rejects exits 3)."""
    from qops.pipeline import call_stage, stage
    from qops.spec import load_spec

    st = stage(args.stage)
    res = call_stage(st, load_spec(args.spec), args.run_id, args.target, dag_id=args.dag_id, approved=args.approve)
    emit(args, res)
    if res.get("skipped"):
        print(f"qops stage {st.name}: skipped: {res['reason']}", file=sys.stderr)
        return 0
    failure = st.failed(res) if st.failed else None
    if failure:
        print(failure, file=sys.stderr)
        return 3
    return 0


def cmd_promote(args) -> int:
    from qops.registry import configure_mlflow, promote, record_approval

    configure_mlflow(args.tracking_uri)
    if args.approve:  # a person's answer, recorded before the policy decides (as the Airflow approval task does)
        record_approval(args.name, args.version, args.alias, approved=True, by=args.by, reason=args.reason)
    better = dict(kv.split(":", 1) for kv in args.better_on or [])
    res = promote(args.name, args.version, args.alias, approved=args.approve, require_approval=args.require_approval,
                  better_on=better or None, by=args.by)
    emit(args, res, f"{res['name']}: {res['reason']}")
    return 0


def cmd_webhook(args) -> int:
    from qops.alias_events import receiver_from_env
    from qops.alias_webhook import serve

    try:
        receiver = receiver_from_env(args.airflow_url, args.watch, args.tracking_uri)
    except ValueError as e:
        raise QopsError(str(e)) from None
    try:
        server = serve(receiver, args.host, args.port, args.path)
    except OSError as e:
        raise QopsError(f"qops webhook cannot listen on {args.host}:{args.port}: {e.strerror or e}.",
                        "pick a free --port (0: any free port) or another --host.") from None
    watching = sorted(f"{n}@{a}" for n, a in receiver.watch)
    if args.json:
        emit(args, {"url": server.url, "airflow_url": args.airflow_url, "watching": watching})
        sys.stdout.flush()
    logging.getLogger("qops").info("qops webhook: MLflow posts to %s; watching %s; Airflow at %s", server.url,
                                   ", ".join(watching), args.airflow_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_run(args) -> int:
    from qops.pipeline import format_summary, run_pipeline
    from qops.run_folder import RunLayout
    from qops.spec import load_spec

    summary = run_pipeline(load_spec(args.spec), run_id=args.run_id, progress=not args.json, approved=args.approve)
    if args.json:
        emit(args, summary)
    else:
        print(format_summary(summary))
        print(f"summary: {RunLayout.at(summary['run_dir']).summary}")
    return 0 if any(r.get("gate") == "passed" for r in summary["targets"]) else 3


def cmd_summary(args) -> int:
    from pathlib import Path

    from qops.artifacts import read_json
    from qops.pipeline import format_summary
    from qops.run_folder import LATEST_SUMMARY

    path = Path(args.path)
    if path.name == LATEST_SUMMARY:
        path = Path(read_json(path)["summary"])
    summary = read_json(path)
    if args.json:
        emit(args, summary)
    else:
        print(format_summary(summary))
        print(f"summary: {path}")
    return 0 if any(r.get("gate") == "passed" for r in summary["targets"]) else 3


def cmd_spec_schema(args) -> int:  # noqa: ARG001 - the schema is JSON with or without --json
    import json

    from qops.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_spec_validate(args) -> int:
    from qops.spec.check import check_spec

    res = check_spec(args.spec)
    if args.json:
        emit(args, res.to_dict())
    if not res.ok:
        raise SpecError(f"{args.spec} is not a valid spec; {len(res.problems)} problem(s):\n"
                        + "".join(f"  - {p}\n" for p in res.problems), "correct each problem as its line says "
                        "(nothing was run), then validate again.")
    if not args.json:
        remote = f"; remote, not checked: {', '.join(f'{k} {v}' for k, v in res.remote.items())}" if res.remote else ""
        print(f"{args.spec}: OK — {res.name}, {len(res.targets)} target(s) ({', '.join(res.targets)}), "
              f"{len(res.paths)} local path(s) exist{remote}")
    return 0


def cmd_train_example(args) -> int:
    from qops.examples.german_credit import retrain_and_register

    emit(args, retrain_and_register(args.work_dir, model_name=args.model_name, tracking_uri=args.tracking_uri))
    return 0


COMMANDS = {"targets": cmd_targets, "calibrate": cmd_calibrate, "quantize": cmd_quantize, "sensitivity": cmd_sensitivity, "qat": cmd_qat, "evaluate": cmd_evaluate, "gate": cmd_gate, "card": cmd_card, "register": cmd_register, "stage": cmd_stage, "promote": cmd_promote, "webhook": cmd_webhook, "run": cmd_run, "summary": cmd_summary, "train-example": cmd_train_example, "spec schema": cmd_spec_schema, "spec validate": cmd_spec_validate}


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    """SIGTERM unwinds like Ctrl-C, so temporary files and locks are cleaned up on the way out."""
    raise SystemExit(128 + signum)


QUIET_LOGGERS = ("torchao", "torch.onnx._internal.exporter._registration", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    import signal

    from qops import redact

    args = build_parser(COMMANDS).parse_args(argv)
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
    except PromotionRefused as e:
        print(f"qops: promotion refused: {redact.redact(e)}", file=sys.stderr)
        return 4
    except QopsError as e:
        print(f"qops: error: {redact.redact(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ == "MlflowException":
            print(f"qops: error: MLflow refused the request: {redact.redact(str(e).splitlines()[0][:400])} Fix: "
                  "check the tracking URI, the model name and version, and the server's log.", file=sys.stderr)
            return 2
        if args.verbose:
            raise
        first = (str(e).splitlines() or [""])[0][:400]
        print(f"qops: internal error: {type(e).__name__}: {redact.redact(first)} (a bug or an unexpected "
              "environment; run again with -v for the traceback, and report it)", file=sys.stderr)
        return 1

