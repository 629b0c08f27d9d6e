"""Activation statistics collected once per tuning run: the tuner's candidates that calibrate the same prepared
float graph the same way (the default recipe, learned rounding, per-tensor weights, every node-fallback trial of
a base) reuse the ranges the first one computed, through ONNX Runtime's own ``calibration_cache_path`` of
``quantize_static`` (a JSON of ``TensorsData``: no pickle).

The cache key is everything the ranges depend on: the prepared model's bytes (so equalization or SmoothQuant,
which change the graph, miss), the calibration file (path, size, modification time), its batch size and data
kind, the calibration method, the op types whose tensors are calibrated and the calibration options. Outside a
:func:`calibration_cache` block nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from qops.artifacts import sha256_file

CACHE_DIR: ContextVar[Path | None] = ContextVar("qops_calibration_cache", default=None)


@contextmanager
def calibration_cache(directory: str | os.PathLike):
    """Cache calibration ranges under ``directory`` for the static quantizations run inside the block."""
    token = CACHE_DIR.set(Path(directory))
    try:
        yield
    finally:
        CACHE_DIR.reset(token)


def _describe(obj, depth: int = 0):
    """A stable description of a data kind: its public settings (an object's address never enters the key)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if depth > 2:
        return type(obj).__name__
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in obj.items()}
    if depth < 2 and hasattr(obj, "__dict__"):
        return {"type": type(obj).__name__,
                **{k: _describe(v, depth + 1) for k, v in vars(obj).items() if not k.startswith("_")}}
    return type(obj).__name__


def cache_file(model_path: str | os.PathLike, reader, method, op_types, extra: dict) -> Path | None:
    """Where the ranges of this calibration live (they may not exist yet), or None outside a cache block."""
    directory = CACHE_DIR.get()
    if directory is None:
        return None
    st = os.stat(reader.path)
    key = {"model": sha256_file(model_path), "data": [str(Path(reader.path).resolve()), st.st_size, st.st_mtime_ns],
           "batch": reader.batch_size, "kind": _describe(reader.features), "method": str(method),
           "ops": sorted(op_types or []), "options": {k: v for k, v in extra.items() if k.startswith(("Calib", "Act"))}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"ranges-{digest}.json"
