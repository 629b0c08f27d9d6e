"""Model cards: card data (a dict) + templates + pure render. Publishing is the registry's job.

Sections follow Mitchell et al. 2019 ("Model Cards for Model Reporting"), plus quantization and
lineage. Formats: Markdown with Hugging Face-compatible YAML front matter (``CardData``, which also loads it
back), a self-contained HTML page with inline SVG charts, and JSON validated against the versioned schema in
``schema/``.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path

from qops import __version__
from qops.artifacts import atomic_path, to_jsonable, write_json_atomic, write_text_atomic
from qops.cards.charts import gate_intervals_svg, metric_bars_svg, perf_bars_svg, qat_loss_svg
from qops.cards.data import CardData, EvalResult, Metric
from qops.errors import QopsError
from qops.targets import Recipe

CARD_SCHEMA_VERSION = "1.0"
__all__ = ["CARD_SCHEMA_VERSION", "HUMAN_FIELDS", "PLACEHOLDER", "CardData", "CardResult", "EvalResult", "Metric",
           "build_card_data", "front_matter", "qat_section", "render_html", "render_markdown", "schema", "validate_card",
           "write_card"]
HUMAN_FIELDS = ("intended_use", "training_data", "limitations", "ethical_considerations")
PLACEHOLDER = "[To be written by the model owner: set card.{field} in the pipeline spec.]"


@dataclass
class CardResult:
    markdown_path: str
    html_path: str
    json_path: str
    chart_path: str | None
    target: str
    gate_passed: bool
    qat_chart_path: str | None = None

    @property
    def files(self) -> list[str]:
        return [p for p in (self.markdown_path, self.html_path, self.json_path, self.chart_path, self.qat_chart_path)
                if p]


def _method(recipe: dict, quantization: dict) -> str:
    mode = quantization.get("mode") or recipe["mode"]
    qat = recipe.get("qat")
    if qat:  # trained with fake quantization, not post-training
        fmt = f", {recipe['quant_format']}" if recipe["precision"] == "int8" and mode == "static" \
            and "quant_format" in recipe else ""
        what = {"int8": f"{mode} INT8 QAT", "int4": f"INT4 weight-only QAT (block {recipe.get('block_size')})",
                "fp8": f"FP8 QAT ({qat['scheme']})"}
        return f"{what.get(recipe['precision'], 'QAT')} ({qat['engine']} {qat['scheme']}; {recipe['runtime']}{fmt})"
    return Recipe.from_dict(recipe).config.method(mode, quantization.get("technique") or {}, recipe["runtime"])


def _formats(recipe: dict, mode: str) -> dict:
    """Weight/activation types, symmetry and calibration method as the recipe's engine config states them."""
    facts = Recipe.from_dict(recipe).config.card_facts()
    facts.update({k: v for k, v in ((recipe.get("qat") or {}).get("card_facts") or {}).items() if k in facts})
    if mode != "static":
        facts["calibration_method"] = f"none ({mode})"
    return facts


