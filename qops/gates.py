"""Gates: an evaluation result and a gate spec give a verdict with one line per check.

Thresholds follow the spirit of TFMA / MLflow's ``MetricThreshold``: absolute bounds on the quantized
model, change bounds against the FP32 baseline, and per-slice overrides. Every change check ends
``passed`` (the evidence says the degradation is within its tolerance), ``failed`` (the evidence says it
exceeds it) or ``inconclusive`` (the interval straddles the tolerance); ``gates.inconclusive`` says what an
inconclusive check decides, separately for overall and for slice/fairness checks (``warn``, ``fail`` or
``point``). Slice and fairness checks of one target form a family whose harm tests are corrected for
multiplicity (Holm by default). The statistics live in :mod:`qops.stats`; docs/gates.md explains them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qops import stats
from qops.artifacts import to_jsonable
from qops.evaluate import FAIRNESS_METRICS, evaluate_with_gates, higher_is_better
from qops.spec import GateSpec


@dataclass
class Check:
    name: str
    passed: bool  # the decision, after the spec's policy for inconclusive checks
    value: float | None  # degradation (positive = worse) or, for absolute bounds, the quantized value
    threshold: float | None
    detail: str
    status: str = "passed"  # what the evidence says: passed | failed | inconclusive | insufficient_data
    kind: str = ""  # accuracy | fairness | performance
    family: str = "overall"  # overall | slices (multiplicity-corrected) | performance
    interval: list | None = None  # degradation interval at the spec's confidence (positive = worse)
    method: str | None = None  # how the interval was made
    p_harm: float | None = None  # one-sided p-value of "degradation <= tolerance"
    level: float | None = None  # the level p_harm was compared with (after multiplicity)
    flips: dict | None = None  # {"changed", "n", "worse", "better"}: predictions that changed
    detectable: float | None = None  # smallest degradation this check can fail on with these rows
    rows_needed: int | None = None  # rows needed to show a model with no changed prediction within tolerance
    protects: bool | None = None  # can this check pass at all (rows_needed met / interval narrow enough)?
    decided_by: str | None = None  # evidence | warn | fail | point | insufficient_data


@dataclass
class GateResult:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    decision: str = ""  # how inconclusive checks were decided
    inconclusive: list[str] = field(default_factory=list)
    multiplicity: dict = field(default_factory=dict)
    unprotected: list[dict] = field(default_factory=list)  # slices too small to protect their tolerance

    def message(self) -> str:
        extra = ""
        if self.inconclusive:
            extra = f"; {len(self.inconclusive)} inconclusive ({self.decision})"
        if self.passed:
            head = f"all {len(self.checks)} gate checks passed" + (
                f" ({len(self.warnings)} warning(s){extra})" if self.warnings else "")
            return head
        lines = [f"{len(self.failed)} of {len(self.checks)} gate checks failed{extra}:"]
        lines += [f"  - {c.name}: {c.detail}" for c in self.checks if not c.passed]
        return "\n".join(lines)


def _as_dict(obj) -> dict:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump()

    return to_jsonable(obj)


def _thresholds(g: dict) -> list[dict]:
    primary = {"metric": g["metric"], "max_drop": g["max_overall_drop"], "max_slice_drop": g["max_slice_drop"],
               "slice_overrides": g.get("slice_overrides") or {}, "min_value": None, "max_value": None}
    rest = [dict({"max_drop": None, "max_slice_drop": None, "slice_overrides": {}, "min_value": None,
                  "max_value": None}, **t) for t in g.get("thresholds") or []]
    return [primary] + rest


@dataclass
class _Pending:
    """A change check before the family's multiplicity correction."""

    check: Check
    tol: float
    degradation: float
    paired: dict | None = None  # {"n", "worse", "better"}
    se: float | None = None
    n: int | None = None
    slice_key: str | None = None


def _flip_text(f: dict | None) -> str:
    if not f or f.get("changed") is None:
        return ""
    s = f"{f['changed']} of {f['n']} predictions changed"
    if f.get("worse") is not None:
        s += f" ({f['worse']} now wrong, {f['better']} now right)"
    return s


def _change_check(name: str, metric: str, entry: dict, tol: float, kind: str, family: str, n: int,
                  flips: int | None, what: str, slice_key: str | None = None) -> _Pending | Check:
    d = entry.get("delta")
    if d is None:
        return Check(name, True, None, tol, f"{metric} {what}: undefined (no value for one of the models)",
                     status="insufficient_data", kind=kind, family=family, decided_by="insufficient_data")
    deg = -d if higher_is_better(metric) else d
    paired = entry.get("paired")
    fl = {"changed": flips, "n": n}
    if paired:
        fl.update(worse=paired["worse"], better=paired["better"])
    chk = Check(name, True, round(deg, 6), tol, "", kind=kind, family=family, flips=fl,
                method=entry.get("ci_method"))
    head = f"{metric} {what} {_f(entry['fp32'])} → {_f(entry['quantized'])}"
    chk.detail = head  # completed in _decide
    return _Pending(chk, tol, deg, paired=paired, se=entry.get("se"), n=n, slice_key=slice_key)


