"""Gates: an evaluation result and a gate spec give a verdict with one line per check."""

from __future__ import annotations

from dataclasses import dataclass, field

FAIRNESS_METRICS = ("demographic_parity_difference", "equalized_odds_difference")


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float
    detail: str
    status: str = "checked"  # checked | insufficient_data


@dataclass
class GateResult:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.passed:
            return f"all {len(self.checks)} gate checks passed"
        lines = [f"{len(self.failed)} of {len(self.checks)} gate checks failed:"]
        lines += [f"  - {c.name}: {c.detail}" for c in self.checks if not c.passed]
        return "\n".join(lines)


def _get(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def gate(evaluation, spec) -> GateResult:
    """Apply the gates. ``evaluation``: EvaluationResult or its JSON; ``spec``: GateSpec or its dict."""
    ev = evaluation if isinstance(evaluation, dict) else _asdict(evaluation)
    g = spec if isinstance(spec, dict) else spec.model_dump()
    metric = ev["metric"]
    f32, q = ev["fp32"], ev["quantized"]
    checks: list[Check] = []
    warns: list[str] = []

    drop = f32["overall"] - q["overall"]
    checks.append(Check(
        "overall_drop", drop <= g["max_overall_drop"] + 1e-12, round(drop, 6), g["max_overall_drop"],
        f"{metric} {f32['overall']:.4f} -> {q['overall']:.4f} (drop {drop:+.4f}, allowed {g['max_overall_drop']})",
    ))
    for key, s32 in f32["slices"].items():
        sq = q["slices"][key]
        if s32["n"] < g["min_slice_size"] or s32["value"] is None or sq["value"] is None:
            msg = f"slice {key}: {s32['n']} rows < min_slice_size {g['min_slice_size']}: insufficient data"
            warns.append(msg)
            checks.append(Check(f"slice_drop[{key}]", True, None, g["max_slice_drop"], msg, "insufficient_data"))
            continue
        d = s32["value"] - sq["value"]
        checks.append(Check(
            f"slice_drop[{key}]", d <= g["max_slice_drop"] + 1e-12, round(d, 6), g["max_slice_drop"],
            f"{metric} on {key} (n={s32['n']}) {s32['value']:.4f} -> {sq['value']:.4f} "
            f"(drop {d:+.4f}, allowed {g['max_slice_drop']})",
        ))
    for col, fm in f32["fairness"].items():
        for name in FAIRNESS_METRICS:
            a, b = fm.get(name), q["fairness"][col].get(name)
            if a is None or b is None:
                continue
            inc = b - a
            checks.append(Check(
                f"fairness_increase[{name}:{col}]", inc <= g["max_fairness_increase"] + 1e-12, round(inc, 6),
                g["max_fairness_increase"],
                f"{name} over {col} {a:.4f} -> {b:.4f} (increase {inc:+.4f}, allowed {g['max_fairness_increase']})",
            ))
    ratio = q["latency_p50_ms"] / f32["latency_p50_ms"] if f32["latency_p50_ms"] else float("inf")
    checks.append(Check(
        "latency_ratio", ratio <= g["max_latency_ratio"], round(ratio, 4), g["max_latency_ratio"],
        f"batch-1 p50 {f32['latency_p50_ms']:.4f} ms -> {q['latency_p50_ms']:.4f} ms "
        f"(x{ratio:.3f}, allowed x{g['max_latency_ratio']})",
    ))
    failed = [c.name for c in checks if not c.passed]
    return GateResult(passed=not failed, checks=checks, failed=failed, warnings=warns)


def _asdict(obj) -> dict:
    from qops.artifacts import to_jsonable

    return to_jsonable(obj)
