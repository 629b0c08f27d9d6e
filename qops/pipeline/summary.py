"""The run's summary: one row per target (size, latency, primary metric, worst slice, gate, MLflow version, card),
written to ``summary.json`` and printed as a table by ``qops run`` and the summary task."""

from __future__ import annotations

from datetime import datetime, timezone

from qops import __version__
from qops.artifacts import read_json, write_json_atomic
from qops.evaluate import degradation
from qops.pipeline.common import claimed
from qops.pipeline.per_target import candidate
from qops.pipeline.publish import write_target_card
from qops.pipeline.runs import log_summary
from qops.run_folder import RunLayout


def target_row(spec, run_id: str, target: str) -> dict:
    """One target's row of the summary, from its run folder as it is now (the approval request reads it before
    the summary stage runs)."""
    layout = RunLayout.of(spec, run_id)
    tdir, (cdir, method, why) = layout.target(target), candidate(spec, run_id, target)
    row: dict = {"target": target, "method": method}
    if method == "qat" or spec.qat and target in spec.qat.targets:
        row["method_reason"] = why
        if tdir.gate.is_file():
            row["ptq_gate"] = "passed" if read_json(tdir.gate)["passed"] else "failed"
    if not cdir.gate.is_file() and method == "qat":
        row["qat_error"] = "QAT did not finish (see the qat task's log)"
    if cdir.evaluation.is_file():
        ev = read_json(cdir.evaluation)
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
    if cdir.gate.is_file():
        g = read_json(cdir.gate)
        row["gate"] = "passed" if g["passed"] else "failed"
        row["failed_checks"] = g["failed"]
        row["inconclusive_checks"] = g.get("inconclusive") or []
        row["unprotected_slices"] = [u["slice"] for u in g.get("unprotected") or []]
    else:
        row["gate"] = "not run"
    if tdir.register.is_file():
        r = read_json(tdir.register)
        row["mlflow"] = {"name": r["name"], "version": r["version"], "aliases": r["aliases"],
                         "registered": r["registered"], "run_id": r.get("run_id")}
    if tdir.card.is_file():
        c = read_json(tdir.card)
        row["card"] = {"markdown": c["markdown_path"], "json": c["json_path"], "html": c["html_path"]}
    if tdir.approval.is_file():  # mlflow.promotion.approval: who answered the DAG's approval request, and how
        row["approval"] = read_json(tdir.approval)
    return row


@claimed("shared")
def stage_summary(spec, run_id: str, dag_id: str | None = None) -> dict:
    layout = RunLayout.of(spec, run_id)
    rows = [target_row(spec, run_id, target) for target in spec.targets]
    recommend_instead(spec, run_id, rows, dag_id)
    summary = {"pipeline": spec.name, "run_id": run_id, "dag_id": dag_id, "qops_version": __version__,
               "source_model": spec.source_model, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "targets": rows, "run_dir": str(layout.root)}
    write_json_atomic(layout.summary, summary)
    write_json_atomic(layout.latest_summary, {"summary": str(layout.summary)})
    summary["mlflow_parent_run_id"] = log_summary(spec, run_id, summary)
    return summary


def recommend_instead(spec, run_id: str, rows: list[dict], dag_id: str | None) -> None:
    """Each failed target's card names the target of this run that passed its gates with the best primary metric
    (the card is written again with it; its row says so): what to serve instead."""
    passing = [r for r in rows if r.get("gate") == "passed" and r.get("metric_quantized") is not None]
    if not passing:
        return
    best = min(passing, key=lambda r: degradation(r["metric"], r["metric_fp32"], r["metric_quantized"]))
    rec = {"target": best["target"], "metric": best["metric"], "quantized": best["metric_quantized"],
           "fp32": best["metric_fp32"], "size_ratio": round(best["fp32_size_bytes"] / best["size_bytes"], 3)}
    for r in rows:
        if r.get("gate") == "failed" and r.get("card"):
            write_target_card(spec, run_id, r["target"], dag_id, recommendation=rec)
            r["recommended_instead"] = best["target"]


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
    failed = [r for r in summary["targets"] if r.get("recommended_instead")]
    if failed:
        rec = next(r for r in summary["targets"] if r["target"] == failed[0]["recommended_instead"])
        lines.append(f"failed: {', '.join(r['target'] for r in failed)}; recommended instead: {rec['target']} "
                     f"(passed its gates with the best {rec['metric']})")
    if cards:
        lines += ["", "model cards (Markdown; card.html, card.json and card_chart.png beside each):", *cards]
    return "\n".join(lines)