def gate(evaluation, spec) -> GateResult:
    """Apply the gates. ``evaluation``: EvaluationResult or its JSON; ``spec``: GateSpec or its dict."""
    ev = _as_dict(evaluation)
    # a plain dict (e.g. settings stored by an earlier version) gets GateSpec's defaults and its decision alias
    g = (spec if isinstance(spec, GateSpec) else GateSpec.model_validate(_as_dict(spec))).model_dump()
    conf = g["confidence"]
    alpha = (1 - conf) / 2  # each one-sided question is asked at this level
    policy = g["inconclusive"]
    method = g["multiplicity"]
    items: list[_Pending | Check] = []
    warns: list[str] = []

    for t in _thresholds(g):
        m = t["metric"]
        if m not in ev["overall"]:
            items.append(Check(f"metric[{m}]", False, None, None,
                               f"metric {m} was not evaluated (evaluated: {sorted(ev['overall'])})",
                               status="failed", kind="accuracy", decided_by="evidence"))
            continue
        o = ev["overall"][m]
        if t["max_drop"] is not None:
            items.append(_change_check(f"drop[{m}]", m, o, t["max_drop"], "accuracy", "overall", ev["rows"],
                                       ev.get("flips"), "overall"))
        for bound_name, bound in (("min_value", t["min_value"]), ("max_value", t["max_value"])):
            if bound is not None:
                items.append(_absolute_check(f"{bound_name}[{m}]", m, o, bound, bound_name == "min_value", conf,
                                             policy["overall"]))
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
                items.append(Check(name, not fail, None, bound, msg, "insufficient_data", kind="accuracy",
                                   family="slices", decided_by="insufficient_data"))
                continue
            items.append(_change_check(name, m, entry, bound, "accuracy", "slices", s["n"], s.get("flips"),
                                       f"on {key} (n={s['n']})", slice_key=key))

    for dim, fm in ev.get("fairness", {}).items():
        for name in FAIRNESS_METRICS:
            if name not in g.get("fairness_metrics", FAIRNESS_METRICS):
                continue
            a, b = fm["fp32"].get(name), fm["quantized"].get(name)
            if a is None or b is None:
                continue
            se = (fm.get("increase_se") or {}).get(name)
            tol = g["max_fairness_increase"]
            n = fm.get("rows")
            chk = Check(f"fairness_increase[{name}:{dim}]", True, round(b - a, 6), tol,
                        f"{name} over {dim} {a:.4f} → {b:.4f}", kind="fairness", family="slices",
                        flips={"changed": fm.get("flips"), "n": n},
                        method=None if se is None else "paired bootstrap standard error, normal interval")
            items.append(_Pending(chk, tol, b - a, se=se, n=n))
            if g.get("max_fairness_value") is not None:
                items.append(Check(
                    f"fairness_value[{name}:{dim}]", b <= g["max_fairness_value"] + 1e-12, _r(b),
                    g["max_fairness_value"], f"quantized {name} over {dim} {b:.4f} (must be <= "
                    f"{g['max_fairness_value']})", status="passed" if b <= g["max_fairness_value"] + 1e-12
                    else "failed", kind="fairness", family="slices", decided_by="evidence"))

    pending = [i for i in items if isinstance(i, _Pending)]
    families: dict[str, list[_Pending]] = {}
    for p in pending:
        families.setdefault(p.check.family, []).append(p)
    family_sizes = {}
    for fam, members in families.items():
        pvals = [_p_harm(p) for p in members]
        fam_method = method if fam == "slices" else "none"
        adj = stats.adjust(pvals, alpha, fam_method)
        family_sizes[fam] = sum(1 for p in pvals if p is not None)
        strictest = alpha / max(family_sizes[fam], 1) if fam_method != "none" else alpha
        for p, pv, a in zip(members, pvals, adj):
            _decide(p, pv, a, alpha, strictest, conf, policy[fam if fam in policy else "overall"])

    checks = [i.check if isinstance(i, _Pending) else i for i in items]
    checks += _performance(ev, g)
    inconclusive = [c.name for c in checks if c.status == "inconclusive"]
    for c in checks:
        if c.status == "inconclusive" and c.passed:
            warns.append(f"{c.name}: inconclusive, passed with a warning — {c.detail}")
    unprotected = [
        {"check": c.name, "slice": p.slice_key, "n": p.n, "tolerance": p.tol, "detectable": c.detectable,
         "rows_needed": c.rows_needed}
        for p in pending for c in [p.check] if p.slice_key is not None and c.protects is False]
    failed = [c.name for c in checks if not c.passed]
    return GateResult(
        passed=not failed, checks=checks, failed=failed, warnings=warns,
        decision=f"inconclusive overall checks: {policy['overall']}; inconclusive slice/fairness checks: "
                 f"{policy['slices']}",
        inconclusive=inconclusive,
        multiplicity={"method": method, "family": "slice and fairness change checks of this target",
                      "family_size": family_sizes.get("slices", 0), "alpha_one_sided": alpha, "confidence": conf,
                      "note": "harm tests (degradation > tolerance) corrected; passing every check of the family is "
                              "an intersection-union test and needs no correction"},
        unprotected=unprotected,
    )


