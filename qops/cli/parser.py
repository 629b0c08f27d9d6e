"""The ``qops`` argument parser: one subcommand per stage and tool. It takes the command functions as a mapping,
so building it imports nothing else of qops (start-up stays fast)."""

from __future__ import annotations

import argparse

from qops import __version__
from qops.metric_names import known_metrics


def help_text(action: argparse.Action) -> str:
    """An argument's help as ``-h`` prints it: its text, with `` (default: X)`` appended where the argument has a
    default the text does not already name (no default, ``False`` flags and empty lists show none)."""
    text = action.help or ""
    default = action.default
    if (default is None or default is False or default == [] or default is argparse.SUPPRESS
            or "default" in text.lower() or not (action.option_strings or action.nargs in ("?", "*"))):
        return text
    return text + " (default: %(default)s)"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with :func:`help_text`: every default shown, once."""

    def _get_help_string(self, action):
        return help_text(action)


def _kind_args(sp) -> None:
    sp.add_argument("--tokenizer", help="text data: a local tokenizer directory (never downloaded)")
    sp.add_argument("--text-column", help="text data: the text column (two, comma-separated, for pairs); decoder "
                    "targets: the calibration texts' column (default: text)")
    sp.add_argument("--max-length", type=int, default=128, help="text data: tokens per row after truncation; "
                    "decoder targets: tokens per calibration window")
    sp.add_argument("--data-kind", choices=["image"], help="image: the tables hold image paths (the spec's "
                    "data.kind image); their preprocessing is set with the --image-* options")
    sp.add_argument("--path-column", default="path", help="image data: the column of image paths")
    sp.add_argument("--image-root", help="image data: folder relative paths are read from (default: the current "
                    "folder)")
    sp.add_argument("--resize", type=int, default=256, help="image data: shorter side resized to this, in pixels "
                    "(0: off)")
    sp.add_argument("--crop", type=int, default=224, help="image data: centre crop size (0: off)")
    sp.add_argument("--mean", default="0.485,0.456,0.406", help="image data: per-channel mean on the 0..1 scale")
    sp.add_argument("--std", default="0.229,0.224,0.225", help="image data: per-channel std on the 0..1 scale")
    sp.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="image data: tensor layout")


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """``commands``: subcommand name -> function(args) -> exit code."""
    p = argparse.ArgumentParser(prog="qops", description="Quantize, gate, document and register models. "
                                "Exit codes: 0 ok, 1 unexpected error, 2 bad input, 3 a gate failed, 4 promotion "
                                "refused (docs/cli.md).", formatter_class=HelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an unexpected "
                   "error")
    p.add_argument("--version", action="version", version=f"qops {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of the commands below; `qops COMMAND -h` lists its arguments")

    def add(name, fn, help_, json_help="print the result as JSON (only then: without it, readable lines)",
            parent=None):
        sp = (parent or sub).add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        sp.add_argument("--json", action="store_true", help=json_help)
        sp.set_defaults(func=fn)
        return sp

    add("targets", commands["targets"], "list hardware targets")
    sp = add("calibrate", commands["calibrate"], "select a calibration set from a pool and check it for drift")
    sp.add_argument("--pool", required=True, help="parquet/CSV (or .npz) rows to draw the calibration set from, "
                    "local or s3:// (recent production data)")
    sp.add_argument("--reference", required=True, help="parquet/CSV rows the selection is checked against for drift, "
                    "local or s3:// (e.g. the training data)")
    sp.add_argument("--size", type=int, required=True, help="rows in the calibration set")
    sp.add_argument("--output-dir", required=True, help="folder the calibration set (and its report) is written to")
    sp.add_argument("--strategy", choices=["random", "stratified", "diversity"], help="how rows are drawn "
                    "(default: stratified, over --slice-columns)")
    sp.add_argument("--seed", type=int, help="random seed of the selection (default: 0)")
    sp.add_argument("--slice-columns", help="comma-separated slice columns; stratified sampling covers each stratum")
    sp.add_argument("--min-per-slice", type=int, help="stratified: at least this many rows per stratum (default: 1)")
    sp.add_argument("--on-small-slice", choices=["warn", "fail"], help="a stratum with fewer rows than "
                    "--min-per-slice: warn or fail (default: warn)")
    sp.add_argument("--recency-column", help="timestamp column for a recency window")
    sp.add_argument("--recency-days", type=float, default=30.0, help="with --recency-column: only rows this many "
                    "days old or newer")
    sp.add_argument("--embedding-column", help="diversity sampling over this list/array column")
    sp.add_argument("--validation", help="validation set whose schema the calibration set must match")
    sp.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--features", help="comma-separated feature columns")
    g.add_argument("--model", help="ONNX model: its qops.feature_columns metadata names the features, or its input "
                   "names the pool's array columns; with --tokenizer, the inputs the calibration feeds are checked "
                   "against")
    _kind_args(sp)
    sp.add_argument("--no-drift-check", action="store_true", help="skip the drift check against --reference")
    sp.add_argument("--on-drift", choices=["fail", "warn", "reselect"], help="what drift does: fail (exit 2), warn, "
                    "or reselect with new seeds (default: fail)")
    sp.add_argument("--max-reselect", type=int, help="--on-drift reselect: new seeds tried before failing "
                    "(default: 3)")

    sp = add("quantize", commands["quantize"], "quantize a model for a hardware target, in the target engine's own "
             "format (ONNX, .pt2, GGUF, a Transformers folder)")
    sp.add_argument("--model", required=True, help="the FP32 model: an ONNX graph, a .pt2 program (torch_* targets) "
                    "or a Hugging Face causal-LM folder (llm_*, gguf_*, ct_*, hf_bnb_* targets)")
    sp.add_argument("--target", required=True, help="hardware target (qops targets); it decides the engine and the "
                    "output format")
    sp.add_argument("--output", required=True, help="where to write: a .onnx/.pt2/.gguf file, or a folder for "
                    "llm_*, ct_*, hf_bnb_* targets; <output>.recipe.json is written beside it")
    sp.add_argument("--calibration", help="parquet/CSV calibration set (static targets, GPTQ, AWQ, SmoothQuant, "
                    "GGUF importance matrices; decoders: a text column, --text-column)")
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
    sp.add_argument("--max-trials", type=int, default=12, help="--tune: candidates quantized and judged at most")
    sp.add_argument("--timeout", type=float, default=900.0, help="--tune: wall-clock budget in seconds; no new trial "
                    "starts after it")

    sp = add("sensitivity", commands["sensitivity"], "per-layer 4-bit sensitivity of a decoder, written as a tensor-"
             "override file that llm_int4_* targets take (tensor_overrides): its costliest layers stay 8-bit")
    sp.add_argument("--model", required=True, help="a Hugging Face causal-LM folder")
    sp.add_argument("--calibration", required=True, help="parquet/CSV calibration texts (--text-column)")
    sp.add_argument("--output", required=True, help="the override file to write (JSON)")
    sp.add_argument("--target", default="llm_int4_rtn", help="the INT4 target whose block size the layers are "
                    "rounded with")
    sp.add_argument("--keep", type=int, default=4, help="layers (or parts) overridden to 8-bit, costliest first")
    sp.add_argument("--granularity", choices=("layer", "part"), default="layer", help="measure whole decoder "
                    "layers, or each layer's attention and MLP apart (part: finer, twice the passes)")
    sp.add_argument("--text-column", default="text", help="the calibration texts' column")
    sp.add_argument("--max-length", type=int, default=128, help="tokens per calibration window")
    sp.add_argument("--windows", type=int, default=16, help="calibration windows measured")

    sp = add("qat", commands["qat"], "quantization-aware training for a target: fine-tuning of its PTQ graph "
             "(static INT8 ONNX) or of a .pt2 program")
    sp.add_argument("--model", required=True, help="the FP32 model: an ONNX file (engine qdq: its PTQ model is "
                    "fine-tuned) or a torch.export program (.pt2)")
    sp.add_argument("--onnx", help="with a .pt2 --model: the ONNX model it was exported to (default: exported here)")
    sp.add_argument("--target", required=True, help="hardware target (qops targets); sets the output format")
    sp.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                    help="recipe field override, repeatable (e.g. block_size=32)")
    sp.add_argument("--engine", choices=["qdq", "pt2e", "torchao"], help="QAT engine (default: the target's; qdq "
                    "for static INT8 ONNX targets)")
    sp.add_argument("--scheme", help="QAT scheme (default: the target's; docs/qat.md#targets)")
    sp.add_argument("--train", required=True, help="training rows (parquet/CSV/.npz) with the model's inputs")
    sp.add_argument("--label", help="label column (task loss); omit with --distill")
    sp.add_argument("--distill", action="store_true", help="label-free: KL to the FP32 program's outputs")
    sp.add_argument("--features", help="comma-separated; default: the program's qops.feature_columns")
    _kind_args(sp)
    sp.add_argument("--group-size", type=int, help="int4 group size of torchao schemes (default 32)")
    sp.add_argument("--steps", type=int, help="optimizer steps; or --epochs (default: 300 steps for engine qdq, "
                    "else 100)")
    sp.add_argument("--epochs", type=float, help="passes over the training rows; or --steps (default: 3)")
    sp.add_argument("--batch-size", type=int, help="rows per step (default: 8 for engine qdq, 32 for pt2e and "
                    "torchao)")
    sp.add_argument("--lr", type=float, help="learning rate (default: 1e-5 for engine qdq, 1e-4 for pt2e and "
                    "torchao)")
    sp.add_argument("--optimizer", choices=["adamw", "sgd"], help="optimizer (default: adamw)")
    sp.add_argument("--weight-decay", type=float, help="weight decay (default: 0)")
    sp.add_argument("--seed", type=int, help="seed of the data order and the held-out sample (default: 0)")
    sp.add_argument("--checkpoint-every", type=int, help="steps between checkpoints; a rerun resumes from the last "
                    "(default: 25)")
    sp.add_argument("--time-budget-s", type=float, help="stop training, with a checkpoint, after this many seconds "
                    "(default: no limit)")
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

    sp = add("evaluate", commands["evaluate"], "evaluate FP32 vs quantized on a validation set")
    sp.add_argument("--fp32", required=True, help="the FP32 model (ONNX)")
    sp.add_argument("--quantized", required=True, help="the quantized model (ONNX) compared with it")
    sp.add_argument("--validation", required=True, help="parquet/CSV/.npz validation rows (labels, slice columns)")
    sp.add_argument("--label", help="label column; omit for label-free fidelity metrics")
    sp.add_argument("--slice-columns", help="comma-separated slice columns: the metric and fairness per slice")
    sp.add_argument("--intersection", action="append", help="repeatable: slice columns joined by '&', e.g. "
                    "sex&age_group")
    sp.add_argument("--features", help="comma-separated feature columns (default: the model's metadata)")
    sp.add_argument("--task", choices=["classification", "regression", "embedding"], default="classification",
                    help="what the model's output is")
    sp.add_argument("--metric", help="primary metric (default: accuracy, mae, or agreement without labels)")
    sp.add_argument("--output-name", help="model output the task reads (default: the first)")
    sp.add_argument("--embedding-output", help="a further output of embeddings (embedding_cosine, neighbor_agreement)")
    _kind_args(sp)
    sp.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples for the confidence "
                    "intervals")
    sp.add_argument("--min-slice-size", type=int, default=20, help="smaller slices are reported as insufficient data")
    sp.add_argument("--latency-runs", type=int, default=300, help="timed batch-1 runs per model")
    sp.add_argument("--outputs", choices=["auto", "logits", "probabilities"], default="auto",
                    help="how classifier outputs are read (auto: decided on the FP32 model's outputs)")
    sp.add_argument("--output", help="write the evaluation JSON here")

    sp = add("gate", commands["gate"], "apply gates to an evaluation JSON (exit 3 when a gate fails)")
    sp.add_argument("--evaluation", required=True, help="the evaluation JSON (qops evaluate --output)")
    sp.add_argument("--metric", help="primary metric (default: accuracy)")
    sp.add_argument("--decision", choices=["point", "bound"],
                    help="older alias: point = --inconclusive-* point, bound = --inconclusive-* fail")
    sp.add_argument("--inconclusive-overall", choices=["warn", "fail", "point"],
                    help="what an inconclusive overall check decides (default warn)")
    sp.add_argument("--inconclusive-slices", choices=["warn", "fail", "point"],
                    help="what an inconclusive slice/fairness check decides (default warn)")
    sp.add_argument("--multiplicity", choices=["holm", "bonferroni", "none"],
                    help="correction of the slice/fairness family (default holm)")
    sp.add_argument("--confidence", type=float, help="interval confidence (default: 0.95)")
    sp.add_argument("--max-overall-drop", type=float, help="allowed drop of the primary metric, FP32 minus "
                    "quantized, overall (default: 0.01)")
    sp.add_argument("--max-slice-drop", type=float, help="the same, for every slice (default: 0.03)")
    sp.add_argument("--max-fairness-increase", type=float, help="allowed increase of each fairness metric "
                    "(default: 0.02)")
    sp.add_argument("--max-latency-ratio", type=float, help="quantized p50 latency over FP32's at most (default: "
                    "none)")
    sp.add_argument("--min-slice-size", type=int, help="smaller slices are reported as insufficient data "
                    "(default: 20)")
    sp.add_argument("--output", help="write the gate result JSON here")

    for name, fn, help_ in (("card", commands["card"], "write the model card of one target of a run"),
                            ("register", commands["register"], "register one target of a run in MLflow")):
        sp = add(name, fn, help_)
        sp.add_argument("--spec", required=True, help="the pipeline spec YAML of the run")
        sp.add_argument("--run-id", required=True, help="the run id (its run folder under the spec's artifact_root)")
        sp.add_argument("--target", required=True, help="one of the spec's targets")
        if name == "card":
            sp.add_argument("--dag-id", help="the Airflow DAG id the card links to (default: none)")

    sp = add("stage", commands["stage"], "run one pipeline stage of a spec exactly as its Airflow operator does")
    sp.add_argument("stage", help="a stage of the stage table: source, finetune, calibrate, quantize, evaluate, gate, "
                    "qat, card, register, promote, summary (docs/architecture.md#the-stage-table)")
    sp.add_argument("--spec", required=True, help="the pipeline spec YAML")
    sp.add_argument("--run-id", required=True, help="the run id: stages of one run share its run folder")
    sp.add_argument("--target", help="the target, for the per-target stages (quantize, evaluate, gate, qat, card, "
                    "register, promote)")
    sp.add_argument("--dag-id", help="card: the Airflow DAG id the card links to (default: none)")
    sp.add_argument("--approve", action="store_true", help="promote: the manual approval a policy may require")

    sp = add("promote", commands["promote"], "point an alias at a registered version whose gates passed, by policy")
    sp.add_argument("--name", required=True, help="the registered model's name")
    sp.add_argument("--version", required=True, help="the version to point the alias at")
    sp.add_argument("--alias", default="champion", help="the alias to move")
    sp.add_argument("--require-approval", action="store_true", help="refuse unless --approve is given")
    sp.add_argument("--approve", action="store_true", help="the manual approval")
    sp.add_argument("--better-on", action="append", metavar="METRIC:max|min",
                    help="repeatable: the version's logged metric must be at least as good as the holder's")
    sp.add_argument("--by", help="who promotes (tagged on the replaced version; with --approve, on the approved one)")
    sp.add_argument("--reason", help="with --approve: why, recorded on the version (qops.approval.reason)")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")

    sp = add("webhook", commands["webhook"], "receive MLflow's model_version_alias.created webhooks (HMAC-verified with "
             "QOPS_WEBHOOK_SECRET) and post them as asset events to Airflow; serves until Ctrl-C/SIGTERM",
             json_help="print where it listens (url, watching, airflow_url) as JSON once it is bound; the log goes "
             "to stderr")
    sp.add_argument("--watch", action="append", required=True, metavar="NAME@ALIAS",
                    help="repeatable: a watched source model alias (the spec's source_model with watch:)")
    sp.add_argument("--airflow-url", required=True, help="Airflow api-server base URL (token: AIRFLOW_API_TOKEN, "
                    "or AIRFLOW_API_USERNAME/AIRFLOW_API_PASSWORD)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sp.add_argument("--port", type=int, default=8790, help="port to listen on (0: any free port; --json prints it)")
    sp.add_argument("--path", default="/mlflow-webhook", help="the URL path MLflow posts to")
    sp.add_argument("--tracking-uri", help="MLflow server holding the watermark tags (default: $MLFLOW_TRACKING_URI)")

    sp = add("run", commands["run"], "run the whole pipeline of a spec without Airflow (the DAG's stages, promotion included)")
    sp.add_argument("spec", help="the pipeline spec YAML (docs/spec.md; check it first with qops spec validate)")
    sp.add_argument("--run-id", help="the run id; the same spec and run id resume (default: a new unique id, "
                    "cli-<UTC time>-<6 hex>)")
    sp.add_argument("--approve", action="store_true", help="the manual approval mlflow.promotion may require")

    sp = add("summary", commands["summary"], "print a run's summary table (exit 3 when no target passed its gates)")
    sp.add_argument("path", help="a run's summary.json, or the artifact root's latest_summary.json")

    sp = add("train-example", commands["train-example"], "retrain the German Credit example model and register it")
    sp.add_argument("--work-dir", required=True, help="folder for the training data and the exported model")
    sp.add_argument("--model-name", default="german-credit", help="registered model name")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")

    spec = sub.add_parser("spec", help="the pipeline spec: its JSON Schema, and checking a spec file",
                          description="The pipeline spec (docs/spec.md): its JSON Schema, and checking a spec file "
                          "without running it.", formatter_class=HelpFormatter)
    spec_sub = spec.add_subparsers(dest="spec_command", required=True, metavar="SUBCOMMAND",
                                   help="schema or validate; `qops spec SUBCOMMAND -h` lists its arguments")
    add("schema", commands["spec schema"], "print the JSON Schema of the pipeline spec (docs/spec.schema.json is "
        "this output)", json_help="accepted for symmetry: the schema is JSON either way", parent=spec_sub)
    sp = add("validate", commands["spec validate"], "check a spec file without running anything: its fields, "
             "targets and their recipe options, and that its local data and model paths exist; exit 2 listing every "
             "problem with its fix", json_help="print the result as JSON (ok, targets, paths checked, remote URIs "
             "not checked, problems), also when it fails", parent=spec_sub)
    sp.add_argument("spec", help="the pipeline spec YAML file")
    return p
