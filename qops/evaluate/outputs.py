"""Running a model over the validation rows in batches (ONNX Runtime or a ``.pt2`` program, the target's execution
provider) and reading its outputs; the FP32 outputs are cached per file and rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qops.data import DataKind, iter_feeds, onnx_io
from qops.errors import DataError, ModelError
from qops.runtime import open_session

FP32_CACHE: dict = {}  # FP32 outputs of the last (file, rows) evaluated: one entry


def model_session(model_path: str | os.PathLike, threads: int | None = None, recipe: dict | None = None):
    return open_session(model_path, threads, recipe)


def run_model(model_path: str | os.PathLike, feed, recipe: dict | None = None, *, kind: DataKind | None = None,
              outputs: list[str | None] | None = None, batch_size: int = 64, what: str = "validation set"):
    """Run a model. ``feed`` is a ready feed dict (returns output 0 as ``[rows, -1]``), or a table whose rows
    ``kind`` turns into feeds batch by batch (each batch padded on its own); then ``outputs`` names the outputs
    to return (None: the first) and the result is a list of ``[rows, -1]`` arrays in that order."""
    sess = model_session(model_path, recipe=recipe)
    names = list(getattr(sess, "output_names", None) or [])
    wanted = outputs or [None]
    idx = []
    for w in wanted:
        if w is None:
            idx.append(0)
        elif w in names:
            idx.append(names.index(w))
        else:
            raise ModelError(f"{Path(model_path).name} has no output {w!r}; its outputs are {names}.",
                             "set gates.output / gates.embedding_output to one of them.")
    if isinstance(feed, dict):
        batches, single = [feed], True
    else:
        inputs = onnx_io(model_path)[0]
        batches, single = iter_feeds(feed, inputs, kind, what, batch_size), False
    parts: list[list[np.ndarray]] = [[] for _ in idx]
    for b in batches:
        try:
            res = sess.run(None, b)
        except Exception as e:
            raise DataError(f"Running {Path(model_path).name} on the {what} failed: {str(e)[:500]}",
                            "check that the data's features match the model's inputs.") from None
        for j, k in enumerate(idx):
            a = np.asarray(res[k], dtype=np.float64)
            parts[j].append(a.reshape(len(a), -1))
    out = [np.concatenate(p) if p else np.zeros((0, 1)) for p in parts]
    return out[0] if single else out


def _stamp(path) -> tuple:
    p = Path(path)
    return (str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else (str(path),)


def fp32_outputs(model, df, validation, recipe, kind, wanted, batch_size):
    """FP32 outputs on the validation rows, computed once per model file, data file, kind, batch size and
    outputs: tuning judges many candidates against the same FP32 model."""
    import json

    key = (_stamp(model), _stamp(validation), json.dumps(kind.describe(), sort_keys=True, default=str),
           tuple(wanted), batch_size, (recipe or {}).get("execution_provider"), len(df))
    if key not in FP32_CACHE:
        FP32_CACHE.clear()  # one entry: FP32 outputs of a large validation set are not small
        FP32_CACHE[key] = run_model(model, df, recipe, kind=kind, outputs=wanted, batch_size=batch_size)
    return [a.copy() for a in FP32_CACHE[key]]


def nearest_neighbors(emb: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity (ties: the lowest index)."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = np.empty(len(e), dtype=np.int64)
    for start in range(0, len(e), chunk):
        sim = e[start:start + chunk] @ e.T
        rows = np.arange(start, min(start + chunk, len(e)))
        sim[rows - start, rows] = -np.inf
        out[start:start + chunk] = sim.argmax(1)
    return out