def _p_harm(p: _Pending) -> float | None:
    if p.paired:
        return stats.tango_p_harm(p.paired["worse"], p.paired["better"], p.paired["n"], p.tol)
    if p.se is not None:
        return stats.normal_p_harm(p.degradation, p.se, p.tol)
    return None


def _decide(p: _Pending, p_harm: float | None, adj, alpha: float, strictest: float, conf: float,
            policy: str) -> None:
    c, tol, deg = p.check, p.tol, p.degradation if abs(p.degradation) > 1e-12 else 0.0
    z = stats.norm_ppf(1 - alpha)
    if p.paired:
        w, b, n = p.paired["worse"], p.paired["better"], p.paired["n"]
        lo, hi = stats.tango_interval(w, b, n, conf)
        p_within = stats.tango_p_within(w, b, n, tol)
        k = stats.detectable_flips(n, tol, strictest)
        c.detectable = None if k is None else round(k / n, 4)
        c.rows_needed = stats.rows_to_protect(tol, alpha)
        c.protects = c.rows_needed is not None and n >= c.rows_needed
        detect_txt = (f"with {n} rows it fails only at a drop ≥ {k / n:.4f} ({k} of {n} turned wrong)"
                      if k is not None else f"with {n} rows no drop can fail it")
        protect_txt = ("" if c.protects else f"; {c.rows_needed or 'unbounded'} rows needed to show a drop "
                       f"≤ {tol} when nothing changes")
    elif p.se is not None:
        lo, hi = deg - z * p.se, deg + z * p.se
        p_within = stats.normal_p_within(deg, p.se, tol)
        c.detectable = round(tol + stats.norm_ppf(1 - strictest) * p.se, 4)
        c.protects = z * p.se <= tol
        detect_txt = f"fails only at a change ≥ {c.detectable:.4f} (bootstrap se {p.se:.4f})"
        protect_txt = "" if c.protects else f"; its interval is too wide to show a change ≤ {tol} even at 0"
    else:  # no resamples (bootstrap: 0): no evidence of harm, so it can pass on the point but never fail
        lo = hi = deg
        p_within = 0.0 if deg <= tol + 1e-12 else 1.0
        detect_txt, protect_txt = "no interval (bootstrap off): decided on the point estimate or the policy", ""
    c.interval = [round(lo, 6), round(hi, 6)]
    c.p_harm = None if p_harm is None else round(p_harm, 6)
    c.level = None if adj is None else adj.level
    if adj is not None and adj.rejected and deg > tol:
        c.status = "failed"
    elif p_within <= alpha or hi <= tol + 1e-12:
        c.status = "passed"
    else:
        c.status = "inconclusive"
    if c.status == "inconclusive":
        c.decided_by = policy
        c.passed = policy == "warn" or (policy == "point" and deg <= tol + 1e-12)
    else:
        c.decided_by = "evidence"
        c.passed = c.status == "passed"
    flips = _flip_text(c.flips)
    level = "" if c.level is None else f", harm test p={c.p_harm:.3g} vs level {c.level:.3g}"
    verdict = {"passed": "within tolerance", "failed": "exceeds tolerance",
               "inconclusive": f"inconclusive ({policy}: {'passed' if c.passed else 'failed'})"}[c.status]
    if c.status == "passed":
        protect_txt = ""
    c.value = round(deg, 6) + 0.0
    c.detail = (f"{c.detail}{': ' + flips if flips else ''}; degradation {deg:+.4f}, {conf:.0%} interval "
                f"[{lo:+.4f}, {hi:+.4f}]{level}; allowed {tol}: {verdict}; {detect_txt}{protect_txt}")


