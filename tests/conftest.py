"""Shared fixtures: the shipped German Credit data, a small trained FP32 model, a fresh MLflow store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLICES = ["sex", "age_group"]
LABEL = "risk"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from qops.examples.german_credit import prepare_data

    d = tmp_path_factory.mktemp("german")
    prepare_data(d / "data")
    return d / "data"


@pytest.fixture(scope="session")
def features(data_dir):
    import json

    return json.loads((data_dir / "encoding.json").read_text())["features"]


@pytest.fixture(scope="session")
def fp32_model(data_dir, features, tmp_path_factory):
    """A real model trained on the shipped data (wide enough that INT8 pays off at batch 1)."""
    from qops.examples.german_credit import export_onnx, train_mlp

    # QOPS_TEST_SEED retrains with another seed (scripts/cpu_matrix.sh): no test may hinge on which rows it gets right
    model = train_mlp(str(data_dir / "train.parquet"), features, hidden=512, epochs=30,
                      seed=int(os.environ.get("QOPS_TEST_SEED", "0")))
    return export_onnx(model, len(features), features, tmp_path_factory.mktemp("model") / "fp32.onnx")


@pytest.fixture(scope="session")
def calibration_file(data_dir, features, tmp_path_factory):
    from qops.calibration import select_calibration
    from qops.spec import CalibrationSpec

    res = select_calibration(CalibrationSpec(size=120), pool=data_dir / "pool.parquet",
                             reference=data_dir / "train.parquet", output_dir=tmp_path_factory.mktemp("cal"),
                             features=features, slice_columns=SLICES)
    return Path(res.path)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # local artifact store (./mlruns) lands in the test's folder
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # forget the experiment id cached from another test's store
    yield uri


@pytest.fixture
def venv_bin():
    return Path(sys.executable).parent


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env
