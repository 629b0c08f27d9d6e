"""Datasets that ship with qops (offline, with licence and source beside them)."""

from __future__ import annotations

from importlib.resources import files

import pandas as pd


def load_german_credit() -> pd.DataFrame:
    """Statlog German Credit (1,000 rows; DbCL v1.0; see data/LICENSE-german_credit.txt)."""
    with files("qops.datasets").joinpath("data/german_credit.csv").open("rb") as f:
        return pd.read_csv(f)
