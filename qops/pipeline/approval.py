"""The human approval of a promotion (``mlflow.promotion.approval: airflow``): what the person is shown — every
target's verdict and metrics from the run folder as it is when the request is made, the card and the MLflow model
version — and what their answer records (``approval.json`` in the target's folder, tags on the model version).

Airflow's ApprovalOperator asks and waits (``qops_airflow.approval``); nothing here imports Airflow."""

from __future__ import annotations

from pathlib import Path

from qops.artifacts import read_json, write_json_atomic
from qops.pipeline.common import claimed, skipped
from qops.pipeline.summary import target_row
from qops.registry import configure_mlflow, record_approval
from qops.run_folder import RunLayout

APPROVE_HINT = ("**Approve** lets the promote task move `@{alias}` to this version (it still checks the policy); "
                "**Reject** leaves `@{alias}` where it is. Either answer is recorded on the model version "
                "(`qops.approval`, `qops.approval.by`, `qops.approval.reason`): give a reason.")


def _registered(spec, run_id: str, target: str) -> dict:
    reg = RunLayout.of(spec, run_id).target(target).register
    r = read_json(reg) if reg.is_file() else {}
    return r if r.get("registered") and r.get("version") else {}


def _cell(row: dict) -> list[str]:
    ml = row.get("mlflow") or {}
    version = f"{ml['name']} v{ml['version']}" if ml.get("registered") else "not registered"
    if "size_bytes" not in row:
        return [row["target"], row.get("method", ""), row["gate"], "(not evaluated)", "", "", "", version]
    worst = (f"{row['worst_slice']} ({row['worst_slice_delta']:+.4f})" if row.get("worst_slice") else "n/a")
    return [row["target"], row["method"], row["gate"],
            f"{row['metric']} {row['metric_quantized']:.4f} / {row['metric_fp32']:.4f}", worst,
            f"{row['size_bytes'] / 1e6:.3f} ({row['fp32_size_bytes'] / row['size_bytes']:.2f}x smaller)",
            f"{row['latency_p50_ms']:.4f} ({row['fp32_latency_p50_ms'] / row['latency_p50_ms']:.2f}x faster)",
            version]


def approval_body(spec, run_id: str, target: str, name: str, version: str, mlflow_ui: str | None = None) -> str:
    """Markdown for the approval page: the request, the per-target table (this target first, in bold), this target's
    failed and inconclusive checks, and links to its card and MLflow model version."""
    p = spec.mlflow.promotion
    rows = [target_row(spec, run_id, t) for t in spec.targets]
    rows.sort(key=lambda r: r["target"] != target)
    head = ["target", "method", "gate", "metric quantized / FP32", "worst slice (delta)", "size MB", "p50 ms",
            "MLflow"]
    lines = [f"Promote **{name} version {version}** to `@{p.alias}`? Pipeline `{spec.name}`, run `{run_id}`, "
             f"target `{target}`.", "", APPROVE_HINT.format(alias=p.alias), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = _cell(r)
        if r["target"] == target:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    mine = rows[0]
    if mine.get("failed_checks"):
        lines += ["", f"Failed checks: {', '.join(map(str, mine['failed_checks']))}"]
    if mine.get("inconclusive_checks"):
        lines += ["", f"Inconclusive checks: {', '.join(map(str, mine['inconclusive_checks']))}"]
    if p.better_on:
        lines += ["", "Policy: at least as good as the current holder of "
                  f"`@{p.alias}` on {', '.join(f'{k} ({v})' for k, v in p.better_on.items())}."]
    lines += ["", "Links:"]
    card = mine.get("card")
    if card:
        lines.append(f"- Model card: [card.html]({Path(card['html']).resolve().as_uri()}) "
                     f"(Markdown: `{card['markdown']}`)")
    if mlflow_ui:
        lines.append(f"- MLflow model version: [{name} v{version}]({mlflow_ui.rstrip('/')}/#/models/{name}/"
                     f"versions/{version})")
    lines.append(f"- Run folder: `{RunLayout.of(spec, run_id).root}`")
    return "\n".join(lines)


def approval_request(spec, run_id: str, target: str, mlflow_ui: str | None = None) -> dict:
    """What to ask: ``subject`` and ``body`` (Markdown) about the version this run registered for ``target``.
    Skipped when the spec asks for no approval or nothing was registered for the target (nothing to promote)."""
    p = spec.mlflow.promotion
    if p is None or p.approval is None:
        return skipped(target, "no mlflow.promotion.approval in the spec")
    r = _registered(spec, run_id, target)
    if not r:
        return skipped(target, f"nothing was registered for {target} in run {run_id}: nothing to approve")
    name, version = r["name"], str(r["version"])
    return {"target": target, "name": name, "version": version, "alias": p.alias,
            "subject": f"Promote {name} v{version} to @{p.alias}? ({spec.name}, {target})",
            "body": approval_body(spec, run_id, target, name, version, mlflow_ui)}


@claimed("target")
def record_decision(spec, run_id: str, target: str, *, approved: bool, by: str | None = None,
                    reason: str | None = None) -> dict:
    """Record a person's answer: tags on the registered version (:func:`qops.registry.approval.record_approval`)
    and ``approval.json`` in the target's folder (the summary shows it). The alias is not moved here."""
    p = spec.mlflow.promotion
    r = _registered(spec, run_id, target)
    if p is None or not r:
        return skipped(target, f"nothing was registered for {target} in run {run_id}: nothing to record")
    configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)
    tags = record_approval(r["name"], str(r["version"]), p.alias, approved=approved, by=by, reason=reason)
    out = {"target": target, "name": r["name"], "version": str(r["version"]), "alias": p.alias,
           "decision": tags["qops.approval"], "by": tags["qops.approval.by"],
           "reason": tags["qops.approval.reason"], "at": tags["qops.approval.at"]}
    write_json_atomic(RunLayout.of(spec, run_id).target(target).approval, out)
    return out
