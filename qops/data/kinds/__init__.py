"""Data kinds: how rows of a table become model feeds keyed by input name.

Every kind answers the same small protocol (the shape of ONNX Runtime's calibration reader, Optimum and
Olive): ``columns()`` — the table columns it reads; ``feeds(df, inputs, what)`` — ``{input name: array}``
for those rows, checked against the graph's inputs (names, dtypes, ranks, fixed dimensions);
``drift_features(df)`` — numeric per-row features that fit the kind, for the drift check;
``latency_feed(df, inputs)`` — one representative row for batch-1 timing; ``describe()`` — for manifests
and cards. Labels and slice columns stay in the table beside the kind's columns.

- ``tabular``: numeric feature columns → one ``[batch, n_features]`` input;
- ``tensors``: columns named like the model inputs holding per-row arrays (an ``.npz`` of named arrays,
  or parquet list columns); rows of different lengths are right-padded;
- ``text``: one text column (or two, for pairs) tokenized by a local tokenizer directory;
- ``image``: image paths preprocessed with Pillow (resize, centre crop, mean/std, NCHW or NHWC).
"""

from __future__ import annotations

import os

import pandas as pd

from qops.data.kinds.base import ColumnCheck, DataKind, check_feed, is_int
from qops.data.kinds.image import Image
from qops.data.kinds.tabular import Tabular
from qops.data.kinds.tensors import Tensors
from qops.data.kinds.text import Text, load_tokenizer
from qops.errors import DataError
from qops.programs import ModelInput


def kind_from_spec(data, inputs: list[ModelInput] | None = None, meta: dict | None = None) -> DataKind:
    """The data kind a spec's ``data`` block declares (``data.kind``), bound to the model's inputs."""
    k = getattr(data, "kind", "tabular")
    if k == "text":
        t = data.text
        return Text(t.columns, t.tokenizer, t.max_length, t.truncation, t.padding, t.latency_length)
    if k == "image":
        i = data.image
        return Image(i.path_column, i.root, i.resize, i.crop, i.mean, i.std, i.layout, i.input)
    if k == "tensors":
        return Tensors(pad_value=data.tensors.pad_value if data.tensors else 0).bind(inputs or [])
    return Tabular(features_for(data.features, meta, inputs))


def features_for(features: list[str] | None, meta: dict | None, inputs=None) -> list[str]:
    if features:
        return list(features)
    cols = (meta or {}).get("qops.feature_columns")
    if not cols:
        hint = ""
        if inputs and (len(inputs) > 1 or any(is_int(i.dtype) for i in inputs)):
            hint = (f" The model takes {[i.describe() for i in inputs]}: named inputs need data.kind tensors, "
                    "text or image.")
        raise DataError(
            "No feature columns given and the model carries no 'qops.feature_columns' metadata." + hint,
            "list the model's feature columns under data.features in the spec (or --features), or declare "
            "data.kind.")
    return [c for c in cols.split(",") if c]


def infer_kind(path_or_df, inputs: list[ModelInput], meta: dict) -> DataKind:
    """The kind of a bare table given on the command line (``.npz`` files are handled by
    :func:`qops.data.data_kind`): columns named after every model input → tensors; otherwise tabular from the
    model's metadata."""
    cols = None
    if isinstance(path_or_df, pd.DataFrame):
        cols = set(path_or_df.columns)
    elif isinstance(path_or_df, (str, os.PathLike)) and str(path_or_df).lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            cols = set(pq.read_schema(str(path_or_df)).names)
        except Exception:
            cols = None
    if cols is not None and inputs and all(i.name in cols for i in inputs) and not meta.get("qops.feature_columns"):
        return Tensors([i.name for i in inputs])
    return Tabular(features_for(None, meta, inputs))


__all__ = ["ColumnCheck", "DataKind", "Image", "Tabular", "Tensors", "Text", "check_feed", "features_for", "infer_kind",
           "kind_from_spec", "load_tokenizer"]