def _versions() -> dict:
    out = {"python": platform.python_version(), "qops": __version__}
    for pkg in ("onnxruntime", "onnx", "numpy", "torch", "torchao", "fairlearn", "great-expectations", "mlflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def build_card_data(*, pipeline: str, source: dict, target_recipe: dict, calibration: dict | None,
                    quantization: dict, evaluation: dict, gate_result: dict, gate_settings: dict, human: dict,
                    lineage: dict, generated_at: str | None = None, qat: dict | None = None,
                    recommendation: dict | None = None) -> dict:
    """Assemble the card's data from the JSON of earlier stages. Pure: same inputs, same card
    (``generated_at`` aside, which callers may pin)."""
    ev = evaluation
    m = ev["primary_metric"]
    human_fields = {f: (human.get(f) or None) for f in HUMAN_FIELDS}
    card = {
        "schema_version": CARD_SCHEMA_VERSION,
        "pipeline": pipeline,
        "generated_at": generated_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_details": {
            "name": f"{source['name']} ({target_recipe['target']})",
            "source": {k: source.get(k) for k in ("uri", "name", "version", "run_id", "flavor", "provenance")},
            "source_sha256": quantization["source_sha256"],
            "quantized_sha256": quantization["model_sha256"],
            "owners": human.get("owners") or [],
        },
        "intended_use": human_fields["intended_use"],
        "factors": {
            "slice_dimensions": ev["dimensions"],
            "min_slice_size": gate_settings.get("min_slice_size"),
            "groups": [{"dimension": s["dimension"], "key": s["key"], "n": s["n"]} for s in ev["slices"]],
        },
        "metrics": {
            "primary": m, "computed": ev["metrics"], "task": ev["task"], "decision": gate_result.get("decision"),
            "confidence_intervals": ev["bootstrap"],
        },
        "evaluation_data": {"path": ev["validation"], "rows": ev["rows"], "label": ev["label"]},
        "training_data": human_fields["training_data"],
        "quantitative_analyses": {"overall": ev["overall"], "slices": ev["slices"], "fairness": ev["fairness"]},
        "performance": {**ev["performance"], "worker_hardware": ev["hardware"], "hardware_match": ev["hardware_match"],
                        "target_hardware": target_recipe["hardware"], "fidelity": ev.get("fidelity") or {}},
        "quantization": {
            "hardware_target": target_recipe["target"],
            "target_description": target_recipe["description"],
            "method": _method(target_recipe, quantization),
            "mode": quantization.get("mode") or target_recipe["mode"],
            "graph_kind": quantization.get("graph_kind"),
            "engine": target_recipe.get("engine", "onnxruntime"),
            "technique": quantization.get("technique") or {},
            "notes": quantization.get("notes") or [],
            "fp32_nodes": list(target_recipe.get("nodes_to_exclude") or []),
            "tuning": quantization.get("tuning") or {},
            "precision": target_recipe["precision"],
            **_formats(target_recipe, quantization.get("mode") or target_recipe["mode"]),
            "granularity": target_recipe["granularity"],
            "runtime": target_recipe["runtime"],
            "execution_provider": target_recipe["execution_provider"],
            "queue": target_recipe["queue"],
            "library_versions": _versions(),
            "tuning_trials": quantization.get("trials") or [],
            "calibration": None if calibration is None else {
                "rows": calibration["rows"], "sha256": calibration["sha256"], "strategy": calibration["strategy"],
                "seed": calibration["seed"], "pool": calibration["pool"],
                "rows_per_slice": calibration["rows_per_slice"], "drift_passed": calibration["drift_passed"],
                "drifted_columns": calibration["drifted_columns"], "drift_report": calibration["drift_report_path"],
                "manifest": calibration.get("manifest_path"), "sources": calibration.get("sources"),
                "attempts": calibration.get("attempts") or [],
                "feeds": calibration.get("feeds") or {}, "feeds_sha256": calibration.get("feeds_sha256"),
                "data": calibration.get("data") or {},
            },
        },
        "gates": {**gate_result, "settings": gate_settings,
                  **({"recommended_instead": recommendation} if recommendation else {})},
        "qat": qat,
        "ethical_considerations": human_fields["ethical_considerations"],
        "caveats_and_recommendations": human_fields["limitations"],
        "lineage": {"source_model_uri": source.get("uri"), "source_model_version": source.get("version"),
                    "mlflow": None, **lineage, "qops_version": __version__},
    }
    return to_jsonable(card)


def _recovered(fp32, ptq, qat):
    """(QAT - PTQ) / (FP32 - PTQ): the share of PTQ's change from FP32 that QAT won back (1: all of it; above 1:
    better than FP32; negative: worse than PTQ). None when PTQ did not move the metric."""
    if None in (fp32, ptq, qat) or abs(fp32 - ptq) < 1e-12:
        return None
    return round((qat - ptq) / (fp32 - ptq), 4)


def qat_section(ptq_eval: dict, ptq_gate: dict, qat_eval: dict, qat_quant: dict, why: str, when: str) -> dict:
    """The card's QAT part: FP32 vs PTQ vs QAT overall and per slice, the recovered fraction, the training
    configuration and loss history, and why QAT ran."""
    m = qat_eval["primary_metric"]

    def row(key: str, a: dict, b: dict) -> dict:
        f, p, q = a["fp32"], a["quantized"], b["quantized"]
        return {"key": key, "fp32": f, "ptq": p, "qat": q, "recovered": _recovered(f, p, q)}

    ptq_slices = {s["key"]: s for s in ptq_eval["slices"]}
    rows = [row("overall", ptq_eval["overall"][m], qat_eval["overall"][m])]
    rows += [row(s["key"], ptq_slices[s["key"]]["metrics"][m], s["metrics"][m]) for s in qat_eval["slices"]
             if s["key"] in ptq_slices and m in ptq_slices[s["key"]]["metrics"]]
    t = qat_quant["qat"]
    return {"when": when, "why": why, "metric": m, "rows": rows,
            "ptq": {"gate_passed": ptq_gate["passed"], "failed_checks": ptq_gate.get("failed") or [],
                    "size_bytes": ptq_eval["performance"]["size_bytes"]["quantized"],
                    "latency_p50_ms": ptq_eval["performance"]["latency_p50_ms"]["quantized"]},
            "plan": t["plan"], "training": t["training"], "data": t.get("data"), "program": t.get("program"),
            "export": t.get("export") or {}, "seconds": qat_quant.get("seconds")}


def schema() -> dict:
    return json.loads(files("qops.cards").joinpath(f"schema/card-{CARD_SCHEMA_VERSION}.schema.json").read_text())


