"""The target registry: targets registered by a function (decorator :func:`register_target`) or from the
``qops.targets`` entry-point group, so users add their own without patching qops."""

from __future__ import annotations

from difflib import get_close_matches
from importlib.metadata import entry_points
from typing import Callable

from qops.errors import TargetError
from qops.targets.recipe import Recipe

_REGISTRY: dict[str, Callable[[], Recipe]] = {}


_ENTRY_POINTS_LOADED = False


def register_target(name: str) -> Callable[[Callable[[], Recipe]], Callable[[], Recipe]]:
    """Decorator: register a function returning the :class:`Recipe` of target ``name``."""

    def deco(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
        _REGISTRY[name] = fn
        return fn

    return deco


def unregister_target(name: str) -> None:
    """Remove a registered target (tests, and plugins that replace a built-in target under its name)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="qops.targets"):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def list_targets() -> dict[str, Recipe]:
    _load_entry_points()
    return {name: fn() for name, fn in sorted(_REGISTRY.items())}


def get_target(name: str, options: dict | None = None) -> Recipe:
    """The recipe of target ``name``, with ``options`` (recipe fields) overridden when given."""
    _load_entry_points()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        close = get_close_matches(str(name), list(_REGISTRY), n=1)
        raise TargetError(
            f"Unknown hardware target {name!r}.",
            (f"did you mean {close[0]!r}? " if close else "") + f"use one of: {known} (run `qops targets`), or "
            "register your own with "
            "qops.targets.register_target / the 'qops.targets' entry-point group.",
        )
    recipe = _REGISTRY[name]()
    if not isinstance(recipe, Recipe) or recipe.target != name:
        raise TargetError(f"Target function for {name!r} returned {getattr(recipe, 'target', recipe)!r}, "
                          "not a Recipe of that name.", "make the function return Recipe(target=<its name>, ...).")
    return recipe.with_options(**options) if options else recipe
