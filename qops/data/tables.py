"""Reading tables: parquet, CSV, and ``.npz`` archives of named arrays (never unpickled)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from qops.errors import DataError

TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".txt", ".npz")


def read_npz(path: str | os.PathLike, what: str = "table") -> pd.DataFrame:
    """An ``.npz`` of arrays sharing their first (row) axis, as a table: 1-D arrays become ordinary columns
    (labels, slices), arrays of higher rank become one column of per-row arrays named like the array.
    Loaded with ``allow_pickle=False``: object arrays are refused, not unpickled."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise DataError(f"The {what} file {p} holds object arrays, which qops does not unpickle ({e}).",
                        "save numeric or fixed-width string arrays (np.savez(path, input_ids=..., label=...)); "
                        "text as a str array, not an object array.") from None
    except Exception as e:
        raise DataError(f"The {what} file {p} is not a readable .npz archive: {e}",
                        "write it with numpy.savez / savez_compressed.") from None
    if not arrays:
        raise DataError(f"The {what} file {p} holds no arrays.", "save the model's inputs into it by name.")
    lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    rows = {v for v in lengths.values() if v is not None}
    if len(rows) != 1 or None in lengths.values():
        raise DataError(f"The arrays of {p} do not share one row count: {lengths}.",
                        "give every array the rows on its first axis (the same number for all).")
    n = rows.pop()
    cols = {}
    for k, a in arrays.items():
        if a.ndim == 1:
            cols[k] = a
        else:
            col = np.empty(n, dtype=object)
            for i in range(n):
                col[i] = a[i]
            cols[k] = col
    return pd.DataFrame(cols)


def read_table(path: str | os.PathLike, what: str = "table") -> pd.DataFrame:
    """Read a parquet, CSV or ``.npz`` file; errors name the file and what it was for."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"The {what} file {p} does not exist.", f"check the {what} path in the spec/arguments.")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        elif suffix in (".csv", ".txt"):
            df = pd.read_csv(p)
        elif suffix == ".npz":
            df = read_npz(p, what)
        else:
            raise DataError(f"The {what} file {p} has unsupported suffix {suffix!r}.",
                            "use .parquet, .csv or .npz.")
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


def require_numeric(df: pd.DataFrame, columns: list[str], what: str, path: str | os.PathLike | None = None) -> None:
    """Every value of ``columns`` is a number (NaN allowed: the NaN checks name those): a string such as
    ``"abc"`` in a CSV column is named with its row instead of failing deep in a statistics routine."""
    for c in columns:
        if c not in df.columns or pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]):
            continue
        coerced = pd.to_numeric(df[c], errors="coerce")
        bad = df[c][coerced.isna() & df[c].notna()]
        if len(bad):
            where = f" ({path})" if path else ""
            raise DataError(f"Column {c!r} of the {what}{where} is numeric for the model but holds "
                            f"{bad.iloc[0]!r} (row {bad.index[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}).",
                            "clean or drop those rows upstream; the column must hold numbers only.")
