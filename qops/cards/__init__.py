"""Model cards: card data (a dict) + Jinja2 template + pure render. Publishing is the registry's job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from qops import __version__
from qops.artifacts import to_jsonable, write_json_atomic, write_text_atomic, atomic_path

PLACEHOLDER = "_[To be written by the model owner: set `card.{field}` in the pipeline spec.]_"
CARD_SCHEMA_VERSION = "1.0"


@dataclass
class CardResult:
    markdown_path: str
    json_path: str
    chart_path: str | None
    target: str
    gate_passed: bool


def build_card_data(*, pipeline: str, source: dict, target_recipe: dict, calibration: dict | None,
                    quantization: dict, evaluation: dict, gate_result: dict, human: dict, lineage: dict) -> dict:
    """Assemble the card's data. Every argument is JSON from an earlier stage."""
    ev = evaluation
    slices = []
    for key, s32 in ev["fp32"]["slices"].items():
        sq = ev["quantized"]["slices"][key]
        slices.append({"slice": key, "n": s32["n"], "fp32": s32["value"], "quantized": sq["value"],
                       "delta": None if s32["value"] is None or sq["value"] is None else sq["value"] - s32["value"]})
    fairness = []
    for col, m32 in ev["fp32"]["fairness"].items():
        for name, v32 in m32.items():
            fairness.append({"column": col, "metric": name, "fp32": v32, "quantized": ev["quantized"]["fairness"][col][name]})
    human_fields = {}
    for f in ("intended_use", "limitations", "ethical_considerations"):
        human_fields[f] = human.get(f) or PLACEHOLDER.format(field=f)
    return to_jsonable({
        "schema_version": CARD_SCHEMA_VERSION,
        "pipeline": pipeline,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model": source,
        "hardware_target": target_recipe,
        "quantization": {
            "method": f"{target_recipe['mode']} PTQ ({target_recipe['runtime']}, {target_recipe['quant_format']})",
            "precision": target_recipe["precision"],
            "weight_type": target_recipe["weight_type"],
            "activation_type": target_recipe["activation_type"],
            "granularity": target_recipe["granularity"],
            "symmetric_weights": target_recipe["symmetric_weights"],
            "symmetric_activations": target_recipe["symmetric_activations"],
            "calibration_method": target_recipe["calibration_method"] if target_recipe["mode"] == "static" else "none (dynamic)",
            "model_sha256": quantization["model_sha256"],
            "source_sha256": quantization["source_sha256"],
        },
        "calibration": None if calibration is None else {
            "rows": calibration["rows"], "sha256": calibration["sha256"], "strategy": calibration["strategy"],
            "seed": calibration["seed"], "pool": calibration["pool"], "rows_per_slice": calibration["rows_per_slice"],
            "drift_passed": calibration["drift_passed"], "drifted_columns": calibration["drifted_columns"],
            "drift_report": calibration["drift_report_path"],
        },
        "evaluation": {
            "metric": ev["metric"], "rows": ev["rows"], "validation": ev["validation"],
            "overall": {"fp32": ev["fp32"]["overall"], "quantized": ev["quantized"]["overall"]},
            "agreement": ev["agreement"], "slices": slices, "fairness": fairness,
        },
        "performance": {
            "size_bytes": {"fp32": ev["fp32"]["size_bytes"], "quantized": ev["quantized"]["size_bytes"]},
            "latency_p50_ms": {"fp32": ev["fp32"]["latency_p50_ms"], "quantized": ev["quantized"]["latency_p50_ms"]},
            "latency_method": ev["latency_method"],
            "worker_hardware": ev["hardware"],
            "target_hardware": target_recipe["hardware"],
        },
        "gates": gate_result,
        "human": human_fields,
        "owners": human.get("owners") or [],
        "lineage": {**lineage, "qops_version": __version__},
    })


def _chart(card: dict, path: Path) -> Path | None:
    """Per-slice metric bars, FP32 vs quantized, plus size and latency; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ev = card["evaluation"]
    labels = ["overall"] + [s["slice"] for s in ev["slices"]]
    v32 = [ev["overall"]["fp32"]] + [s["fp32"] or 0 for s in ev["slices"]]
    vq = [ev["overall"]["quantized"]] + [s["quantized"] or 0 for s in ev["slices"]]
    perf = card["performance"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 1, 1]})
    import numpy as np

    x = np.arange(len(labels))
    axes[0].bar(x - 0.2, v32, 0.4, label="FP32", color="#4C72B0")
    axes[0].bar(x + 0.2, vq, 0.4, label=card["hardware_target"]["target"], color="#DD8452")
    axes[0].set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel(ev["metric"])
    axes[0].set_ylim(0, 1.2)
    axes[0].legend(fontsize=8, loc="upper right", ncol=2)
    axes[0].set_title(f"{ev['metric']} by slice")
    for ax, key, unit, scale in ((axes[1], "size_bytes", "MB", 1e-6), (axes[2], "latency_p50_ms", "ms", 1)):
        vals = [perf[key]["fp32"] * scale, perf[key]["quantized"] * scale]
        ax.bar(["FP32", "quant."], vals, color=["#4C72B0", "#DD8452"])
        ax.set_title(f"{'size' if key == 'size_bytes' else 'batch-1 p50 latency'} ({unit})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def render_markdown(card: dict, chart_name: str | None = None) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                      autoescape=select_autoescape([]), trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{v:.4f}"
    env.filters["md"] = lambda v: str(v).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return env.get_template("card.md.j2").render(card=card, chart=chart_name)


def write_card(card: dict, out_dir: str | os.PathLike) -> CardResult:
    out = Path(out_dir)
    chart = _chart(card, out / "card_chart.png")
    md = write_text_atomic(out / "card.md", render_markdown(card, chart.name if chart else None))
    js = write_json_atomic(out / "card.json", card)
    return CardResult(str(md), str(js), str(chart) if chart else None, card["hardware_target"]["target"],
                      bool(card["gates"]["passed"]))
