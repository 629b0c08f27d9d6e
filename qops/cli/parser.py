"""The ``qops`` argument parser: one subcommand per stage and tool. It takes the command functions as a mapping,
so building it imports nothing else of qops (start-up stays fast)."""

from __future__ import annotations

import argparse

from qops import __version__
from qops.metric_names import known_metrics


def _kind_args(sp) -> None:
    sp.add_argument("--tokenizer", help="text data: a local tokenizer directory (never downloaded)")
    sp.add_argument("--text-column", help="text data: the text column (two, comma-separated, for pairs); decoder "
                    "targets: the calibration texts' column (default: text)")
    sp.add_argument("--max-length", type=int, default=128, help="text data: tokens per row after truncation; "
                    "decoder targets: tokens per calibration window")
    sp.add_argument("--data-kind", choices=["image"], help="image: the tables hold image paths (the spec's "
                    "data.kind image); their preprocessing is set with the --image-* options")
    sp.add_argument("--path-column", default="path", help="image data: the column of image paths")
    sp.add_argument("--image-root", help="image data: folder relative paths are read from (default: as given)")
    sp.add_argument("--resize", type=int, default=256, help="image data: shorter side resized to this (0: off)")
    sp.add_argument("--crop", type=int, default=224, help="image data: centre crop size (0: off)")
    sp.add_argument("--mean", default="0.485,0.456,0.406", help="image data: per-channel mean on the 0..1 scale")
    sp.add_argument("--std", default="0.229,0.224,0.225", help="image data: per-channel std on the 0..1 scale")
    sp.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="image data: tensor layout")


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """``commands``: subcommand name -> function(args) -> exit code."""
    p = argparse.ArgumentParser(prog="qops", description="Quantize, gate, document and register models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"qops {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print a machine-readable result")
        sp.set_defaults(func=fn)
        return sp

    add("targets", commands["targets"], "list hardware targets")
    sp = add("calibrate", commands["calibrate"], "select a calibration set from a pool and check it for drift")
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
    sp.add_argument("--max-trials", type=int, default=12)
    sp.add_argument("--timeout", type=float, default=900.0, help="tuning budget in seconds")

    sp = add("sensitivity", commands["sensitivity"], "per-layer 4-bit sensitivity of a decoder, written as a tensor-"
             "override file that llm_int4_* targets take (tensor_overrides): its costliest layers stay 8-bit")
    sp.add_argument("--model", required=True, help="a Hugging Face causal-LM folder")
    sp.add_argument("--calibration", required=True, help="parquet/CSV calibration texts (--text-column)")
    sp.add_argument("--output", required=True, help="the override file to write (JSON)")
    sp.add_argument("--target", default="llm_int4_rtn", help="the INT4 target whose block size the layers are "
                    "rounded with (default: llm_int4_rtn)")
    sp.add_argument("--keep", type=int, default=4, help="layers (or parts) overridden to 8-bit, costliest first "
                    "(default: 4)")
    sp.add_argument("--granularity", choices=("layer", "part"), default="layer", help="measure whole decoder "
                    "layers, or each layer's attention and MLP apart (part: finer, twice the passes; default: layer)")
    sp.add_argument("--text-column", default="text", help="the calibration texts' column (default: text)")
    sp.add_argument("--max-length", type=int, default=128, help="tokens per calibration window (default: 128)")
    sp.add_argument("--windows", type=int, default=16, help="calibration windows measured (default: 16)")

    sp = add("qat", commands["qat"], "quantization-aware training of a .pt2 program for a target, resumable")
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

    sp = add("evaluate", commands["evaluate"], "evaluate FP32 vs quantized on a validation set")
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

    sp = add("gate", commands["gate"], "apply gates to an evaluation JSON (exit 3 when a gate fails)")
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

    for name, fn, help_ in (("card", commands["card"], "write the model card of one target of a run"),
                            ("register", commands["register"], "register one target of a run in MLflow")):
        sp = add(name, fn, help_)
        sp.add_argument("--spec", required=True)
        sp.add_argument("--run-id", required=True)
        sp.add_argument("--target", required=True)
        if name == "card":
            sp.add_argument("--dag-id")

    sp = add("stage", commands["stage"], "run one pipeline stage of a spec exactly as its Airflow operator does")
    sp.add_argument("stage", help="a stage of the stage table: source, finetune, calibrate, quantize, evaluate, gate, "
                    "qat, card, register, promote, summary (docs/architecture.md#the-stage-table)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--run-id", required=True)
    sp.add_argument("--target")
    sp.add_argument("--dag-id")
    sp.add_argument("--approve", action="store_true", help="promote: the manual approval a policy may require")

    sp = add("promote", commands["promote"], "point an alias at a registered version whose gates passed, by policy")
    sp.add_argument("--name", required=True)
    sp.add_argument("--version", required=True)
    sp.add_argument("--alias", default="champion")
    sp.add_argument("--require-approval", action="store_true", help="refuse unless --approve is given")
    sp.add_argument("--approve", action="store_true", help="the manual approval")
    sp.add_argument("--better-on", action="append", metavar="METRIC:max|min",
                    help="repeatable: the version's logged metric must be at least as good as the holder's")
    sp.add_argument("--by", help="who promotes (tagged on the replaced version)")
    sp.add_argument("--tracking-uri")

    sp = add("webhook", commands["webhook"], "receive MLflow's model_version_alias.created webhooks (HMAC-verified with "
             "QOPS_WEBHOOK_SECRET) and post them as asset events to Airflow")
    sp.add_argument("--watch", action="append", required=True, metavar="NAME@ALIAS",
                    help="repeatable: a watched source model alias (the spec's source_model with watch:)")
    sp.add_argument("--airflow-url", required=True, help="Airflow api-server base URL (token: AIRFLOW_API_TOKEN, "
                    "or AIRFLOW_API_USERNAME/AIRFLOW_API_PASSWORD)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8790)
    sp.add_argument("--path", default="/mlflow-webhook")
    sp.add_argument("--tracking-uri", help="MLflow server holding the watermark tags (default MLFLOW_TRACKING_URI)")

    sp = add("run", commands["run"], "run the whole pipeline of a spec without Airflow (the DAG's stages, promotion included)")
    sp.add_argument("spec")
    sp.add_argument("--run-id")
    sp.add_argument("--approve", action="store_true", help="the manual approval mlflow.promotion may require")

    sp = add("summary", commands["summary"], "print a run's summary table (exit 3 when no target passed its gates)")
    sp.add_argument("path", help="summary.json or latest_summary.json")

    sp = add("train-example", commands["train-example"], "retrain the German Credit example model and register it")
    sp.add_argument("--work-dir", required=True)
    sp.add_argument("--model-name", default="german-credit")
    sp.add_argument("--tracking-uri")
    return p
