"""`qops spec schema` and `qops spec validate`: the published schema is the command's output (so it cannot go stale)
and accepts the example specs; validate lists every problem of a spec with its fix (exit 2), or prints one OK line
(JSON with --json), without running anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "dags" / "specs").glob("*.yaml"))


def qops(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qops.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_the_published_schema_is_the_command_output_and_fits_the_examples():
    import jsonschema

    r = qops("spec", "schema")
    assert r.returncode == 0, r.stderr
    committed = (REPO / "docs" / "spec.schema.json").read_text()
    assert r.stdout == committed, "docs/spec.schema.json is stale: qops spec schema > docs/spec.schema.json"
    schema = json.loads(committed)
    validator = jsonschema.Draft202012Validator(schema)
    assert schema["$schema"].endswith("2020-12/schema") and "targets" in schema["required"]
    for path in EXAMPLES:  # what editors check as one types: the examples raise nothing
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name
    raw = yaml.safe_load(EXAMPLES[0].read_text())
    raw["data"]["valdation"] = raw["data"].pop("validation")
    messages = [e.message for e in validator.iter_errors(raw)]
    assert any("'valdation' was unexpected" in m for m in messages) and any("'validation'" in m for m in messages)


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_the_example_specs_validate_once_their_data_exists(spec, tmp_path):
    """The examples read ${QOPS_HOME} (make demo writes the data there): before the data exists their only
    problems are those paths, each named; with the files in place (empty: nothing is read) they pass."""
    env = {"QOPS_HOME": str(tmp_path)}
    r = qops("spec", "validate", spec, "--json", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] is False and res["problems"]
    for p in res["problems"]:
        assert "does not exist" in p["problem"] and p["path"].startswith(str(tmp_path)), p
        assert f"{p['where']}: " in r.stderr
        path = Path(p["path"])
        if p["where"].endswith(("tokenizer", "root")):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    r = qops("spec", "validate", spec, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    name = yaml.safe_load(spec.read_text())["name"]
    assert len(lines) == 1 and ": OK" in lines[0] and name in lines[0]
    assert "remote, not checked: source_model models:/" in lines[0]  # the examples start from the registry


BAD = """\
name: bad
source_model: ./model.onnx
data:
  pool: pool.parquet
  reference: missing.parquet
  valdation: val.parquet
  label: risk
targets: [x86_64_vnni_int9, arm64_int8, codebook_4bit]
target_options:
  codebook_4bit: {codebok: pow2}
"""


def test_validate_lists_every_problem_with_its_fix(tmp_path):
    """A typo'd target, a missing data path, an unknown field and an unknown recipe option: all named in one run,
    each with its fix, exit 2; nothing is written."""
    for name in ("model.onnx", "pool.parquet", "val.parquet"):
        (tmp_path / name).touch()
    spec = tmp_path / "spec.yaml"
    spec.write_text(BAD)
    before = sorted(tmp_path.iterdir())
    r = qops("spec", "validate", spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    err = r.stderr
    assert "5 problem(s)" in err
    for expected in ("targets[0]: Unknown hardware target 'x86_64_vnni_int9'. Fix: did you mean 'x86_64_vnni_int8'?",
                     "data.reference: missing.parquet does not exist", "data.valdation: unknown field 'valdation'. "
                     "Fix: did you mean 'validation'?", "data.validation: the required field 'validation' is missing",
                     "target_options.codebook_4bit: Target 'codebook_4bit': unknown recipe option(s) ['codebok']",
                     "did you mean 'codebook' for 'codebok'?"):
        assert expected in err, (expected, err)
    assert err.count("Fix:") == 6  # one per problem, and the summary's
    assert sorted(tmp_path.iterdir()) == before

    r = qops("spec", "validate", spec, "--json")
    res = json.loads(r.stdout)
    assert r.returncode == 2 and res["ok"] is False
    assert {p["where"] for p in res["problems"]} == {"targets[0]", "target_options.codebook_4bit", "data.valdation",
                                                     "data.validation", "data.reference"}
    assert all(p["fix"] for p in res["problems"]) and res["paths"]["data.pool"] == str(tmp_path / "pool.parquet")


def test_validate_says_which_paths_are_remote(tmp_path):
    (tmp_path / "ref.parquet").touch()
    (tmp_path / "val.parquet").touch()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "remote", "source_model": "models:/m@champion", "targets": ["x86_64_int8_dynamic"],
        "data": {"pool": "s3://bucket/pool.parquet", "reference": "ref.parquet", "validation": "val.parquet",
                 "label": None}}))
    r = qops("spec", "validate", spec)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "1 target(s) (x86_64_int8_dynamic), 2 local path(s) exist" in r.stdout
    assert "remote, not checked: source_model models:/m@champion, data.pool s3://bucket/pool.parquet" in r.stdout
    r = qops("spec", "validate", spec, "--json")
    res = json.loads(r.stdout)  # JSON only
    assert r.returncode == 0 and res["ok"] and res["problems"] == []
    assert res["remote"] == {"source_model": "models:/m@champion", "data.pool": "s3://bucket/pool.parquet"}


def test_validate_names_a_missing_or_broken_file(tmp_path):
    r = qops("spec", "validate", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "nope.yaml does not exist" in r.stderr and "Fix:" in r.stderr
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    r = qops("spec", "validate", tmp_path / "broken.yaml")
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr
