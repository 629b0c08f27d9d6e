from pathlib import Path

import pytest

from qops.errors import SpecError, TargetError
from qops.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def minimal(**over):
    raw = {"name": "p", "source_model": "models:/m@champion", "targets": ["x86_64_int8_dynamic"],
           "data": {"pool": "pool.parquet", "reference": "ref.parquet", "validation": "val.parquet", "label": "y"}}
    raw.update(over)
    return raw


def test_demo_spec_loads_and_resolves_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("QOPS_HOME", str(tmp_path))
    spec = load_spec(REPO / "dags" / "specs" / "german_credit.yaml")
    assert spec.data.pool == str(tmp_path / "retrain" / "data" / "pool.parquet")
    assert spec.targets == ["x86_64_vnni_int8", "x86_64_int8_dynamic", "arm64_int8"]
    assert spec.data.slice_columns == ["sex", "age_group"]
    assert len(spec.digest()) == 64


def test_relative_paths_resolve_against_spec_folder(tmp_path):
    spec = parse_spec(minimal(), tmp_path)
    assert spec.data.pool == str(tmp_path / "pool.parquet")
    assert spec.source_model == "models:/m@champion"


def test_unknown_target_names_known_ones(tmp_path):
    with pytest.raises(TargetError, match="Unknown hardware target 'tpu_int3'.*x86_64_vnni_int8"):
        parse_spec(minimal(targets=["tpu_int3"]), tmp_path)


def test_invalid_fields_are_listed(tmp_path):
    with pytest.raises(SpecError) as e:
        parse_spec(minimal(calibration={"size": -5, "strategy": "magic"}), tmp_path)
    assert "calibration.size" in str(e.value) and "calibration.strategy" in str(e.value)


def test_missing_env_var_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("QOPS_TEST_UNSET", raising=False)
    p = tmp_path / "s.yaml"
    p.write_text("# ${IGNORED_IN_COMMENTS}\nname: p\nsource_model: ${QOPS_TEST_UNSET}/m.onnx\n"
                 "targets: [arm64_int8]\ndata: {pool: a, reference: b, validation: c, label: y}\n")
    with pytest.raises(SpecError, match="QOPS_TEST_UNSET"):
        load_spec(p)