def _absolute_check(name: str, metric: str, o: dict, bound: float, is_min: bool, conf: float,
                    policy: str) -> Check:
    v = o.get("quantized")
    if v is None:
        return Check(name, False, None, bound, f"quantized {metric} undefined", status="failed",
                     kind="accuracy", decided_by="evidence")
    paired = o.get("paired")
    if paired:
        lo, hi = stats.wilson_interval(paired["quantized_hits"], paired["n"], conf)
        how = "Wilson interval"
    elif o.get("quantized_se") is not None:
        z = stats.norm_ppf(1 - (1 - conf) / 2)
        lo, hi = v - z * o["quantized_se"], v + z * o["quantized_se"]
        how = "bootstrap interval"
    else:
        lo = hi = v
        how = "no interval"
    ok_point = v >= bound - 1e-12 if is_min else v <= bound + 1e-12
    if (lo >= bound - 1e-12) if is_min else (hi <= bound + 1e-12):
        status = "passed"
    elif (hi < bound) if is_min else (lo > bound):
        status = "failed"
    else:
        status = "inconclusive"
    passed = status == "passed" or (status == "inconclusive" and (policy == "warn" or
                                                                  (policy == "point" and ok_point)))
    rel = "≥" if is_min else "≤"
    return Check(name, passed, _r(v), bound,
                 f"quantized {metric} {_f(v)}, {conf:.0%} {how} [{lo:.4f}, {hi:.4f}] (must be {rel} {bound}): "
                 f"{status}" + (f" ({policy}: {'passed' if passed else 'failed'})" if status == "inconclusive"
                                else ""),
                 status=status, kind="accuracy", interval=[round(lo, 6), round(hi, 6)], method=how,
                 decided_by=policy if status == "inconclusive" else "evidence")


def _performance(ev: dict, g: dict) -> list[Check]:
    perf = ev["performance"]
    lr, sr = perf["latency_ratio"], perf["size_ratio"]
    note = "" if ev.get("hardware_match", {}).get("matches") is not False else " [not on target hardware]"
    out = []
    ok = lr <= g["max_latency_ratio"]
    out.append(Check(
        "latency_ratio", ok, _r(lr), g["max_latency_ratio"],
        f"batch-1 p50 {perf['latency_p50_ms']['fp32']:.4f} ms → {perf['latency_p50_ms']['quantized']:.4f} ms "
        f"(x{lr:.3f}, allowed x{g['max_latency_ratio']}){note}", status="passed" if ok else "failed",
        kind="performance", family="performance", decided_by="evidence"))
    ok = sr <= g.get("max_size_ratio", 1.0)
    out.append(Check(
        "size_ratio", ok, _r(sr), g.get("max_size_ratio", 1.0),
        f"{perf['size_bytes']['fp32']} → {perf['size_bytes']['quantized']} bytes (x{sr:.3f}, allowed "
        f"x{g.get('max_size_ratio', 1.0)})", status="passed" if ok else "failed", kind="performance",
        family="performance", decided_by="evidence"))
    return out


def _r(v):
    return None if v is None else round(float(v), 6)


def _f(v, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def gate_judge(fp32_model, validation, label, gates, *, slice_columns=None, features=None, intersections=None,
               latency_runs: int = 200, bootstrap: int = 200) -> Callable[[object], dict]:
    """The tuner's usual judge (:func:`qops.quantize.tune.tune` takes any ``QuantizeResult -> dict`` callable):
    :func:`qops.evaluate.evaluate_with_gates` on the validation set (fewer resamples and timed runs than the
    evaluate stage) and :func:`gate` with the given GateSpec."""
    def judge(res) -> dict:
        ev = evaluate_with_gates(fp32_model, res.model_path, validation, gates, label=label,
                                 slice_columns=slice_columns or [], intersections=intersections, features=features,
                                 target=res.recipe, latency_runs=latency_runs, bootstrap=bootstrap)
        verdict = gate(ev, gates)
        primary = ev.overall[ev.primary_metric]
        failing = [c.name.split(":", 1)[1][:-1] for c in verdict.checks
                   if c.name.startswith("slice_drop[") and (not c.passed or c.status == "failed")]
        return {"passed": verdict.passed, "failing_slices": list(dict.fromkeys(failing)),
                "max_latency_ratio": gates.max_latency_ratio,
                "failures": [f"{c.name}: {c.detail}" for c in verdict.checks if not c.passed],
                "latency_ratio": ev.performance["latency_ratio"], "size_ratio": ev.performance["size_ratio"],
                "fidelity": ev.fidelity,
                "metrics": {ev.primary_metric: {"fp32": primary["fp32"], "quantized": primary["quantized"]}}}

    return judge
