"""The card's front matter as a typed object: what ``card.md``'s YAML block carries, written and read back by one class.

After huggingface_hub's ``ModelCardData``: the Hugging Face metadata (``base_model``, ``base_model_relation``,
``library_name``, ``license``, ``tags``, ``model-index`` results) plus qops' own ``qops:`` block (card schema
version, gate verdict). ``CardData.from_card(card)`` derives it from the card data, ``to_yaml()`` writes it, and
``CardData.load(path_or_text)`` parses a card's front matter back, so that
``CardData.load(card_md) == CardData.from_card(card)``. A field the front matter lacks loads as ``None`` (tags and
results as empty tuples); top-level keys qops does not write (``language``, say, added on the Hub) are kept in
``extra`` and written back; unknown keys inside ``model-index`` and ``qops:`` are ignored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qops.errors import DataError

# the Hub's pattern for the block (huggingface_hub.repocard.REGEX_YAML_BLOCK), "---" lines around YAML at the top,
# here also matching an empty block
YAML_BLOCK = re.compile(r"^\s*---(?:\r\n|\r|\n)(?:([\S\s]*?)(?:\r\n|\r|\n))?---[ \t]*(?:\r\n|\n|$)")
GATE_VERDICTS = ("passed", "failed")
FIX = ("correct the YAML block between the '---' lines at the top of card.md, or write the card again "
       "(qops card --spec S --run-id R --target T).")
KNOWN = ("base_model", "base_model_relation", "library_name", "license", "tags", "model-index", "qops")


@dataclass(frozen=True)
class Metric:
    """One ``model-index`` metric: its type (``accuracy``), value and display name."""

    type: str
    value: float
    name: str | None = None

    def to_dict(self) -> dict:
        return {"type": self.type, **({"name": self.name} if self.name is not None else {}), "value": self.value}


@dataclass(frozen=True)
class EvalResult:
    """One ``model-index`` result: a task evaluated on a dataset, with its metrics."""

    task_type: str | None = None
    dataset_name: str | None = None
    dataset_type: str | None = None
    metrics: tuple[Metric, ...] = ()

    def to_dict(self) -> dict:
        dataset = {k: v for k, v in (("name", self.dataset_name), ("type", self.dataset_type)) if v is not None}
        return {**({"task": {"type": self.task_type}} if self.task_type is not None else {}),
                **({"dataset": dataset} if dataset else {}), "metrics": [m.to_dict() for m in self.metrics]}


@dataclass(frozen=True)
class CardData:
    """The front matter of a qops model card. ``None`` fields are left out of the YAML."""

    model_name: str | None = None
    base_model: str | None = None
    base_model_relation: str | None = None
    library_name: str | None = None
    license: str | None = None
    tags: tuple[str, ...] = ()
    results: tuple[EvalResult, ...] = ()
    card_schema: str | None = None
    gate: str | None = None  # "passed" or "failed"
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def gate_passed(self) -> bool | None:
        return None if self.gate is None else self.gate == "passed"

    @classmethod
    def from_card(cls, card: dict) -> CardData:
        """The front matter of a card built by ``qops.cards.build_card_data``."""
        ov = card["quantitative_analyses"]["overall"]
        q = card["quantization"]
        target = q["hardware_target"]
        task = card["metrics"]["task"]
        metrics = tuple(Metric(type=m, name=f"{m} (quantized, {target})", value=v["quantized"])
                        for m, v in ov.items() if v["quantized"] is not None)
        result = EvalResult(task_type="text-generation" if task == "causal_lm" else f"tabular-{task}",
                            dataset_name="validation", dataset_type=card["pipeline"], metrics=metrics)
        return cls(model_name=card["model_details"]["name"], base_model=card["model_details"]["source"]["uri"],
                   base_model_relation="quantized", library_name=q["runtime"],
                   tags=("qops", "quantized", target, q["precision"]), results=(result,),
                   card_schema=card["schema_version"], gate="passed" if card["gates"]["passed"] else "failed")

    def to_dict(self) -> dict:
        """The front matter as Hugging Face lays it out (``model-index`` nests the results under the model name)."""
        out: dict[str, Any] = {k: v for k, v in (
            ("base_model", self.base_model), ("base_model_relation", self.base_model_relation),
            ("library_name", self.library_name), ("license", self.license)) if v is not None}
        if self.tags:
            out["tags"] = list(self.tags)
        if self.model_name is not None or self.results:
            out["model-index"] = [{**({"name": self.model_name} if self.model_name is not None else {}),
                                   "results": [r.to_dict() for r in self.results]}]
        qops = {k: v for k, v in (("card_schema", self.card_schema), ("gate", self.gate)) if v is not None}
        if qops:
            out["qops"] = qops
        return {**out, **self.extra}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def to_front_matter(self) -> str:
        """The YAML block with its ``---`` lines, as ``card.md`` starts."""
        return "---\n" + self.to_yaml() + "---\n"

    @classmethod
    def load(cls, path_or_text: str | os.PathLike) -> CardData:
        """Parse a card's front matter: a path (``os.PathLike``, or a one-line ``str``) or the Markdown itself.
        Raises ``DataError`` (exit 2) when the file is unreadable, has no front matter, or a field has the wrong
        type."""
        where = "card text"
        if isinstance(path_or_text, os.PathLike) or "\n" not in path_or_text:
            where = str(path_or_text)
            try:
                path_or_text = Path(path_or_text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"Cannot read the model card {where}: {e}.", "pass the path of a card.md (or its "
                                "text) that qops wrote.") from None
        return cls.from_dict(parse_front_matter(path_or_text, where), where)

    @classmethod
    def from_dict(cls, meta: dict, where: str = "card text") -> CardData:
        """The object of a front matter already parsed into a dict (checked field by field)."""
        index = _list(meta, "model-index", where)
        if len(index) > 1:
            raise DataError(f"{where}: the front matter's model-index has {len(index)} entries; a qops card has one.",
                            FIX)
        model = _check(index[0], dict, "model-index[0]", "a mapping", where) if index else {}
        results = tuple(_result(r, f"model-index[0].results[{i}]", where)
                        for i, r in enumerate(_list(model, "results", where, "model-index[0].")))
        qops = _dict(meta, "qops", where)
        gate = _str(qops, "gate", where, "qops.")
        if gate is not None and gate not in GATE_VERDICTS:
            raise DataError(f"{where}: the front matter's qops.gate is {gate!r}, not 'passed' or 'failed'.", FIX)
        tags = _list(meta, "tags", where)
        for i, t in enumerate(tags):
            _check(t, str, f"tags[{i}]", "a string", where)
        return cls(model_name=_str(model, "name", where, "model-index[0]."), base_model=_str(meta, "base_model", where),
                   base_model_relation=_str(meta, "base_model_relation", where),
                   library_name=_str(meta, "library_name", where), license=_str(meta, "license", where),
                   tags=tuple(tags), results=results, card_schema=_str(qops, "card_schema", where, "qops."),
                   gate=gate, extra={k: v for k, v in meta.items() if k not in KNOWN})


def parse_front_matter(text: str, where: str = "card text") -> dict:
    """The YAML block at the top of a Markdown card, as a dict (``yaml.safe_load``: no Python objects)."""
    match = YAML_BLOCK.match(text)
    if not match:
        raise DataError(f"{where} has no YAML front matter (a block between '---' lines at the top).",
                        "pass a card.md that qops wrote; card.json holds the full card data.")
    try:
        meta = yaml.safe_load(match.group(1) or "")
    except yaml.YAMLError as e:
        raise DataError(f"{where}: the front matter is not valid YAML: {' '.join(str(e).split())}", FIX) from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: the front matter is a {type(meta).__name__}, not a mapping of fields.", FIX)
    return meta


def _check(value: Any, kind: type | tuple[type, ...], name: str, what: str, where: str) -> Any:
    """``value`` if it is a ``kind`` (never a bool: YAML's ``true`` is no number), else a ``DataError`` naming it."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: the front matter's {name} must be {what}, not {type(value).__name__} "
                        f"({value!r:.60}).", FIX)
    return value


