"""``qops spec validate``: check a spec file without running anything, and list every problem at once (the loader
stops at the first): the spec's fields (unknown ones with the closest known name), its targets (the registry) and
their recipe options (the typed engine configs), and its local data and model paths. URIs (``models:/``,
``s3://``...) are listed as remote, not checked. Last, the loader ``qops run`` uses reads the spec, so nothing it
would refuse passes here."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path

from pydantic import BaseModel, ValidationError

from qops.errors import QopsError
from qops.spec import is_remote, load_spec, read_spec_file, resolve_path
from qops.spec.pipeline import PipelineSpec
from qops.targets import get_target

SCHEMA_HINT = "see docs/spec.md, or the JSON Schema (qops spec schema)"


@dataclass
class Problem:
    where: str
    problem: str
    fix: str
    path: str | None = None  # a local path that is missing: where it was looked for

    def __str__(self) -> str:
        return f"{self.where}: {self.problem.rstrip('.')}. Fix: {self.fix}"


@dataclass
class SpecCheck:
    spec: str
    name: str | None = None
    targets: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)  # where -> the local path that exists
    remote: dict[str, str] = field(default_factory=dict)  # where -> a URI, not checked
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"spec": self.spec, "ok": self.ok, "name": self.name, "targets": self.targets, "paths": self.paths,
                "remote": self.remote, "problems": [{"where": p.where, "problem": p.problem, "fix": p.fix,
                                                     **({"path": p.path} if p.path else {})} for p in self.problems]}


def check_spec(path: str | os.PathLike) -> SpecCheck:
    """Every problem of the spec file at ``path`` (an empty list: ``qops run`` would accept it)."""
    out = SpecCheck(str(path))
    try:
        raw, base = read_spec_file(path)
    except QopsError as e:
        out.problems.append(Problem("file", e.problem, e.fix or SCHEMA_HINT))
        return out
    out.name = raw.get("name") if isinstance(raw.get("name"), str) else None
    bad = _check_targets(raw, out)
    _check_fields(_without(raw, bad), out)
    _check_paths(raw, base, out)
    if out.ok:  # the loader of qops run, as the last word (cross-section rules after path resolution)
        try:
            load_spec(path)
        except QopsError as e:
            out.problems.append(Problem("spec", e.problem, e.fix or SCHEMA_HINT))
    return out


def _check_targets(raw: dict, out: SpecCheck) -> set[str]:
    """Unknown targets and invalid recipe options, each named; returns the targets that failed."""
    targets, options = raw.get("targets"), raw.get("target_options")
    if not isinstance(targets, list):
        return set()  # the field check names it
    options = options if isinstance(options, dict) else {}
    bad = set()
    for i, t in enumerate(targets):
        if not isinstance(t, str):
            continue
        out.targets.append(t)
        try:
            get_target(t)
        except QopsError as e:
            out.problems.append(Problem(f"targets[{i}]", e.problem, e.fix or "run `qops targets`"))
            bad.add(t)
            continue
        if isinstance(options.get(t), dict) and options[t]:
            try:
                get_target(t, options[t])
            except (QopsError, ValueError) as e:
                problem, fix = (e.problem, e.fix) if isinstance(e, QopsError) else (str(e), None)
                out.problems.append(Problem(f"target_options.{t}", problem,
                                            fix or "qops targets --json lists each target's options"))
                bad.add(t)
    return bad


def _without(raw: dict, bad: set[str]) -> dict:
    """``raw`` without the targets already reported (so the field check does not stop at them again); as given
    when no target is left (then the field check's own target errors are dropped as repeats)."""
    targets = raw.get("targets")
    if not bad or not isinstance(targets, list) or not [t for t in targets if t not in bad]:
        return raw
    trimmed = {**raw, "targets": [t for t in targets if t not in bad]}
    for key in ("target_options", "target_gates"):
        if isinstance(raw.get(key), dict):
            trimmed[key] = {k: v for k, v in raw[key].items() if k not in bad}
    for key in ("tuning", "qat"):
        section = raw.get(key)
        if isinstance(section, dict) and isinstance(section.get("targets"), (list, dict)):
            kept = section["targets"]
            kept = {k: v for k, v in kept.items() if k not in bad} if isinstance(kept, dict) else [
                t for t in kept if t not in bad]
            trimmed[key] = {**section, "targets": kept}
    return trimmed


def _check_fields(raw: dict, out: SpecCheck) -> None:
    reported = {p.problem for p in out.problems}
    try:
        PipelineSpec.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            out.problems.append(_field_problem(err))
    except QopsError as e:  # an unknown target, raised unwrapped by the model's validator
        if e.problem not in reported:
            out.problems.append(Problem("targets", e.problem, e.fix or "run `qops targets`"))


def _field_problem(err: dict) -> Problem:
    loc = tuple(err["loc"])
    where = ".".join(str(x) for x in loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = get_close_matches(str(loc[-1]), known, n=1)
        return Problem(where, f"unknown field {loc[-1]!r}",
                       (f"did you mean {close[0]!r}? " if close else "") + "remove it or correct its spelling"
                       + (f" (fields here: {', '.join(known)})" if known else f"; {SCHEMA_HINT}"))
    if err["type"] == "missing":
        return Problem(where, f"the required field {loc[-1]!r} is missing", f"add {where}; {SCHEMA_HINT}")
    fix = msg.split(" Fix: ", 1)[1] if " Fix: " in msg else SCHEMA_HINT
    return Problem(where, msg.split(" Fix: ", 1)[0], fix)


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the spec section at ``loc`` (empty when it is not a section)."""
    model, keyed = PipelineSpec, False
    for key in loc:
        if isinstance(key, int) or (keyed and key not in model.model_fields):
            keyed = False  # a list index or a mapping key (a target name): same model below it
            continue
        info = model.model_fields.get(key)
        if info is None:
            return []
        found = _model_in(info.annotation)
        if found is None:
            return []
        model, keyed = found, typing.get_origin(info.annotation) is dict
    return list(model.model_fields)


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# (where in the spec, what it must be): the local paths a run reads; artifact_root is created, not read
PATHS = (("source_model", "any"), ("data.pool", "file"), ("data.reference", "file"), ("data.validation", "file"),
         ("data.text.tokenizer", "folder"), ("data.causal_lm.tokenizer", "folder"), ("data.image.root", "folder"),
         ("qat.data", "file"), ("qat.program", "file"), ("qlora.data", "file"))


def _check_paths(raw: dict, base: Path, out: SpecCheck) -> None:
    for where, kind in PATHS:
        value = raw
        for key in where.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, str) or not value:
            continue
        if is_remote(value):
            out.remote[where] = value
            continue
        p = Path(resolve_path(value, base))
        wrong = not p.exists() or (kind == "file" and not p.is_file()) or (kind == "folder" and not p.is_dir())
        if wrong:
            what = "does not exist" if not p.exists() else f"is not a {kind}"
            remote = {"file": "; a remote table is an s3:// URI", "any": "; a registered model is models:/NAME@ALIAS"}
            out.problems.append(Problem(where, f"{value} {what}" + (f" (resolved to {p})" if str(p) != value
                                                                   else ""),
                                        "create it, or correct the path (a relative path resolves against the "
                                        f"spec's folder){remote.get(kind, '')}", str(p)))
        else:
            out.paths[where] = str(p)
