"""Inline SVG charts for the HTML card: no JavaScript, no external files, every label escaped."""

from __future__ import annotations

from html import escape

BLUE, ORANGE, GREY = "#4C72B0", "#DD8452", "#444"


def _rows(card: dict) -> list[tuple[str, dict]]:
    qa = card["quantitative_analyses"]
    m = card["metrics"]["primary"]
    return [("overall", qa["overall"][m])] + [(s["key"], s["metrics"][m]) for s in qa["slices"]]


def metric_bars_svg(card: dict) -> str:
    """Horizontal bars per slice, FP32 vs quantized, with the paired-bootstrap CI as whiskers on the
    quantized bar (FP32 value + CI of the change)."""
    rows = _rows(card)
    m = card["metrics"]["primary"]
    vals = [v for _, e in rows for v in (e["fp32"], e["quantized"]) if v is not None]
    hi = max(vals + [1e-9])
    hi = 1.0 if hi <= 1.0 else hi * 1.1
    label_w, plot_w, row_h, top = 230, 420, 34, 30
    height = top + row_h * len(rows) + 30

    def x(v: float) -> float:
        return label_w + plot_w * max(0.0, v) / hi

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart metric-chart" role="img" '
             f'width="{label_w + plot_w + 90}" height="{height}" aria-label="{escape(m)} by slice, FP32 vs quantized">',
             f'<title>{escape(m)} by slice, FP32 vs quantized, with 95% paired-bootstrap CI</title>',
             f'<rect x="{label_w}" y="8" width="12" height="10" fill="{BLUE}"/>'
             f'<text x="{label_w + 16}" y="17" font-size="11">FP32</text>',
             f'<rect x="{label_w + 70}" y="8" width="12" height="10" fill="{ORANGE}"/>'
             f'<text x="{label_w + 86}" y="17" font-size="11">quantized (whiskers: 95% CI)</text>']
    for i, (key, e) in enumerate(rows):
        y0 = top + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y0 + 19}" font-size="11" text-anchor="end" '
                     f'class="slice-label">{escape(key)}</text>')
        for j, (side, color) in enumerate((("fp32", BLUE), ("quantized", ORANGE))):
            v = e[side]
            if v is None:
                continue
            parts.append(f'<rect class="bar bar-{side}" x="{label_w}" y="{y0 + 3 + j * 13}" '
                         f'width="{x(v) - label_w:.1f}" height="12" fill="{color}" data-key="{escape(key)}" '
                         f'data-value="{v:.6f}"><title>{escape(key)} {side}: {v:.4f}</title></rect>')
        if e.get("ci_low") is not None and e["fp32"] is not None:
            lo, up = e["fp32"] + e["ci_low"], e["fp32"] + e["ci_high"]
            yc = y0 + 3 + 13 + 6
            parts.append(f'<g class="whisker" stroke="{GREY}" stroke-width="1.2"><line x1="{x(lo):.1f}" y1="{yc}" '
                         f'x2="{x(up):.1f}" y2="{yc}"/><line x1="{x(lo):.1f}" y1="{yc - 4}" x2="{x(lo):.1f}" '
                         f'y2="{yc + 4}"/><line x1="{x(up):.1f}" y1="{yc - 4}" x2="{x(up):.1f}" y2="{yc + 4}"/></g>')
        q = e["quantized"]
        parts.append(f'<text x="{x(max(v for v in (e["fp32"], q, 0) if v is not None)) + 6:.1f}" y="{y0 + 19}" '
                     f'font-size="10" fill="{GREY}">{"" if q is None else f"{q:.3f}"}</text>')
    axis_y = top + row_h * len(rows) + 4
    parts.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="{GREY}"/>')
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{label_w + plot_w * t:.1f}" y="{axis_y + 14}" font-size="10" '
                     f'text-anchor="middle">{hi * t:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def perf_bars_svg(card: dict) -> str:
    """Size and batch-1 latency, FP32 vs quantized."""
    perf = card["performance"]
    panels = [("file size (MB)", perf["size_bytes"]["fp32"] / 1e6, perf["size_bytes"]["quantized"] / 1e6),
              ("batch-1 p50 latency (ms)", perf["latency_p50_ms"]["fp32"], perf["latency_p50_ms"]["quantized"])]
    w, h = 260, 170
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart perf-chart" role="img" width="{2 * w}" '
             f'height="{h}" aria-label="size and latency, FP32 vs quantized">'
             '<title>Size and latency, FP32 vs quantized</title>']
    for p, (title, a, b) in enumerate(panels):
        x0, top_v = p * w, max(a, b, 1e-12)
        parts.append(f'<text x="{x0 + w / 2}" y="14" font-size="12" text-anchor="middle">{escape(title)}</text>')
        for j, (name, v, color) in enumerate((("FP32", a, BLUE), ("quantized", b, ORANGE))):
            bh = 100 * v / top_v
            bx = x0 + 50 + j * 90
            parts.append(f'<rect class="bar bar-perf" x="{bx}" y="{140 - bh:.1f}" width="60" height="{bh:.1f}" '
                         f'fill="{color}"><title>{name}: {v:.4f}</title></rect>'
                         f'<text x="{bx + 30}" y="{135 - bh:.1f}" font-size="10" text-anchor="middle">{v:.3f}</text>'
                         f'<text x="{bx + 30}" y="157" font-size="11" text-anchor="middle">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


STATUS_COLOR = {"passed": "#2E7D32", "failed": "#C62828", "inconclusive": "#EF6C00"}


def gate_intervals_svg(card: dict) -> str:
    """The gate's evidence at a glance: per change check, the degradation interval (positive = worse) with its
    point estimate, the check's tolerance as a tick, coloured by what the evidence says."""
    rows = [c for c in card["gates"]["checks"] if c.get("interval") and c.get("threshold") is not None
            and c["name"].startswith(("drop[", "slice_drop[", "fairness_increase["))]
    if not rows:
        return ""
    lo = min(min(c["interval"][0], c["threshold"]) for c in rows)
    hi = max(max(c["interval"][1], c["threshold"]) for c in rows)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = (hi - lo) * 0.05 or 0.01
    lo, hi = lo - pad, hi + pad
    label_w, plot_w, row_h, top = 330, 420, 20, 34
    height = top + row_h * len(rows) + 46

    def x(v: float) -> float:
        return label_w + plot_w * (v - lo) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart gate-chart" role="img" '
             f'width="{label_w + plot_w + 20}" height="{height}" aria-label="gate checks: degradation intervals">',
             '<title>Degradation interval per gate check (positive = worse), tolerance ticks</title>']
    for i, (status, color) in enumerate(STATUS_COLOR.items()):
        parts.append(f'<rect x="{label_w + i * 110}" y="8" width="12" height="10" fill="{color}"/>'
                     f'<text x="{label_w + 16 + i * 110}" y="17" font-size="11">{status}</text>')
    parts.append(f'<line x1="{x(0):.1f}" y1="{top - 6}" x2="{x(0):.1f}" y2="{top + row_h * len(rows)}" '
                 f'stroke="#999" stroke-dasharray="3,3"/>')
    for i, c in enumerate(rows):
        y = top + i * row_h + row_h / 2
        color = STATUS_COLOR.get(c.get("status"), GREY)
        name = c["name"]
        for prefix, new in (("slice_drop[", ""), ("fairness_increase[", "fairness "), ("drop[", "overall ")):
            if name.startswith(prefix):
                name = new + name[len(prefix):-1]
                break
        a, b = c["interval"]
        parts.append(f'<text x="{label_w - 6}" y="{y + 4}" font-size="10" text-anchor="end">{escape(name)}</text>'
                     f'<g class="gate-row" data-check="{escape(c["name"])}" data-status="{escape(str(c.get("status")))}">'
                     f'<line x1="{x(a):.1f}" y1="{y}" x2="{x(b):.1f}" y2="{y}" stroke="{color}" stroke-width="3"/>'
                     f'<circle cx="{x(c["value"]):.1f}" cy="{y}" r="3.5" fill="{color}"/>'
                     f'<line x1="{x(c["threshold"]):.1f}" y1="{y - 7}" x2="{x(c["threshold"]):.1f}" y2="{y + 7}" '
                     f'stroke="{GREY}" stroke-width="1.5"/>'
                     f'<title>{escape(c["name"])}: {escape(str(c.get("status")))}, degradation {c["value"]:+.4f}, '
                     f'interval [{a:+.4f}, {b:+.4f}], allowed {c["threshold"]}</title></g>')
    axis_y = top + row_h * len(rows) + 6
    parts.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="{GREY}"/>')
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        parts.append(f'<text x="{x(v):.1f}" y="{axis_y + 14}" font-size="10" text-anchor="middle">{v:+.2f}</text>')
    parts.append(f'<text x="{label_w + plot_w / 2}" y="{axis_y + 28}" font-size="10" text-anchor="middle">'
                 'degradation (positive = worse); black tick: allowed</text></svg>')
    return "".join(parts)