def _str(d: dict, key: str, where: str, prefix: str = "") -> str | None:
    v = d.get(key)
    return None if v is None else _check(v, str, prefix + key, "a string", where)


def _list(d: dict, key: str, where: str, prefix: str = "") -> list:
    v = d.get(key)
    return [] if v is None else _check(v, list, prefix + key, "a list", where)


def _dict(d: dict, key: str, where: str, prefix: str = "") -> dict:
    v = d.get(key)
    return {} if v is None else _check(v, dict, prefix + key, "a mapping", where)


def _result(r: Any, name: str, where: str) -> EvalResult:
    _check(r, dict, name, "a mapping", where)
    task, dataset = _dict(r, "task", where, name + "."), _dict(r, "dataset", where, name + ".")
    metrics = []
    for i, m in enumerate(_list(r, "metrics", where, name + ".")):
        at = f"{name}.metrics[{i}]"
        _check(m, dict, at, "a mapping", where)
        for key in ("type", "value"):
            if m.get(key) is None:
                raise DataError(f"{where}: the front matter's {at} has no {key}.", FIX)
        metrics.append(Metric(type=_str(m, "type", where, at + "."), name=_str(m, "name", where, at + "."),
                              value=_check(m["value"], (int, float), at + ".value", "a number", where)))
    return EvalResult(task_type=_str(task, "type", where, name + ".task."),
                      dataset_name=_str(dataset, "name", where, name + ".dataset."),
                      dataset_type=_str(dataset, "type", where, name + ".dataset."), metrics=tuple(metrics))
