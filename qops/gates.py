"""Gates: an evaluation result and a gate spec give a verdict with one line per check.

Thresholds follow the spirit of TFMA / MLflow's ``MetricThreshold``: absolute bounds on the quantized
model, change bounds against the FP32 baseline, and per-slice overrides. A change check decides on
the point estimate or, with ``decision: bound``, on the pessimistic end of the paired bootstrap
confidence interval of the change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qops.evaluate import FAIRNESS_METRICS, higher_is_better


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str
    status: str = "checked"  # checked | insufficient_data
    kind: str = ""  # accuracy | fairness | performance


@dataclass
class GateResult:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    decision: str = "point"

    def message(self) -> str:
        if self.passed:
            return f"all {len(self.checks)} gate checks passed" + (
                f" ({len(self.warnings)} warning(s))" if self.warnings else "")
        lines = [f"{len(self.failed)} of {len(self.checks)} gate checks failed:"]
        lines += [f"  - {c.name}: {c.detail}" for c in self.checks if not c.passed]
        return "\n".join(lines)


def _as_dict(obj) -> dict:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    from qops.artifacts import to_jsonable

    return to_jsonable(obj)


def _worse(metric: str, entry: dict, decision: str) -> float | None:
    """Degradation of the quantized model (positive = worse): point, or the pessimistic CI bound."""
    if entry.get("delta") is None:
        return None
    d = entry["delta"]
    if decision == "bound" and entry.get("ci_low") is not None:
        d = entry["ci_low"] if higher_is_better(metric) else entry["ci_high"]
    return -d if higher_is_better(metric) else d


def _thresholds(g: dict) -> list[dict]:
    primary = {"metric": g["metric"], "max_drop": g["max_overall_drop"], "max_slice_drop": g["max_slice_drop"],
               "slice_overrides": g.get("slice_overrides") or {}, "min_value": None, "max_value": None}
    rest = [dict({"max_drop": None, "max_slice_drop": None, "slice_overrides": {}, "min_value": None,
                  "max_value": None}, **t) for t in g.get("thresholds") or []]
    return [primary] + rest


def gate(evaluation, spec) -> GateResult:
    """Apply the gates. ``evaluation``: EvaluationResult or its JSON; ``spec``: GateSpec or its dict."""
    ev, g = _as_dict(evaluation), _as_dict(spec)
    decision = g.get("decision", "point")
    how = "CI bound" if decision == "bound" else "point"
    checks: list[Check] = []
    warns: list[str] = []

    for t in _thresholds(g):
        m = t["metric"]
        if m not in ev["overall"]:
            checks.append(Check(f"metric[{m}]", False, None, None,
                                f"metric {m} was not evaluated (evaluated: {sorted(ev['overall'])})", kind="accuracy"))
            continue
        o = ev["overall"][m]
        if t["max_drop"] is not None:
            worse = _worse(m, o, decision)
            checks.append(Check(
                f"drop[{m}]", worse is not None and worse <= t["max_drop"] + 1e-12, _r(worse), t["max_drop"],
                f"{m} {_f(o['fp32'])} -> {_f(o['quantized'])} (change {_f(o['delta'], True)}, "
                f"95% CI [{_f(o['ci_low'], True)}, {_f(o['ci_high'], True)}]; degradation by {how} {_f(worse, True)}, "
                f"allowed {t['max_drop']})", kind="accuracy"))
        if t["min_value"] is not None:
            v = o["quantized"]
            checks.append(Check(f"min_value[{m}]", v is not None and v >= t["min_value"], _r(v), t["min_value"],
                                f"quantized {m} {_f(v)} (must be >= {t['min_value']})", kind="accuracy"))
        if t["max_value"] is not None:
            v = o["quantized"]
            checks.append(Check(f"max_value[{m}]", v is not None and v <= t["max_value"], _r(v), t["max_value"],
                                f"quantized {m} {_f(v)} (must be <= {t['max_value']})", kind="accuracy"))
        if t["max_slice_drop"] is None and not t["slice_overrides"]:
            continue
        for s in ev["slices"]:
            key, entry = s["key"], s["metrics"].get(m, {})
            bound = t["slice_overrides"].get(key, t["max_slice_drop"])
            if bound is None:
                continue
            name = f"slice_drop[{m}:{key}]"
            if s["n"] < g["min_slice_size"] or entry.get("delta") is None:
                fail = g.get("insufficient_data", "warn") == "fail"
                msg = (f"slice {key}: {s['n']} rows (< min_slice_size {g['min_slice_size']}) or {m} undefined: "
                       "insufficient data")
                warns.append(msg)
                checks.append(Check(name, not fail, None, bound, msg, "insufficient_data", kind="accuracy"))
                continue
            worse = _worse(m, entry, decision)
            checks.append(Check(
                name, worse <= bound + 1e-12, _r(worse), bound,
                f"{m} on {key} (n={s['n']}) {_f(entry['fp32'])} -> {_f(entry['quantized'])} "
                f"(change {_f(entry['delta'], True)}, 95% CI [{_f(entry['ci_low'], True)}, "
                f"{_f(entry['ci_high'], True)}]; degradation by {how} {_f(worse, True)}, allowed {bound})",
                kind="accuracy"))

    for dim, fm in ev.get("fairness", {}).items():
        for name in FAIRNESS_METRICS:
            if name not in g.get("fairness_metrics", FAIRNESS_METRICS):
                continue
            a, b = fm["fp32"].get(name), fm["quantized"].get(name)
            if a is None or b is None:
                continue
            inc = b - a
            checks.append(Check(
                f"fairness_increase[{name}:{dim}]", inc <= g["max_fairness_increase"] + 1e-12, _r(inc),
                g["max_fairness_increase"],
                f"{name} over {dim} {a:.4f} -> {b:.4f} (increase {inc:+.4f}, allowed {g['max_fairness_increase']})",
                kind="fairness"))
            if g.get("max_fairness_value") is not None:
                checks.append(Check(
                    f"fairness_value[{name}:{dim}]", b <= g["max_fairness_value"] + 1e-12, _r(b),
                    g["max_fairness_value"], f"quantized {name} over {dim} {b:.4f} (must be <= "
                    f"{g['max_fairness_value']})", kind="fairness"))

    perf = ev["performance"]
    lr, sr = perf["latency_ratio"], perf["size_ratio"]
    note = "" if ev.get("hardware_match", {}).get("matches") is not False else " [not on target hardware]"
    checks.append(Check(
        "latency_ratio", lr <= g["max_latency_ratio"], _r(lr), g["max_latency_ratio"],
        f"batch-1 p50 {perf['latency_p50_ms']['fp32']:.4f} ms -> {perf['latency_p50_ms']['quantized']:.4f} ms "
        f"(x{lr:.3f}, allowed x{g['max_latency_ratio']}){note}", kind="performance"))
    checks.append(Check(
        "size_ratio", sr <= g.get("max_size_ratio", 1.0), _r(sr), g.get("max_size_ratio", 1.0),
        f"{perf['size_bytes']['fp32']} -> {perf['size_bytes']['quantized']} bytes (x{sr:.3f}, allowed "
        f"x{g.get('max_size_ratio', 1.0)})", kind="performance"))
    failed = [c.name for c in checks if not c.passed]
    return GateResult(passed=not failed, checks=checks, failed=failed, warnings=warns, decision=decision)


def _r(v):
    return None if v is None else round(float(v), 6)


def _f(v, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.4f}" if signed else f"{v:.4f}"