def validate_card(card: dict) -> None:
    import jsonschema

    try:
        jsonschema.validate(card, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise QopsError(f"Model card data does not match schema {CARD_SCHEMA_VERSION} at {where}: {e.message}",
                        "this is a qops bug; report it with the card.json") from None


def _env(autoescape: bool):
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")), autoescape=autoescape,
                      trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["num"] = lambda v, signed=False: "n/a" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")
    env.filters["md"] = lambda v: "" if v is None else (
        str(v).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        .replace("\n", " "))
    env.filters["placeholder"] = lambda v, field: v if v else PLACEHOLDER.format(field=field)
    return env


def front_matter(card: dict) -> str:
    """Hugging Face model-card metadata (base_model, base_model_relation, model-index results, qops' gate verdict),
    written by ``CardData``; ``CardData.load(card_md)`` reads it back."""
    return CardData.from_card(card).to_front_matter()


def render_markdown(card: dict, chart_name: str | None = None) -> str:
    return front_matter(card) + _env(False).get_template("card.md.j2").render(card=card, chart=chart_name)


def render_html(card: dict) -> str:
    from markupsafe import Markup

    charts = {"metric": Markup(metric_bars_svg(card)), "perf": Markup(perf_bars_svg(card)),
              "gates": Markup(gate_intervals_svg(card)), "qat_loss": Markup(qat_loss_svg(card))}
    return _env(True).get_template("card.html.j2").render(card=card, charts=charts)


def _png_chart(card: dict, path: Path) -> Path | None:
    """The same per-slice bars as PNG, for Markdown viewers (MLflow's artifact view among them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    qa = card["quantitative_analyses"]
    m = card["metrics"]["primary"]
    rows = [("overall", qa["overall"][m])] + [(s["key"], s["metrics"][m]) for s in qa["slices"]]
    labels = [r[0] for r in rows]
    v32 = [r[1]["fp32"] or 0 for r in rows]
    vq = [r[1]["quantized"] or 0 for r in rows]
    err = np.array([[max(0.0, (r[1]["quantized"] or 0) - (r[1]["fp32"] or 0) - (r[1]["ci_low"] or 0))
                     if r[1]["ci_low"] is not None else 0 for r in rows],
                    [max(0.0, (r[1]["fp32"] or 0) + (r[1]["ci_high"] or 0) - (r[1]["quantized"] or 0))
                     if r[1]["ci_high"] is not None else 0 for r in rows]])
    perf = card["performance"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1, 1]})
    x = np.arange(len(labels))
    axes[0].bar(x - 0.2, v32, 0.4, label="FP32", color="#4C72B0")
    axes[0].bar(x + 0.2, vq, 0.4, yerr=err, capsize=3, label=card["quantization"]["hardware_target"],
                color="#DD8452")
    axes[0].set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel(m)
    axes[0].set_title(f"{m} by slice (whiskers: 95% paired-bootstrap CI)", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    for ax, key, unit, scale in ((axes[1], "size_bytes", "MB", 1e-6), (axes[2], "latency_p50_ms", "ms", 1)):
        ax.bar(["FP32", "quant."], [perf[key]["fp32"] * scale, perf[key]["quantized"] * scale],
               color=["#4C72B0", "#DD8452"])
        ax.set_title(f"{'size' if key == 'size_bytes' else 'batch-1 p50 latency'} ({unit})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


def _png_qat_chart(card: dict, path: Path) -> Path | None:
    """FP32 vs PTQ vs QAT per slice, and the QAT loss curve."""
    qat = card.get("qat")
    if not qat:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    rows = qat["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(rows))
    for off, key, color in ((-0.27, "fp32", "#4C72B0"), (0.0, "ptq", "#C44E52"), (0.27, "qat", "#55A868")):
        axes[0].bar(x + off, [r[key] or 0 for r in rows], 0.27, label=key.upper(), color=color)
    axes[0].set_xticks(x, [r["key"] for r in rows], rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel(qat["metric"])
    axes[0].set_title(f"{qat['metric']}: FP32 vs PTQ vs QAT", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    losses = qat["training"]["losses"]
    axes[1].plot(np.arange(1, len(losses) + 1), losses, color="#4C72B0", lw=1)
    if qat["training"].get("resumed_from"):
        axes[1].axvline(qat["training"]["resumed_from"], color="#DD8452", ls="--", lw=1, label="resumed")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].set_title(f"QAT training loss ({qat['training']['config']['loss']})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


def write_card(card: dict, out_dir: str | os.PathLike) -> CardResult:
    """Validate the card against its schema and write card.md, card.html, card.json, card_chart.png."""
    validate_card(card)
    out = Path(out_dir)
    chart = _png_chart(card, out / "card_chart.png")
    qat_chart = _png_qat_chart(card, out / "card_qat.png")
    md = write_text_atomic(out / "card.md", render_markdown(card, chart.name if chart else None))
    html = write_text_atomic(out / "card.html", render_html(card))
    js = write_json_atomic(out / "card.json", card)
    return CardResult(str(md), str(html), str(js), str(chart) if chart else None,
                      card["quantization"]["hardware_target"], bool(card["gates"]["passed"]),
                      str(qat_chart) if qat_chart else None)
