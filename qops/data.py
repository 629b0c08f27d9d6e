"""Tabular data: reading tables, mapping feature columns to model inputs, validation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qops.errors import DataError, ModelError


def read_table(path: str | os.PathLike, what: str = "table") -> pd.DataFrame:
    """Read a parquet or CSV file; errors name the file and what it was for."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"The {what} file {p} does not exist.", f"check the {what} path in the spec/arguments.")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        elif suffix in (".csv", ".txt"):
            df = pd.read_csv(p)
        else:
            raise DataError(f"The {what} file {p} has unsupported suffix {suffix!r}.", "use .parquet or .csv.")
    except DataError:
        raise
    except Exception as e:  # pyarrow/pandas parse errors
        raise DataError(f"The {what} file {p} could not be read: {e}", "check that it is valid parquet/CSV.") from None
    return df


def require_columns(df: pd.DataFrame, columns: list[str], what: str, path: str | os.PathLike | None = None) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        where = f" ({path})" if path else ""
        raise DataError(
            f"The {what}{where} lacks column(s) {missing}; it has {list(df.columns)[:30]}.",
            "add the column(s) to the data or correct the column names in the spec.",
        )


@dataclass(frozen=True)
class ModelInput:
    name: str
    width: int | None  # size of the last dimension, None if dynamic
    dtype: str


def onnx_io(model_path: str | os.PathLike) -> tuple[list[ModelInput], dict[str, str]]:
    """The model's graph inputs (excluding initializers) and its metadata_props (``.pt2``: program inputs and
    the qops metadata saved beside the program)."""
    if str(model_path).lower().endswith(".pt2"):
        from qops.quantize.torch_engine import load_program, program_inputs

        ep, meta = load_program(model_path)
        return [ModelInput(n, shape[-1] if shape else None, dt) for n, shape, dt in program_inputs(ep)], meta
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"{model_path} is not a readable ONNX model: {e}", "pass an .onnx file.") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        width = dims[-1] if dims else None
        inputs.append(ModelInput(inp.name, width, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    meta = {p.key: p.value for p in model.metadata_props}
    return inputs, meta


def feature_columns_for(model_path: str | os.PathLike, features: list[str] | None) -> list[str]:
    """Feature columns in model order: the given list or the model's ``qops.feature_columns`` metadata."""
    if features:
        return list(features)
    _, meta = onnx_io(model_path)
    cols = meta.get("qops.feature_columns")
    if not cols:
        raise DataError(
            f"No feature columns given and the model {Path(model_path).name} carries no "
            "'qops.feature_columns' metadata.",
            "list the model's feature columns under data.features in the spec (or --features).",
        )
    return [c for c in cols.split(",") if c]


def feature_matrix(
    df: pd.DataFrame, model: str | os.PathLike | list[ModelInput], features: list[str], what: str
) -> dict[str, np.ndarray]:
    """Build the model's input feed from feature columns; check names, widths, dtypes and NaNs.

    ``model`` is the ONNX path or its inputs from :func:`onnx_io` (to read the model once for many batches).
    """
    inputs = model if isinstance(model, list) else onnx_io(model)[0]
    if len(inputs) != 1:
        raise DataError(
            f"The model has {len(inputs)} inputs ({[i.name for i in inputs]}); tabular data maps to a "
            "model with exactly one 2-D input.",
            "export the model with one [batch, n_features] input.",
        )
    inp = inputs[0]
    require_columns(df, features, what)
    if inp.width is not None and inp.width != len(features):
        raise DataError(
            f"The model input {inp.name!r} expects {inp.width} features but {len(features)} feature "
            f"columns were given for the {what}.",
            "pass the feature columns the model was trained on (data.features), in training order.",
        )
    block = df[features]
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(block[c])]
    if non_numeric:
        raise DataError(
            f"Feature column(s) {non_numeric} of the {what} are not numeric.",
            "encode them as numbers (the model's input is a numeric tensor).",
        )
    x = block.to_numpy(dtype=np.dtype(inp.dtype), copy=True)
    bad = ~np.isfinite(x)
    if bad.any():
        cols = sorted({features[j] for j in np.where(bad)[1]})
        rows = int(bad.any(axis=1).sum())
        raise DataError(
            f"The {what} has NaN/inf in feature column(s) {cols} ({rows} row(s)).",
            "impute or drop those rows before quantizing/evaluating.",
        )
    return {inp.name: x}
