"""The recipe of a hardware target: a :class:`~qops.targets.placement.Placement` (hardware, runtime, execution
provider, device, worker queue) and one typed engine config (:mod:`qops.targets.configs`) holding only the options
its engine reads. Options are read through the recipe (``recipe.block_size`` is ``recipe.config.block_size``; an
option the engine does not have is an AttributeError naming the engine). Overrides (:meth:`Recipe.with_options`,
a spec's ``target_options``, ``--option``) are validated by pydantic against the option's type, then the whole
recipe is re-checked. :meth:`Recipe.to_dict` / :meth:`Recipe.from_dict` round-trip through the recipe JSON, whose
``version`` (and the config's ``config_version``) are checked on load."""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass
from difflib import get_close_matches
from typing import ClassVar, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from qops.errors import TargetError
from qops.targets import llm_configs  # noqa: F401  (registers the decoder configs)
from qops.targets.configs import CONFIGS, EngineConfig, Mode, Precision, QType, config_class, config_named
from qops.targets.placement import Placement

__all__ = ["Mode", "Precision", "QType", "Recipe", "coerce_option"]

RECIPE_VERSION = 3  # 3: placement + typed engine config; 2: one flat record of every engine's options
META_KEYS = ("target", "description", "version", "engine", "model_kind", "config", "config_version", "granularity",
             "qat")  # qat: a QAT result records its training scheme beside the recipe it was exported for


