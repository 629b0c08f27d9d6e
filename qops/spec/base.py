"""What every spec section shares: unknown keys are errors, and ``${VAR}`` / ``${VAR:-default}`` in strings."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from qops.errors import SpecError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None or value == "":
            if default is None:
                raise SpecError(
                    f"The spec uses ${{{name}}} but the environment variable {name} is not set.",
                    f"export {name}=... or write ${{{name}:-default}} in the spec.",
                )
            return default
        return value

    return _VAR.sub(repl, text)


def expand_tree(node):
    """Expand ${VAR} in every string value of the parsed YAML (comments are never expanded)."""
    if isinstance(node, str):
        return expand_vars(node)
    if isinstance(node, list):
        return [expand_tree(v) for v in node]
    if isinstance(node, dict):
        return {k: expand_tree(v) for k, v in node.items()}
    return node


def is_remote(p: str) -> bool:
    """A URI (``s3://``, ``models:/``...) rather than a local path: read by its stage, never checked here."""
    return "://" in p or p.startswith("models:")


def resolve_path(p: str, base: str | os.PathLike) -> str:
    """A local path of the spec, absolute (relative ones against ``base``, the spec's folder); URIs as given."""
    if is_remote(p):
        return p
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (Path(base) / path).resolve())


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid")
