"""Fixtures shared by the unit tests of one area: the inputs of a real model card (test_cards, test_card_data)."""

from __future__ import annotations

import pandas as pd
import pytest

from qops.artifacts import to_jsonable
from qops.evaluate import evaluate
from qops.gates import gate
from qops.quantize import quantize
from qops.spec import GateSpec
from qops.targets import get_target

EVIL = "<script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def card_inputs(fp32_model, data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    val = pd.read_parquet(data_dir / "validation.parquet")
    val["sex"] = val["sex"].replace({"female": EVIL})  # a user-supplied slice value
    val.to_parquet(d / "val.parquet")
    q = quantize(fp32_model, "arm64_int8", d / "q.onnx", calibration=data_dir / "pool.parquet")
    recipe = get_target("arm64_int8").to_dict()
    ev = to_jsonable(evaluate(fp32_model, d / "q.onnx", d / "val.parquet", "risk", ["sex", "age_group"],
                              latency_runs=20, bootstrap=200, target=recipe))
    settings = GateSpec(max_latency_ratio=10.0).model_dump()
    return dict(pipeline="p", source={"uri": "models:/m@champion", "name": "m", "version": "3", "flavor": "onnx"},
                target_recipe=recipe,
                calibration={"rows": 200, "sha256": "ab" * 32, "strategy": "stratified", "seed": 0, "pool": "pool.parquet",
                             "rows_per_slice": {"sex": {"female": 60, "male": 140}}, "drift_passed": True,
                             "drifted_columns": [], "drift_report_path": "drift.json",
                             "attempts": [{"seed": 0, "drift_passed": True}],
                             "sources": {"pool": {"uri": "s3://pools/p.parquet", "etag": "e" * 32, "bytes": 10},
                                         "reference": {"uri": "/data/train.parquet", "files": 1, "bytes": 20}}},
                quantization=to_jsonable(q), evaluation=ev, gate_result=to_jsonable(gate(ev, GateSpec(**settings))),
                gate_settings=settings, human={"intended_use": "Scoring demo & <b>tests</b>."},
                lineage={"dag_id": "d", "run_id": "r", "spec_sha256": "00"}, generated_at="2026-11-26T00:00:00+00:00")
