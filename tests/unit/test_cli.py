import json
import subprocess
import sys
from pathlib import Path

import pytest

QOPS = [sys.executable, "-m", "qops.cli"]


def run(*args, **kw):
    return subprocess.run([*QOPS, *map(str, args)], capture_output=True, text=True, **kw)


def test_targets_json():
    r = run("targets", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["x86_64_vnni_int8"]["granularity"] == "per-channel" and data["arm64_int8"]["queue"] == "cpu"


def test_quantize_works_on_its_own(fp32_model, calibration_file, tmp_path):
    out = tmp_path / "q.onnx"
    r = run("quantize", "--model", fp32_model, "--target", "x86_64_vnni_int8", "--calibration", calibration_file,
            "--output", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert Path(res["model_path"]) == out and out.is_file() and res["size_ratio"] < 1 / 3.5


def test_calibrate_evaluate_gate_chain(fp32_model, data_dir, tmp_path):
    r = run("calibrate", "--pool", data_dir / "pool.parquet", "--reference", data_dir / "train.parquet", "--size", 100,
            "--slice-columns", "sex,age_group", "--model", fp32_model, "--output-dir", tmp_path / "cal", "--json")
    assert r.returncode == 0, r.stderr
    cal = json.loads(r.stdout)
    assert cal["rows"] == 100 and cal["drift_passed"]
    r = run("quantize", "--model", fp32_model, "--target", "arm64_int8", "--calibration", cal["path"],
            "--output", tmp_path / "q.onnx")
    assert r.returncode == 0, r.stderr
    r = run("evaluate", "--fp32", fp32_model, "--quantized", tmp_path / "q.onnx", "--validation",
            data_dir / "validation.parquet", "--label", "risk", "--slice-columns", "sex,age_group",
            "--latency-runs", 50, "--output", tmp_path / "ev.json")
    assert r.returncode == 0, r.stderr
    assert "accuracy: FP32" in r.stdout and (tmp_path / "ev.json").is_file()
    # an impossible latency bound fails the gate: exit code 3 and the failed check named
    r = run("gate", "--evaluation", tmp_path / "ev.json", "--max-latency-ratio", 0.001)
    assert r.returncode == 3 and "latency_ratio" in r.stdout


def test_bad_input_is_a_clear_error_not_a_traceback(fp32_model, tmp_path):
    r = run("quantize", "--model", fp32_model, "--target", "nope", "--output", tmp_path / "o.onnx")
    assert r.returncode == 2
    assert "Unknown hardware target 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_stage_subcommand_runs_the_operator_stages_in_a_run_folder(fp32_model, data_dir, tmp_path):
    """`qops stage` mirrors the operators: same spec, same run folder, stage by stage."""
    import yaml

    spec = {"name": "cli-stages", "source_model": str(fp32_model), "targets": ["x86_64_int8_dynamic"],
            "artifact_root": str(tmp_path / "art"),
            "data": {"pool": str(data_dir / "pool.parquet"), "reference": str(data_dir / "train.parquet"),
                     "validation": str(data_dir / "validation.parquet"), "label": "risk",
                     "slice_columns": ["sex", "age_group"]},
            "calibration": {"size": 80}, "gates": {"latency_runs": 50, "max_latency_ratio": 0.001}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    common = ["--spec", path, "--run-id", "r1"]
    for stage in ("source", "calibrate"):
        assert run("stage", stage, *common).returncode == 0
    for stage in ("quantize", "evaluate"):
        r = run("stage", stage, *common, "--target", "x86_64_int8_dynamic", "--json")
        assert r.returncode == 0, r.stderr
    r = run("stage", "gate", *common, "--target", "x86_64_int8_dynamic")
    assert r.returncode == 3 and "latency_ratio" in r.stderr
    r = run("stage", "quantize", *common)
    assert r.returncode == 2 and "--target" in r.stderr
    tdir = tmp_path / "art" / "cli-stages" / "r1" / "targets" / "x86_64_int8_dynamic"
    assert {p.name for p in tdir.iterdir()} >= {"model.onnx", "quantize.json", "evaluation.json", "gate.json"}

    # after the failed gate: the card documents it; register and promote skip by their own rules, as Airflow does
    r = run("stage", "card", *common, "--target", "x86_64_int8_dynamic", "--json")
    assert r.returncode == 0 and (tdir / "card" / "card.md").is_file(), r.stderr
    r = run("stage", "register", *common, "--target", "x86_64_int8_dynamic", "--json")
    assert r.returncode == 0 and "skipped: gates failed" in r.stderr, r.stderr
    reg = json.loads((tdir / "register.json").read_text())
    assert reg["skipped"] and not reg["registered"] and "register_failed is off" in reg["reason"]
    r = run("stage", "promote", *common, "--target", "x86_64_int8_dynamic")
    assert r.returncode == 0 and "no mlflow.promotion" in r.stderr
    r = run("stage", "nonsense", *common)
    assert r.returncode == 2 and "There is no stage 'nonsense'" in r.stderr


def test_airflow_operators_skip_and_fail_where_qops_stage_does(fp32_model, data_dir, tmp_path, monkeypatch):
    """The register operator skips on the register stage's own rule (a failed gate, register_failed off) and the
    gate operator fails on the gate's rule after pushing the result — the decisions `qops stage` makes."""
    from types import SimpleNamespace

    import yaml
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from qops.pipeline import stage_calibrate, stage_evaluate, stage_quantize, stage_source
    from qops.spec import load_spec
    from qops_airflow.operators import QopsCardOperator, QopsGateOperator, QopsRegisterOperator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the failed target's MLflow run logs its card into ./mlruns
    spec = {"name": "ops", "source_model": str(fp32_model), "targets": ["x86_64_int8_dynamic"],
            "artifact_root": str(tmp_path / "art"),
            "data": {"pool": str(data_dir / "pool.parquet"), "reference": str(data_dir / "train.parquet"),
                     "validation": str(data_dir / "validation.parquet"), "label": "risk"},
            "calibration": {"size": 80}, "gates": {"latency_runs": 20, "max_latency_ratio": 0.001}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded, t = load_spec(path), "x86_64_int8_dynamic"
    stage_source(loaded, "r")
    stage_calibrate(loaded, "r")
    stage_quantize(loaded, "r", t)
    stage_evaluate(loaded, "r", t)
    pushed = {}
    ti = SimpleNamespace(xcom_push=lambda key, value: pushed.__setitem__(key, value))
    context = {"dag": SimpleNamespace(dag_id="d"), "ti": ti}
    kw = {"spec_path": str(path), "run_key": "r", "target": t}
    with pytest.raises(AirflowFailException, match="latency_ratio"):
        QopsGateOperator(task_id="gate", **kw).execute(context)
    assert pushed["gate_result"]["passed"] is False  # pushed before failing
    assert QopsCardOperator(task_id="card", **kw).execute(context)["method"] == "ptq"
    with pytest.raises(AirflowSkipException, match="gates failed for the PTQ model"):
        QopsRegisterOperator(task_id="register", **kw).execute(context)


def test_targets_table_lists_every_target_with_engine_and_queue():
    r = run("targets")
    assert r.returncode == 0
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "gpu" in lines["nvidia_hopper_fp8"].split() and "torchao" in lines["nvidia_hopper_fp8"]
    assert "int4" in lines["int4_weight_only"] and "codebook" in lines["codebook_4bit"]


def test_quantize_with_options_and_tuning(fp32_model, calibration_file, data_dir, tmp_path):
    r = run("quantize", "--model", fp32_model, "--target", "codebook_4bit", "--option", "codebook=pow2",
            "--output", tmp_path / "c.onnx", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recipe"]["codebook"] == "pow2"
    bad = run("quantize", "--model", fp32_model, "--target", "codebook_4bit", "--option", "codebok=pow2",
              "--output", tmp_path / "b.onnx")
    assert bad.returncode != 0 and "unknown recipe option(s) ['codebok']" in bad.stderr
    t = run("quantize", "--model", fp32_model, "--target", "x86_64_int8_dynamic", "--output", tmp_path / "t.onnx",
            "--tune", "--validation", data_dir / "validation.parquet", "--label", "risk", "--max-trials", 2)
    assert t.returncode == 0, t.stderr
    assert "trial  1" in t.stdout and "trial  2" in t.stdout and "<- chosen" in t.stdout
    assert (tmp_path / "t.onnx").is_file()


def test_tuning_with_no_passing_candidate_exits_3_and_keeps_the_final_name_free(fp32_model, calibration_file,
                                                                                 data_dir, tmp_path):
    out = tmp_path / "q.onnx"
    r = run("quantize", "--model", fp32_model, "--target", "x86_64_vnni_int8", "--calibration", calibration_file,
            "--tune", "--validation", data_dir / "validation.parquet", "--threshold", "cosine>=1.5",
            "--max-trials", 2, "--output", out, "--json")
    assert r.returncode == 3, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["passed"] is False and res["tuning"]["passed"] is False
    assert not out.exists() and not (tmp_path / "q.onnx.recipe.json").exists()
    failed = tmp_path / "q.failed.onnx"
    assert Path(res["model_path"]) == failed and failed.is_file()
    from qops.quantize.result import verify_pair

    assert verify_pair(failed)["result"]["passed"] is False


def _probe_files(tmp_path, data_dir):
    import numpy as np
    import pandas as pd

    pool = pd.read_parquet(data_dir / "pool.parquet")
    bad = pool.astype({"num_age": object})
    bad.loc[bad.index[len(bad) // 2], "num_age"] = "abc"  # one row deep in the pool
    bad.to_csv(tmp_path / "pool_abc.csv", index=False)
    v = pd.read_parquet(data_dir / "validation.parquet")
    v.assign(risk=np.where(v["risk"] == 1, "bad", "good")).to_parquet(tmp_path / "val_str.parquet")
    v.assign(risk=np.where(np.arange(len(v)) == 0, 7, v["risk"])).to_parquet(tmp_path / "val7.parquet")
    feats = json.loads((data_dir / "encoding.json").read_text())["features"]
    np.savez(tmp_path / "empty.npz", features=np.zeros((0, len(feats)), np.float32))
    (tmp_path / "zero.onnx").write_bytes(b"")


@pytest.mark.parametrize("probe,args,expect", [
    ("abc in a numeric CSV column", ["calibrate", "--pool", "{t}/pool_abc.csv", "--reference", "{d}/train.parquet",
                                     "--size", "50", "--output-dir", "{t}/cal", "--model", "{m}"], "holds 'abc'"),
    ("string labels", ["evaluate", "--fp32", "{m}", "--quantized", "{m}", "--validation", "{t}/val_str.parquet",
                       "--label", "risk", "--latency-runs", "10", "--bootstrap", "10"], "non-numeric values"),
    ("label 7 for a binary model", ["evaluate", "--fp32", "{m}", "--quantized", "{m}", "--validation",
                                    "{t}/val7.parquet", "--label", "risk", "--latency-runs", "10", "--bootstrap", "10"],
     "2 classes"),
    ("an empty .npz calibration set", ["quantize", "--model", "{m}", "--target", "x86_64_vnni_int8", "--calibration",
                                       "{t}/empty.npz", "--output", "{t}/q.onnx"], "has no rows"),
    ("--option nested too deep", ["quantize", "--model", "{m}", "--target", "x86_64_vnni_int8", "--output",
                                  "{t}/q.onnx", "--option", "percentile=" + "[" * 3000], "not a YAML scalar"),
    ("--option with too many digits", ["quantize", "--model", "{m}", "--target", "x86_64_vnni_int8", "--output",
                                       "{t}/q.onnx", "--option", "percentile=1" + "0" * 4400], "character value"),
    ("an unknown threshold metric", ["quantize", "--model", "{m}", "--target", "x86_64_vnni_int8", "--output",
                                     "{t}/q.onnx", "--tune", "--validation", "{d}/validation.parquet", "--threshold",
                                     "cosin>=0.9"], "did you mean cosine"),
    ("a 0-byte .onnx", ["calibrate", "--pool", "{d}/pool.parquet", "--reference", "{d}/train.parquet", "--size", "50",
                        "--output-dir", "{t}/cal2", "--model", "{t}/zero.onnx"], "is empty (0 bytes)"),
    ("--output equal to --model", ["quantize", "--model", "{m}", "--target", "x86_64_int8_dynamic", "--output",
                                   "{m}"], "is the source model"),
    ("--output a hard link of --model", ["quantize", "--model", "{m}", "--target", "x86_64_int8_dynamic", "--output",
                                         "{t}/link.onnx"], "via a link"),
])
def test_bad_input_probes_exit_2_naming_the_problem_and_the_fix(probe, args, expect, fp32_model, data_dir, tmp_path):
    import os

    _probe_files(tmp_path, data_dir)
    os.link(fp32_model, tmp_path / "link.onnx")
    before = Path(fp32_model).read_bytes()
    r = run(*[a.format(t=tmp_path, d=data_dir, m=fp32_model) for a in args])
    assert r.returncode == 2, (probe, r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr and expect in r.stderr and "Fix:" in r.stderr, (probe, r.stderr[-1500:])
    assert Path(fp32_model).read_bytes() == before  # the source is never touched


def test_version_is_written_once_and_printed_by_the_cli():
    import subprocess
    import sys

    import qops
    import qops_airflow

    r = subprocess.run([sys.executable, "-m", "qops.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"qops {qops.__version__}"
    assert qops_airflow.get_provider_info()["versions"] == [qops.__version__]


def test_an_unexpected_error_is_one_line_exit_1_and_the_traceback_is_under_verbose(tmp_path):
    """A summary file that is valid JSON but not a qops summary reaches code that did not expect it: exit 1 with one
    line naming the error (no traceback); with -v, the traceback."""
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps({"not": "a summary"}))
    r = run("summary", bad)
    assert r.returncode == 1 and "internal error: KeyError" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("-v", "summary", bad)
    assert r.returncode == 1 and "Traceback" in r.stderr


def _parsers():
    """(command words, parser, is a leaf) for the root parser and every subcommand, nested ones (qops spec
    validate) included: a leaf runs something, the others choose a subcommand."""
    import argparse

    from qops.cli import COMMANDS
    from qops.cli.parser import build_parser

    def walk(parser, words):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        yield words, parser, not subs
        for a in subs:
            for name, sp in a.choices.items():
                yield from walk(sp, [*words, name])

    yield from walk(build_parser(COMMANDS), ["qops"])


def test_every_argument_of_every_subcommand_has_help_and_shows_its_default():
    """Walks the real parser: each argument but -h has help text (the subcommand choosers too), and each one with a
    default (not None, False or an empty list) shows it in its help."""
    import argparse

    from qops.cli.parser import help_text

    parsers = list(_parsers())
    assert {" ".join(w) for w, _, leaf in parsers if leaf} >= {
        "qops quantize", "qops run", "qops stage", "qops webhook", "qops summary", "qops spec schema",
        "qops spec validate"}
    missing, no_default = [], []
    for words, parser, _ in parsers:
        for a in parser._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            name = f"{' '.join(words)} {'/'.join(a.option_strings) or a.dest}"
            if not (a.help or "").strip():
                missing.append(name)
            d = a.default
            if not (d is None or d is False or d == [] or d is argparse.SUPPRESS
                    or isinstance(a, argparse._VersionAction)) and str(d) not in help_text(a) % {"default": d}:
                no_default.append(name)
    assert not missing, f"arguments without help: {missing}"
    assert not no_default, f"defaults not shown: {no_default}"
    # what -h prints: the default appended once
    r = run("quantize", "-h")
    assert r.returncode == 0 and "(default: 12)" in r.stdout and r.stdout.count("(default: 900.0)") == 1
    r = run("spec", "validate", "-h")
    assert r.returncode == 0 and "the pipeline spec YAML file" in r.stdout


def test_every_subcommand_takes_json():
    without = [" ".join(w) for w, p, leaf in _parsers() if leaf and "--json" not in p._option_string_actions]
    assert not without, f"subcommands without --json: {without}"


def test_json_only_with_the_flag(tmp_path):
    """--json on summary prints the summary JSON; without it, readable lines (no JSON dump)."""
    summary = {"pipeline": "p", "run_id": "r", "run_dir": str(tmp_path), "targets": [
        {"target": "x86_64_vnni_int8", "gate": "passed", "method": "ptq"}]}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    r = run("summary", path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["targets"][0]["gate"] == "passed"
    r = run("summary", path)
    assert not r.stdout.lstrip().startswith("{")
