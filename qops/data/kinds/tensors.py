"""``tensors``: columns named like the model inputs holding per-row arrays (an ``.npz`` of named arrays, or
parquet list columns); rows of different lengths are right-padded."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qops.data.kinds.base import DataKind, check_feed
from qops.errors import DataError
from qops.programs import ModelInput


def _stack(values, name: str, what: str, pad_value: float) -> np.ndarray:
    """Per-row arrays (or scalars) of one column into one array; 1-D rows of different lengths right-padded."""
    rows = [np.asarray(v) for v in values]
    if not rows:
        return np.zeros((0,))
    shapes = {r.shape for r in rows}
    if len(shapes) == 1:
        return np.stack(rows)
    if all(r.ndim == 1 for r in rows):
        n = max(len(r) for r in rows)
        dtype = np.result_type(*[r.dtype for r in rows])
        out = np.full((len(rows), n), pad_value, dtype=dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out
    raise DataError(f"The rows of {name!r} in the {what} have different shapes {sorted(shapes)[:4]}.",
                    "give every row the same shape (only 1-D rows of different lengths are padded).")


class Tensors(DataKind):
    """Columns named like the model inputs, one array (or list) per row; ``.npz`` archives read as such."""

    kind = "tensors"

    def __init__(self, inputs: list[str] | None = None, pad_value: float = 0):
        self.inputs = list(inputs or [])
        self.pad_value = pad_value

    def bind(self, inputs: list[ModelInput]) -> "Tensors":
        return Tensors([i.name for i in inputs], self.pad_value) if not self.inputs else self

    def columns(self):
        return list(self.inputs)

    def feeds(self, df, inputs, what):
        names = [i.name for i in inputs]
        missing = [n for n in names if n not in df.columns]
        if missing:
            raise DataError(
                f"The {what} has no column/array for model input(s) {missing}; it has {list(df.columns)[:30]}. "
                f"The model takes {[i.describe() for i in inputs]}.",
                "name the arrays (npz) or list columns (parquet) after the model's inputs.")
        feed = {}
        for inp in inputs:
            a = _stack(df[inp.name].to_numpy(), inp.name, what, self.pad_value)
            # flattened rows (parquet list columns) take the model's fixed trailing dimensions back
            if inp.shape and a.ndim == 2 and len(inp.shape) > 2 and all(d is not None for d in inp.shape[1:]):
                need = int(np.prod(inp.shape[1:]))
                if a.shape[1] == need:
                    a = a.reshape(len(a), *inp.shape[1:])
            feed[inp.name] = a
        return check_feed(feed, inputs, what)

    def drift_features(self, df):
        """Per input: each row's mean and spread (integer inputs such as token ids: also the non-padding
        length), so the quantile, PSI and KS checks compare the inputs' per-row distributions."""
        out = {}
        for name in self.inputs:
            if name not in df.columns:
                continue
            rows = [np.asarray(v, dtype=float).ravel() for v in df[name].to_numpy()]
            out[f"{name}.mean"] = [r.mean() if r.size else 0.0 for r in rows]
            out[f"{name}.std"] = [r.std() if r.size else 0.0 for r in rows]
            if rows and all(np.all(r == np.round(r)) for r in rows[:50]):
                out[f"{name}.nonzero"] = [float(np.count_nonzero(r != self.pad_value)) for r in rows]
        return pd.DataFrame(out, index=df.index)

    def describe(self):
        return {"kind": self.kind, "inputs": self.inputs, "pad_value": self.pad_value}