@dataclass(frozen=True)
class Recipe:
    """How to quantize for one hardware target: where it runs and its engine's config."""

    target: str
    description: str
    placement: Placement
    config: EngineConfig

    VERSION: ClassVar[int] = RECIPE_VERSION

    def __post_init__(self) -> None:
        problems = self.placement.problems() + self.config.problems()
        if problems:
            problem, fix = problems[0]
            raise TargetError(f"Target {self.target!r}: {problem}", fix)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("placement", "config"):
            raise AttributeError(name)
        for part in (self.placement, self.config):
            if name in type(part).model_fields:
                return getattr(part, name)
        raise AttributeError(f"Target {self.target!r}: {type(self.config).__name__} (engine {self.engine}) has no "
                             f"option {name!r}")

    @property
    def engine(self) -> str:
        return self.config.ENGINE

    @property
    def model_kind(self) -> str:
        return self.config.MODEL_KIND

    @property
    def needs_calibration(self) -> bool:
        return self.config.needs_calibration

    @property
    def granularity(self) -> str:
        return self.config.granularity

    @property
    def calibration_use(self) -> str:
        return self.config.calibration_use

    @property
    def output_suffix(self) -> str:
        """The artifact's suffix: ``.onnx``, ``.pt2``, ``.gguf``; ``""`` for a checkpoint folder."""
        return self.config.SUFFIX

    def has_option(self, name: str) -> bool:
        return name in self.option_types()

    def option_types(self) -> dict:
        """Every option this recipe takes (placement, then its engine config) and its type."""
        return {**{k: f.annotation for k, f in Placement.model_fields.items()},
                **{k: f.annotation for k, f in type(self.config).model_fields.items()}}

    def with_options(self, **options) -> "Recipe":
        """A copy with options overridden (e.g. from the spec's ``target_options``), re-validated."""
        hints = self.option_types()
        unknown = sorted(set(options) - set(hints))
        if unknown:
            owners = []
            for name in unknown:
                engines = sorted({c.ENGINE for c in CONFIGS.values() if name in c.model_fields})
                if engines:
                    owners.append(f"{name} is an option of {', '.join(engines)} targets")
            raise TargetError(
                f"Target {self.target!r}: unknown recipe option(s) {unknown} for its engine config "
                f"{type(self.config).__name__} (engine {self.engine})" + (f": {'; '.join(owners)}" if owners else "")
                + ".", "".join(f"did you mean {close[0]!r} for {name!r}? " for name in unknown
                               if (close := get_close_matches(name, list(hints), n=1)))
                + f"use its options: {sorted(hints)} (qops targets --json lists each target's options).")
        options = {k: coerce_option(self.target, k, v, hints[k]) for k, v in options.items()}
        placement = {k: v for k, v in options.items() if k in Placement.model_fields}
        config = {k: v for k, v in options.items() if k not in placement}
        return Recipe(self.target, self.description,
                      Placement(**{**dict(self.placement), **placement}) if placement else self.placement,
                      type(self.config)(**{**dict(self.config), **config}) if config else self.config)

    def to_dict(self) -> dict:
        return {"target": self.target, "description": self.description, "version": RECIPE_VERSION,
                "engine": self.engine, "model_kind": self.model_kind, "config": type(self.config).__name__,
                "config_version": self.config.VERSION, **self.placement.model_dump(mode="json"),
                **self.config.model_dump(mode="json"), "granularity": self.granularity}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """Read a recipe JSON back. Version 3 records are read strictly (an unknown key is an error); version 2
        records (every engine's options in one flat record) keep the options of their engine's config."""
        target = d.get("target", "?")
        if d.get("version", 1) > RECIPE_VERSION:
            raise TargetError(f"Target {target!r}: the recipe was written by a newer qops (recipe version "
                              f"{d['version']}; this qops reads up to {RECIPE_VERSION}).", "upgrade qops.")
        if "config" in d:
            config_cls = config_named(d["config"])
            if d.get("config_version", 1) > config_cls.VERSION:
                raise TargetError(f"Target {target!r}: {d['config']} version {d['config_version']} is newer than "
                                  f"this qops reads ({config_cls.VERSION}).", "upgrade qops.")
        else:
            config_cls = config_class(d.get("engine", "onnxruntime"), d.get("model_kind", "any"))
        if d.get("version", 1) >= RECIPE_VERSION:
            unknown = sorted(set(d) - set(META_KEYS) - set(Placement.model_fields) - set(config_cls.model_fields))
            if unknown:
                raise TargetError(f"Target {target!r}: unknown recipe key(s) {unknown} for {config_cls.__name__}.",
                                  f"use its options: {sorted(config_cls.model_fields)}.")

        def take(fields) -> dict:
            return {k: coerce_option(target, k, d[k], f.annotation) for k, f in fields.items() if k in d}

        return cls(target, d.get("description", ""), Placement(**take(Placement.model_fields)),
                   config_cls(**take(config_cls.model_fields)))


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])} (YAML list or comma-separated)"
        return f"a list of {len(args)} " + "/".join(_describe(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


def _prepare(value, tp):
    """What YAML and ``--option`` give, shaped for the field's type: comma-separated strings to lists (never
    split into characters), ``"8.9"`` to ``(8, 9)``, YAML 1.1's ``"1e-5"`` to a float and its on/off booleans back to
    ``"on"``/``"off"`` for fields that take those words; lists to tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for a in args:
            if a is not type(None) and (typing.get_origin(a) is tuple or a is float):
                return _prepare(value, a)
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if args and args[-1] is Ellipsis else \
                [int(v) if v.strip().lstrip("-").isdigit() else v for v in value.replace(",", ".").split(".") if v]
        return tuple(value) if isinstance(value, list) else value
    if tp is float and isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    if origin is typing.Literal and isinstance(value, bool) and {"on", "off"} <= set(args):
        return "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
    return value


@functools.lru_cache(maxsize=None)
def _adapter(tp) -> TypeAdapter:
    return TypeAdapter(tp, config=ConfigDict(strict=True, allow_inf_nan=False))


def coerce_option(target: str, name: str, value, tp):
    """One recipe option checked against its field type by pydantic (strict: no silent casts; finite numbers;
    lists accept YAML lists or comma-separated strings); the error names the option, the type and the fix."""
    try:
        return _adapter(tp).validate_python(_prepare(value, tp))
    except (ValidationError, TypeError, ValueError):
        raise TargetError(f"Target {target!r}: option {name}={value!r} is not {_describe(tp)}.",
                          f"set {name} to {_describe(tp)} (qops targets --json lists every recipe field).") from None