def qat_loss_svg(card: dict) -> str:
    """The QAT training loss per step (a polyline), with checkpoints and the resume point marked."""
    qat = card.get("qat") or {}
    losses = [v for v in (qat.get("training") or {}).get("losses") or [] if v is not None]
    if len(losses) < 2:
        return ""
    w, h, left, top, bottom = 640, 220, 60, 20, 40
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    n = len(losses)

    def pt(i: int, v: float) -> str:
        return f"{left + (w - left - 10) * i / (n - 1):.1f},{top + (h - top - bottom) * (hi - v) / span:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart qat-loss" role="img" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}"><title>QAT training loss per step</title>',
             f'<polyline fill="none" stroke="{BLUE}" stroke-width="1.5" points="'
             + " ".join(pt(i, v) for i, v in enumerate(losses)) + '"/>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="10" fill="{GREY}">{hi:.3g}</text>',
             f'<text x="{left - 6}" y="{h - bottom}" text-anchor="end" font-size="10" fill="{GREY}">{lo:.3g}</text>',
             f'<text x="{left}" y="{h - 12}" font-size="10" fill="{GREY}">step 1</text>',
             f'<text x="{w - 10}" y="{h - 12}" text-anchor="end" font-size="10" fill="{GREY}">step {n}</text>']
    resumed = (qat.get("training") or {}).get("resumed_from")
    if resumed:
        x = left + (w - left - 10) * (resumed - 1) / (n - 1)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - bottom}" stroke="{ORANGE}" '
                     f'stroke-dasharray="4,3"/><text x="{x + 4:.1f}" y="{top + 10}" font-size="10" fill="{ORANGE}">'
                     f'{escape("resumed")} at {int(resumed)}</text>')
    parts.append("</svg>")
    return "".join(parts)
