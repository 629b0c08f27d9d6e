"""The data-kind protocol (:class:`DataKind`) and the feed check every kind runs against the graph's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from qops.errors import DataError
from qops.programs import ModelInput


def dynamic_batch_fix(name: str) -> str:
    """The fix for a model input whose batch dimension is fixed (qops calibrates and evaluates rows in batches)."""
    return ("export the model with a dynamic batch dimension (torch.onnx.export(..., dynamic_axes={"
            f"'{name}': {{0: 'batch'}}}}); a torch.export program (.pt2): torch.export.export(model, (x,), "
            f"dynamic_shapes={{'{name}': {{0: torch.export.Dim('batch')}}}})), or rename the dimension in the file "
            "with onnx.tools.update_model_dims.update_inputs_outputs_dims.")


def is_int(dtype: str) -> bool:
    return np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_


def check_feed(feed: dict[str, np.ndarray], inputs: list[ModelInput], what: str, source: str = "") -> dict:
    """Check a feed against the graph: every input present and nothing else, dtype family, rank, and fixed
    dimensions. Casts to the input's dtype. Errors name the input, what the data gives and the fix."""
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    src = f" ({source})" if source else ""
    if missing:
        raise DataError(
            f"The {what}{src} gives no data for model input(s) {missing}; it gives {sorted(feed)}. The model "
            f"takes {[i.describe() for i in inputs]}.",
            "name the arrays/columns after the model's inputs, or use the data kind that produces them "
            "(text: a tokenizer that returns them).")
    if extra:
        raise DataError(
            f"The {what}{src} gives array(s) {extra} that are not inputs of the model "
            f"{[i.describe() for i in inputs]}.",
            "drop them or rename them after the model's inputs (inputs are matched by name, never by position).")
    out = {}
    for inp in inputs:
        a = np.asarray(feed[inp.name])
        if a.dtype.kind in "OUS":
            raise DataError(f"The {what}{src} gives {a.dtype} values for model input {inp.name!r}, which takes "
                            f"{inp.dtype}.", "convert the data to numbers (text needs data kind 'text').")
        if is_int(inp.dtype) and a.dtype.kind == "f":
            if a.size and (not np.all(np.isfinite(a)) or np.any(a != np.round(a))):
                raise DataError(
                    f"Model input {inp.name!r} takes {inp.dtype} but the {what}{src} gives non-integer "
                    f"{a.dtype} values.", f"give integer values for {inp.name} (e.g. token ids).")
        if inp.shape:
            if a.ndim != len(inp.shape):
                raise DataError(
                    f"Model input {inp.name!r} takes rank {len(inp.shape)} ({inp.describe()}) but the {what}{src} "
                    f"gives shape {list(a.shape)} (rank {a.ndim}).",
                    f"give {inp.name} as [rows, {', '.join('?' if d is None else str(d) for d in inp.shape[1:])}]"
                    " per batch.")
            if inp.shape[0] is not None and a.shape[0] != inp.shape[0]:
                raise DataError(
                    f"Model input {inp.name!r} ({inp.describe()}) has its batch dimension fixed at {inp.shape[0]}, "
                    f"but qops feeds rows in batches (the {what}{src} gives {a.shape[0]} rows).",
                    dynamic_batch_fix(inp.name))
            bad = [(k, d, a.shape[k]) for k, d in enumerate(inp.shape) if d is not None and k > 0 and a.shape[k] != d]
            if bad:
                k, d, got = bad[0]
                raise DataError(
                    f"Model input {inp.name!r} ({inp.describe()}) has dimension {k} fixed at {d} but the "
                    f"{what}{src} gives {got} (shape {list(a.shape)}).",
                    "resize/pad the data to the model's fixed dimensions, or export the model with that "
                    "dimension dynamic.")
        if a.dtype.kind == "f" and a.size and not np.all(np.isfinite(a)):
            rows = int((~np.isfinite(a.reshape(len(a), -1))).any(axis=1).sum())
            raise DataError(f"The {what}{src} has NaN/inf in model input {inp.name!r} ({rows} row(s)).",
                            "impute or drop those rows before quantizing/evaluating.")
        out[inp.name] = np.ascontiguousarray(a.astype(np.dtype(inp.dtype), copy=False))
    return out


class DataKind:
    kind = "?"

    def columns(self) -> list[str]:
        raise NotImplementedError

    def feeds(self, df: pd.DataFrame, inputs: list[ModelInput], what: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def drift_features(self, df: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError

    def drift_extra(self, sample: pd.DataFrame, reference: pd.DataFrame, max_psi: float) -> list:
        """Further drift checks over the whole set (not per row); ``ColumnCheck`` objects."""
        return []

    def latency_feed(self, df: pd.DataFrame, inputs: list[ModelInput]) -> tuple[dict, str]:
        """One representative row for batch-1 timing, and a description of its shape."""
        feed = self.feeds(df.iloc[:1], inputs, "latency row")
        return feed, ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())

    def describe(self) -> dict:
        return {"kind": self.kind}


@dataclass
class ColumnCheck:
    """One drift check of one column (or of a kind's whole-set feature), as the drift report lists it."""

    column: str
    kind: str  # numeric | categorical
    expectation: str
    passed: bool
    observed: object = None
    expected: object = None
