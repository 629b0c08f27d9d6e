"""From command-line flags to what the core takes: spec sections (``calibration``, ``gates``), data kinds,
recipe options (``--option KEY=VALUE``), thresholds; and how results are printed."""

from __future__ import annotations

import json
import re

from qops.artifacts import to_jsonable
from qops.errors import QopsError, SpecError
from qops.spec import CalibrationSpec, DiversitySpec, DriftSpec, GateSpec, RecencySpec


def csv_list(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t] if text else None


def emit(args, result, human: str | None = None) -> None:
    """The result as JSON with ``--json``, else ``human`` (default: one ``key: value`` line per top-level field, nested
    values as compact JSON): JSON only when asked for."""
    if args.json:
        print(json.dumps(to_jsonable(result), indent=2, sort_keys=True))
    elif human is not None:
        print(human)
    else:
        data = to_jsonable(result)
        if not isinstance(data, dict):
            print(json.dumps(data))
            return
        for k, v in data.items():
            print(f"{k}: {v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)}")


def calibration_section(args):
    """The spec's ``calibration`` section from ``qops calibrate``'s flags (unset flags: the section's defaults)."""
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


def recipe_options(pairs: list[str] | None) -> dict:
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


def gate_section(args, task: str | None = None):
    """The gates ``quantize --tune`` judges with: the spec's GateSpec from the command line (``task``: the target's
    own, e.g. ``causal_lm`` for decoder targets, whose primary metric is the perplexity increase)."""
    from pydantic import ValidationError

    thresholds = [parse_threshold(t) for t in args.threshold or []]
    named = {t["metric"] for t in thresholds}
    task = task or args.task or ("embedding" if not args.label and named & {"neighbor_agreement"} else "classification")
    fields = {"task": task, "thresholds": thresholds}
    if task not in ("embedding", "causal_lm"):
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


def kind_from_args(args):
    """The data kind the flags name: text (--tokenizer), image (--data-kind image); None otherwise (tabular or
    inferred from the data and the model)."""
    from qops.data import Image, Text  # pandas and NumPy: not on the light install that runs `qops targets`

    if getattr(args, "data_kind", None) == "image":
        return Image(path_column=args.path_column, root=args.image_root, resize=args.resize or None,
                     crop=args.crop or None, mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"),
                     layout=args.layout)
    if not getattr(args, "tokenizer", None):
        return None

    return Text(csv_list(args.text_column) or ["text"], args.tokenizer, max_length=args.max_length)


def kind_from_model(model, data):
    """The kind a bare model and data file imply (tensors for an .npz or input-named columns)."""
    if not model:
        raise QopsError("qops calibrate needs --features, --model or --tokenizer.", "pass one of them.")
    from qops.data import data_kind

    return data_kind(model, None, data)


def failed_name(output: str) -> str:
    """Where ``quantize --tune`` writes its most faithful candidate when none passes: ``q.onnx`` -> ``q.failed.onnx``."""
    from pathlib import Path

    p = Path(output)
    return str(p.with_name(f"{p.stem}.failed{p.suffix}"))


def comparison_table(cmp: dict | None) -> str:
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
