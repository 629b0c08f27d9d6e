import json
import subprocess
import sys
from pathlib import Path

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
    assert Path(res["model_path"]) == out and out.is_file() and res["size_ratio"] > 3.5


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
