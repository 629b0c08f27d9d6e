"""The data contract: every stage consumes feeds keyed by model input name, built from a table by a data kind
(tabular, tensors, text, image; see :mod:`qops.data.kinds`), with labels and slice columns carried beside."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from qops.data.kinds import (
    DataKind,
    Image,
    Tabular,
    Tensors,
    Text,
    check_feed,
    features_for,
    infer_kind,
    kind_from_spec,
)
from qops.data.tables import read_npz, read_table, require_columns, require_numeric
from qops.programs import ModelInput, onnx_io, onnx_outputs

__all__ = ["DataKind", "Image", "ModelInput", "Tabular", "Tensors", "Text", "check_feed", "data_kind",
           "feature_columns_for", "feature_matrix", "iter_feeds", "kind_from_spec", "onnx_io", "onnx_outputs",
           "read_npz", "read_table", "require_columns", "require_numeric"]


def data_kind(model: str | os.PathLike | list[ModelInput], features=None, data=None) -> DataKind:
    """The data kind for ``model`` reading ``data``: an ``.npz`` is always named arrays (tensors; the calibrate
    stage materialises feeds so); else ``features`` when it is a kind; a list of columns → tabular; a table whose
    columns are the model's inputs → tensors; else the model's ``qops.feature_columns`` metadata."""
    npz = isinstance(data, (str, os.PathLike)) and str(data).lower().endswith(".npz")
    if isinstance(features, DataKind) and not npz:
        return features
    if isinstance(model, list):
        inputs, meta = model, {}
    else:
        inputs, meta = onnx_io(model)
    if npz:
        return Tensors([i.name for i in inputs])  # materialised feeds: arrays named like the inputs
    if features:
        return Tabular(list(features))
    if data is not None:
        return infer_kind(data, inputs, meta)
    return Tabular(features_for(None, meta, inputs))


def feature_columns_for(model_path: str | os.PathLike, features) -> list[str] | DataKind:
    """Tabular feature columns in model order (the given list or the model's ``qops.feature_columns``
    metadata); a :class:`DataKind` is passed through."""
    if isinstance(features, DataKind):
        return features
    if features:
        return list(features)
    inputs, meta = onnx_io(model_path)
    return features_for(None, meta, inputs)


def feature_matrix(df: pd.DataFrame, model: str | os.PathLike | list[ModelInput], features,
                   what: str) -> dict[str, np.ndarray]:
    """The model's feed for the rows of ``df``: ``features`` is a list of feature columns (tabular) or a
    :class:`DataKind`. ``model`` is the ONNX path or its inputs from :func:`onnx_io`."""
    inputs = model if isinstance(model, list) else onnx_io(model)[0]
    kind = features if isinstance(features, DataKind) else Tabular(list(features))
    return kind.feeds(df, inputs, what)


def iter_feeds(df: pd.DataFrame, inputs: list[ModelInput], kind: DataKind, what: str, batch_size: int = 64):
    """Feeds for ``df`` in batches (each padded on its own for variable-length kinds)."""
    for start in range(0, len(df), batch_size):
        yield kind.feeds(df.iloc[start:start + batch_size], inputs, what)
