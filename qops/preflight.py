"""Checks of a spec against its data that run before any stage does work: a typo in a label or slice column, or a
``slice_overrides`` key naming a slice that does not exist, fails the first stage in seconds (exit 2) instead of
the evaluate stage after calibration and quantization ran — or, for overrides, never."""

from __future__ import annotations

from pathlib import Path

from qops.data import read_table, require_columns
from qops.errors import DataError
from qops.spec import PipelineSpec


def _columns(path: str) -> list[str]:
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq") and p.is_file():
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(p).names)
        except Exception as e:  # noqa: BLE001 - unreadable: read_table names the problem below
            raise DataError(f"The validation set {p} could not be read: {e}", "check that it is valid parquet.") from None
    return list(read_table(p, "validation set").columns)


def _slice_values(path: str, columns: list[str]) -> dict[str, set[str]]:
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        import pandas as pd

        df = pd.read_parquet(p, columns=columns)
    else:
        df = read_table(p, "validation set")[columns]
    return {c: set(df[c].astype("string").fillna("missing").unique()) for c in columns}


def check_spec_data(spec: PipelineSpec) -> None:
    """Raise :class:`DataError` (exit 2) when the validation set lacks the label or a slice column, or a gate's
    ``slice_overrides`` names a slice that is not in it."""
    d, g = spec.data, spec.gates
    if not d.validation or "://" in d.validation:
        return  # remote tables are checked when the evaluate stage reads them
    cols = _columns(d.validation)
    label = None if g.task in ("embedding", "causal_lm") else d.label
    wanted = ([label] if label else []) + list(d.slice_columns) + [c for i in d.intersections for c in i]
    require_columns(_Frame(cols), wanted, "validation set", d.validation)
    overrides = dict(g.slice_overrides)
    for t in g.thresholds:
        overrides.update(t.slice_overrides)
    if not overrides:
        return
    dims = {c for c in d.slice_columns} | {c for i in d.intersections for c in i}
    values = _slice_values(d.validation, sorted(dims & set(cols)))
    bad = []
    for key in overrides:
        for part in key.split("&"):
            col, sep, value = part.strip().partition("=")
            if not sep or col.strip() not in values or value.strip() not in values[col.strip()]:
                bad.append(key)
                break
    if bad:
        known = [f"{c}={v}" for c in sorted(values) for v in sorted(values[c])][:20]
        raise DataError(f"gates slice_overrides name slice(s) {bad} that are not in the validation set "
                        f"{d.validation} (slice columns {sorted(dims)}).",
                        f"use keys 'column=value' (joined by ' & ' for intersections) of existing slices, e.g. "
                        f"{known}.")


class _Frame:
    """Just the ``columns`` attribute :func:`require_columns` reads (the schema, without reading rows)."""

    def __init__(self, columns: list[str]):
        self.columns = columns
