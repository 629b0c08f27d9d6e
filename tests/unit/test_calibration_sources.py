"""Calibration at scale: streamed sources (local folders, s3:// on a real S3-compatible server on
127.0.0.1), strategies (diversity, recency, minimum per slice), drift policies and bad input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from servers import start_moto

from qops.calibration import S3Options, select_calibration, stream_sample
from qops.errors import DataError, DriftError
from qops.spec import CalibrationSpec, DiversitySpec, DriftSpec, RecencySpec

SLICES = ["sex", "age_group"]


@pytest.fixture(scope="module")
def s3(data_dir):
    """A real S3-compatible HTTP server (moto_server) on loopback, with the pool and reference uploaded."""
    import boto3

    proc, endpoint = start_moto()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="pools")
    for name in ("pool", "train", "validation"):
        client.upload_file(str(data_dir / f"{name}.parquet"), "pools", f"german/{name}.parquet")
    client.put_object(Bucket="pools", Key="german/corrupt.parquet", Body=b"PAR1 this is not parquet")
    yield endpoint
    proc.kill()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_s3_pool_and_reference(s3, features, tmp_path):
    res = select_calibration(CalibrationSpec(size=120), pool="s3://pools/german/pool.parquet", reference="s3://pools/german/train.parquet", output_dir=tmp_path, features=features, slice_columns=SLICES, validation="s3://pools/german/validation.parquet", s3=S3Options(endpoint_url=s3))
    assert res.rows == 120 and res.drift_passed and res.pool == "s3://pools/german/pool.parquet"
    import json

    manifest = json.loads((tmp_path / "calibration.json").read_text())
    src = manifest["sources"]["pool"]
    assert src["uri"] == "s3://pools/german/pool.parquet" and len(src["etag"]) == 32 and src["bytes"] > 0
    assert "testing" not in (tmp_path / "calibration.json").read_text()  # no credentials in the manifest


def test_s3_same_selection_as_local(s3, data_dir, features, tmp_path):
    a = select_calibration(CalibrationSpec(size=100), pool="s3://pools/german/pool.parquet", reference="s3://pools/german/train.parquet", output_dir=tmp_path / "a", features=features, slice_columns=SLICES, s3=S3Options(endpoint_url=s3))
    b = select_calibration(CalibrationSpec(size=100), pool=data_dir / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "b", features=features, slice_columns=SLICES)
    assert a.sha256 == b.sha256


def test_s3_missing_object(s3, features, tmp_path):
    with pytest.raises(DataError, match=r"calibration pool s3://pools/german/nope.parquet does not exist"):
        select_calibration(CalibrationSpec(size=10), pool="s3://pools/german/nope.parquet", reference="s3://pools/german/train.parquet", output_dir=tmp_path, features=features, s3=S3Options(endpoint_url=s3))


def test_s3_corrupt_parquet(s3, features, tmp_path):
    with pytest.raises(DataError, match="calibration pool s3://pools/german/corrupt.parquet is not a readable"):
        select_calibration(CalibrationSpec(size=10), pool="s3://pools/german/corrupt.parquet", reference="s3://pools/german/train.parquet", output_dir=tmp_path, features=features, s3=S3Options(endpoint_url=s3))
    assert not (tmp_path / "calibration.parquet").exists()


def test_s3_access_denied(features, tmp_path, monkeypatch):
    """A server that enforces authentication (moto with IAM checks on): unknown keys are refused."""
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
        with pytest.raises(DataError, match=r"Access to the calibration pool s3://pools/x.parquet was denied") as e:
            select_calibration(CalibrationSpec(size=10), pool="s3://pools/x.parquet", reference="s3://pools/y.parquet", output_dir=tmp_path, features=features, s3=S3Options(endpoint_url=endpoint))
        assert "not-a-real-secret" not in str(e.value)
    finally:
        proc.kill()


def test_streaming_does_not_depend_on_batch_size_or_file_split(data_dir, tmp_path):
    pool = pd.read_parquet(data_dir / "pool.parquet")
    folder = tmp_path / "pool"
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(pool)), 3)):
        pool.iloc[part].to_parquet(folder / f"part-{i}.parquet")
    a, _ = stream_sample(data_dir / "pool.parquet", 50, strategy="stratified", seed=3, stratify_by=SLICES)
    b, stats = stream_sample(folder, 50, strategy="stratified", seed=3, stratify_by=SLICES, batch_size=17)
    assert a.drop(columns="__qops_row__").equals(b.drop(columns="__qops_row__"))
    assert stats["pool_rows"] == len(pool) and sum(stats["pool_rows_per_stratum"].values()) == len(pool)


def test_stratified_minimum_per_slice(data_dir, features, tmp_path):
    pool = pd.read_parquet(data_dir / "pool.parquet")
    res = select_calibration(CalibrationSpec(size=60, min_per_slice=15), pool=data_dir / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path, features=features, slice_columns=["age_group"])
    assert all(v >= 15 for v in res.rows_per_slice["age_group"].values())
    smallest = pool["age_group"].value_counts().min()
    with pytest.raises(DataError, match="below min_per_slice"):
        select_calibration(CalibrationSpec(size=150, min_per_slice=smallest + 1, on_small_slice="fail", drift=DriftSpec(enabled=False)), pool=data_dir / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "f", features=features, slice_columns=["age_group"])
    res = select_calibration(CalibrationSpec(size=150, min_per_slice=smallest + 1, drift=DriftSpec(enabled=False)), pool=data_dir / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "w", features=features, slice_columns=["age_group"])
    assert res.warnings and "below min_per_slice" in res.warnings[0]


def test_diversity_sampling_covers_the_space(data_dir, features):
    from qops.calibration.select import diversity_sample

    div, _ = diversity_sample(data_dir / "pool.parquet", 30, seed=0, features=features, diversity=DiversitySpec(),
                              columns=features + SLICES, recency=None, check_columns=features)
    again, _ = diversity_sample(data_dir / "pool.parquet", 30, seed=0, features=features, diversity=DiversitySpec(),
                                columns=features + SLICES, recency=None, check_columns=features)
    rnd, _ = stream_sample(data_dir / "pool.parquet", 30, seed=0, columns=features + SLICES)
    assert div.equals(again)
    cols = ["num_credit_amount", "num_duration", "num_age"]
    assert (div[cols].max() - div[cols].min()).sum() > (rnd[cols].max() - rnd[cols].min()).sum()


def test_diversity_over_an_embedding_column(tmp_path):
    rng = np.random.default_rng(0)
    emb = [rng.normal(size=8).astype(np.float32) for _ in range(500)]
    df = pd.DataFrame({"x": rng.normal(size=500).astype(np.float32), "emb": emb})
    from qops.calibration.select import diversity_sample

    out, _ = diversity_sample(df, 20, seed=1, features=["x"], diversity=DiversitySpec(embedding_column="emb"),
                              columns=["x", "emb"], recency=None, check_columns=["x"])
    assert len(out) == 20 and out["__qops_row__"].is_unique


def test_recency_window(data_dir, features, tmp_path):
    pool = pd.read_parquet(data_dir / "pool.parquet")
    pool["ts"] = pd.Timestamp("2026-11-01", tz="UTC") - pd.to_timedelta(np.arange(len(pool)) % 100, unit="D")
    pool.to_parquet(tmp_path / "pool.parquet")
    frame, stats = stream_sample(tmp_path / "pool.parquet", 20, seed=0, columns=features, recency=RecencySpec(column="ts", window_days=10))
    assert (frame["ts"] >= pd.Timestamp("2026-10-22", tz="UTC")).all()
    assert stats["eligible_rows"] == int((pool["ts"] >= pd.Timestamp("2026-10-22", tz="UTC")).sum())
    with pytest.raises(DataError, match="in the recency window, fewer than the 150"):
        stream_sample(tmp_path / "pool.parquet", 150, seed=0, columns=features, recency=RecencySpec(column="ts", window_days=10))


def test_drift_policies_warn_and_reselect(data_dir, features, tmp_path):
    pool = pd.read_parquet(data_dir / "pool.parquet")
    pool["num_duration"] = pool["num_duration"] + 2.0
    pool.to_parquet(tmp_path / "pool.parquet")
    with pytest.raises(DriftError, match=r"after 3 selection\(s\) \(seeds \[5, 6, 7\]\)"):
        select_calibration(CalibrationSpec(size=100, seed=5, drift=DriftSpec(on_drift="reselect", max_reselect=2)), pool=tmp_path / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "r", features=features, slice_columns=SLICES)
    res = select_calibration(CalibrationSpec(size=100, drift=DriftSpec(on_drift="warn")), pool=tmp_path / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "w", features=features, slice_columns=SLICES)
    assert not res.drift_passed and "num_duration" in res.drifted_columns and Path(res.path).is_file()
    import json

    report = json.loads(Path(res.drift_report_path).read_text())
    psi = next(c for c in report["checks"] if c["column"] == "num_duration"
               and c["expectation"] == "population_stability_index")
    ks = next(c for c in report["checks"] if c["column"] == "num_duration" and c["expectation"] == "ks_2samp")
    assert not psi["passed"] and not ks["passed"] and report["column_stats"]["num_duration"]["psi"] > 1
    text = Path(res.drift_report_path).with_suffix(".txt").read_text()
    assert re.search(r"^\s+DRIFT num_duration\s", text, re.M), text  # the drifted column is named in the report


def test_all_null_column_and_schema_mismatch(data_dir, features, tmp_path):
    pool = pd.read_parquet(data_dir / "pool.parquet")
    pool["num_age"] = np.nan
    pool.to_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"\['num_age'\] of the calibration pool .* are entirely null"):
        select_calibration(CalibrationSpec(size=20), pool=tmp_path / "nulls.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "o", features=features, slice_columns=SLICES)
    val = pd.read_parquet(data_dir / "validation.parquet").drop(columns=["num_duration"])
    val.to_parquet(tmp_path / "val.parquet")
    with pytest.raises(DataError, match=r"validation set .* lacks feature column\(s\) \['num_duration'\]"):
        select_calibration(CalibrationSpec(size=20), pool=data_dir / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "v", features=features, slice_columns=SLICES, validation=tmp_path / "val.parquet")
    assert not (tmp_path / "v" / "calibration.parquet").exists()


def test_corrupt_local_parquet(data_dir, features, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1garbage")
    with pytest.raises(DataError, match="calibration pool .*bad.parquet is not a readable parquet"):
        select_calibration(CalibrationSpec(size=10), pool=bad, reference=data_dir / "train.parquet", output_dir=tmp_path / "o", features=features)


def test_dataframe_sources(data_dir, features, tmp_path):
    pool, ref = pd.read_parquet(data_dir / "pool.parquet"), pd.read_parquet(data_dir / "train.parquet")
    res = select_calibration(CalibrationSpec(size=50), pool=pool, reference=ref, output_dir=tmp_path, features=features, slice_columns=SLICES)
    assert res.rows == 50 and res.pool == "<DataFrame>"


def test_csv_pool(data_dir, features, tmp_path):
    pd.read_parquet(data_dir / "pool.parquet").to_csv(tmp_path / "pool.csv", index=False)
    a = select_calibration(CalibrationSpec(size=80, drift=DriftSpec(enabled=False)), pool=tmp_path / "pool.csv", reference=data_dir / "train.parquet", output_dir=tmp_path / "a", features=features, slice_columns=SLICES)
    b = select_calibration(CalibrationSpec(size=80, drift=DriftSpec(enabled=False)), pool=data_dir / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path / "b", features=features, slice_columns=SLICES)
    pa, pb = pd.read_parquet(a.path), pd.read_parquet(b.path)
    assert a.rows == 80 and np.allclose(pa[features].to_numpy(float), pb[features].to_numpy(float), atol=1e-6)


def test_calibration_set_must_fit_the_model_input(data_dir, features, tmp_path):
    from qops.data import ModelInput

    with pytest.raises(DataError, match="expects 5 features but 27 feature columns"):
        select_calibration(CalibrationSpec(size=20, drift=DriftSpec(enabled=False)), pool=data_dir / "pool.parquet", reference=data_dir / "train.parquet", output_dir=tmp_path, features=features, slice_columns=SLICES, model_inputs=[ModelInput("features", 5, "float32")])
    assert not (tmp_path / "calibration.parquet").exists()
