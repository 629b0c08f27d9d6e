"""``tabular``: numeric feature columns → one ``[batch, n_features]`` input."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qops.data.kinds.base import DataKind
from qops.data.tables import require_columns
from qops.errors import DataError


class Tabular(DataKind):
    """Numeric feature columns, in model order, onto the model's one ``[batch, n_features]`` input."""

    kind = "tabular"

    def __init__(self, features: list[str]):
        self.features = list(features)

    def columns(self) -> list[str]:
        return list(self.features)

    def feeds(self, df, inputs, what):
        if len(inputs) != 1:
            raise DataError(
                f"The model has {len(inputs)} inputs ({[i.describe() for i in inputs]}); tabular data maps to a "
                "model with exactly one 2-D input.",
                "declare the data set's kind as 'tensors' (arrays named after the inputs) or 'text' (a tokenizer), "
                "or export the model with one [batch, n_features] input.")
        inp = inputs[0]
        features = self.features
        require_columns(df, features, what)
        if inp.width is not None and inp.width != len(features):
            raise DataError(
                f"The model input {inp.name!r} expects {inp.width} features but {len(features)} feature "
                f"columns were given for the {what}.",
                "pass the feature columns the model was trained on (data.features), in training order.")
        block = df[features]
        non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(block[c])]
        if non_numeric:
            raise DataError(f"Feature column(s) {non_numeric} of the {what} are not numeric.",
                            "encode them as numbers (the model's input is a numeric tensor).")
        x = block.to_numpy(dtype=np.dtype(inp.dtype), copy=True)
        bad = ~np.isfinite(x) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
        if bad.any():
            cols = sorted({features[j] for j in np.where(bad)[1]})
            rows = int(bad.any(axis=1).sum())
            raise DataError(f"The {what} has NaN/inf in feature column(s) {cols} ({rows} row(s)).",
                            "impute or drop those rows before quantizing/evaluating.")
        return {inp.name: x}

    def drift_features(self, df):
        return df[self.features]

    def describe(self):
        return {"kind": self.kind, "features": self.features}
