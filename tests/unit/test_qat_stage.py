"""The QAT stage: target plans, deployment formats checked against torch, the spec, and the pipeline path
'PTQ fails its gates -> QAT -> registered champion' on a planted model whose outcome is known by construction;
a QAT task killed mid-training resumes on its retry to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from planted_models import small_weight_data, small_weight_program

from qops.errors import QopsError, SpecError
from qops.qat.config import QatConfig
from qops.qat.plan import config_for, plan_for, require_cuda_for, supported_targets
from qops.spec import parse_spec
from qops.targets import get_target

QOPS = [sys.executable, "-m", "qops.cli"]


def test_each_target_gets_the_engine_and_format_it_is_served_in():
    p = plan_for(get_target("x86_64_vnni_int8"), mode="static")
    # static INT8 ONNX: the PTQ model itself is fine-tuned (qdq); PT2E of the torch program on request
    assert (p.engine, p.scheme, p.output, p.queue) == ("qdq", "int8_static", "onnx_qdq", "cpu")
    p = plan_for(get_target("x86_64_vnni_int8"), engine="pt2e", mode="static")
    assert (p.engine, p.scheme, p.output) == ("pt2e", "int8_static", "onnx_qdq")
    # dynamic activations: torch.onnx cannot write PT2E's dynamic quantization, so it is refused with the way out
    for recipe, mode in ((get_target("x86_64_vnni_int8"), "dynamic"), (get_target("x86_64_int8_dynamic"), None)):
        with pytest.raises(QopsError, match="cannot be written as ONNX.*torch_int8_dynamic"):
            plan_for(recipe, mode=mode)
    assert "x86_64_int8_dynamic" not in supported_targets() and "x86_64_vnni_int8" in supported_targets()
    p = plan_for(get_target("int4_weight_only"))
    assert (p.engine, p.scheme, p.output, p.group_size) == ("torchao", "int4_weight_only", "onnx_matmulnbits", 128)
    p = plan_for(get_target("torch_int8_dynamic"), scheme="int8_dynamic_int4_weight")
    assert (p.engine, p.output, p.queue) == ("torchao", "pt2", "cpu")
    p = plan_for(get_target("nvidia_hopper_fp8"))
    assert (p.scheme, p.queue) == ("float8_dynamic", "gpu")
    assert "codebook_4bit" not in supported_targets() and "nvidia_fp16" not in supported_targets()
    with pytest.raises(QopsError, match="does not serve target 'codebook_4bit'"):
        plan_for(get_target("codebook_4bit"))
    with pytest.raises(QopsError, match="does not produce target 'x86_64_vnni_int8'"):
        plan_for(get_target("x86_64_vnni_int8"), scheme="int4_weight_only")
    with pytest.raises(QopsError, match="takes QAT engine qdq or pt2e"):
        plan_for(get_target("x86_64_vnni_int8"), engine="torchao")


def test_cuda_schemes_fail_on_a_cpu_worker_naming_the_gpu_queue():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this worker has CUDA")
    with pytest.raises(QopsError, match="'gpu' queue"):
        require_cuda_for(plan_for(get_target("nvidia_hopper_fp8")))
    require_cuda_for(plan_for(get_target("torch_int8_dynamic")))  # CPU schemes run anywhere


def _spec(tmp_path, **over):
    raw = {"name": "p", "source_model": str(tmp_path / "m.pt2"),
           "data": {"pool": "pool.parquet", "reference": "train.parquet", "validation": "val.parquet", "label": "y"},
           "targets": ["x86_64_vnni_int8", "codebook_4bit"],
           "qat": {"targets": {"x86_64_vnni_int8": {"when": "ptq_fails"}}}}
    for k, v in over.items():
        raw[k] = v
    return parse_spec(raw, tmp_path)


def test_the_qat_block_is_validated_with_fixes(tmp_path):
    spec = _spec(tmp_path)
    cfg = config_for(spec.qat, "x86_64_vnni_int8", spec.qat_plan("x86_64_vnni_int8"), has_label=True)
    assert (cfg.engine, cfg.scheme, cfg.loss, cfg.epochs, cfg.steps) == ("qdq", "int8_static", "task", None, 300)
    assert (cfg.lr, cfg.batch_size) == (1e-5, 8)  # the engine's defaults
    assert spec.qat_plan("codebook_4bit") is None
    with pytest.raises(SpecError, match="qat.targets names target"):
        _spec(tmp_path, qat={"targets": {"arm64_int8": {}}})
    with pytest.raises(SpecError, match="qat.targets.codebook_4bit: QAT does not serve"):
        _spec(tmp_path, qat={"targets": {"codebook_4bit": {}}})
    with pytest.raises(SpecError, match="not one the qdq engine trains|does not produce"):
        _spec(tmp_path, qat={"targets": {"x86_64_vnni_int8": {"scheme": "float8_dynamic"}}})
    with pytest.raises(SpecError, match="steps or qat.epochs, not both"):
        _spec(tmp_path, qat={"targets": {"x86_64_vnni_int8": {}}, "steps": 3, "epochs": 1})
    with pytest.raises(SpecError, match="when"):
        _spec(tmp_path, qat={"targets": {"x86_64_vnni_int8": {"when": "sometimes"}}})
    with pytest.raises(QopsError, match="either steps or epochs"):
        QatConfig(steps=None, epochs=None)


def _mlp_program(path, width=64):
    import torch

    from qops.programs import save_program

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 3)).eval()
    ep = torch.export.export(m, (torch.randn(4, width),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return save_program(ep, path, {"qops.feature_columns": ",".join(f"f{i}" for i in range(width))})


@pytest.mark.parametrize("target", ["x86_64_vnni_int8", "int4_weight_only"])
def test_qat_artifacts_compute_what_the_converted_torch_model_computes(target, tmp_path):
    """ONNX QDQ (PT2E) and MatMulNBits (torchao int4, written from torchao's integers) give the outputs of the
    torch model they were converted from; MatMulNBits weights equal torchao's dequantized weights exactly."""
    import onnx
    import torch

    from qops.qat.job import run_qat
    from qops.qat.train import convert, train_qat
    from qops.registry import fetch_source_model
    from qops.runtime import open_session

    src = fetch_source_model(str(_mlp_program(tmp_path / "m.pt2")), tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype(np.float32)
    y = x[:, :3].argmax(1)
    recipe = get_target(target, {"block_size": 32, "accuracy_level": 0} if target == "int4_weight_only" else None)
    plan = plan_for(recipe, mode="static", engine="pt2e" if target == "x86_64_vnni_int8" else None)
    cfg = QatConfig(engine=plan.engine, scheme=plan.scheme, group_size=plan.group_size or 32, steps=12, lr=1e-3,
                    checkpoint_every=6)
    out = run_qat(source_onnx=src.path, program=src.pt2_path, recipe=recipe, plan=plan, cfg=cfg,
                  train_feeds={"features": x}, labels=y, out_dir=tmp_path / "out", work_dir=tmp_path / "work")
    ops = {n.op_type for n in onnx.load(out["model_path"]).graph.node}
    # the same training again (resumes from the finished checkpoint: no step retrained), converted in torch
    from qops.programs import load_program
    from qops.qat.job import trainable_module

    module, _ = trainable_module(load_program(src.pt2_path)[0], plan)
    module, res = train_qat(module, {"features": x}, cfg, tmp_path / "work", labels=y)
    assert res.resumed_from == 12 and res.steps == 12
    ref = convert(module, cfg)(torch.from_numpy(x[:64])).detach().numpy()
    got = open_session(out["model_path"]).run(None, {"features": x[:64]})[0]
    if target == "int4_weight_only":
        assert "MatMulNBits" in ops and "MatMul" not in ops and "Gemm" not in ops
        assert out["qat"]["export"]["layers"] == 2 and out["qat"]["export"]["max_abs_diff"] == 0.0
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # ONNX Runtime's integer kernels and torch's reference Q/DQ may round an activation differently
        assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert out["size_bytes"] < out["source_size_bytes"]


def _planted(d: Path, steps=150, when="ptq_fails", gates=None, checkpoint_every=50, **qat):
    small_weight_program(d / "model.pt2")
    small_weight_data(0, 2000, 200).to_parquet(d / "train.parquet")
    small_weight_data(1, 1000, 100).to_parquet(d / "pool.parquet")
    small_weight_data(2, 1000, 100).to_parquet(d / "val.parquet")
    raw = {"name": "planted-qat", "source_model": "model.pt2",
           "data": {"pool": "pool.parquet", "reference": "train.parquet", "validation": "val.parquet", "label": "y",
                    "slice_columns": ["group"]},
           "calibration": {"size": 200, "drift": {"enabled": False}},
           "targets": ["x86_64_vnni_int8"], "target_options": {"x86_64_vnni_int8": {"mode": "static"}},
           "qat": {"targets": {"x86_64_vnni_int8": {"when": when, "engine": "pt2e"}}, "lr": 0.01, "steps": steps, "batch_size": 32,
                   "checkpoint_every": checkpoint_every, **qat},
           # latency is not what this spec is about (a 2x2 MLP): bounds the models meet on any CPU
           "gates": {"max_latency_ratio": 50.0, "bootstrap": 200, "latency_runs": 20, **(gates or {})},
           "artifact_root": "artifacts"}
    (d / "spec.yaml").write_text(yaml.safe_dump(raw))
    return d / "spec.yaml"


def test_a_failing_ptq_target_becomes_a_registered_qat_champion(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from qops.pipeline import run_pipeline
    from qops.spec import PromotionSpec, load_spec

    spec = load_spec(_planted(tmp_path))
    spec.mlflow.promotion = PromotionSpec(alias="production")  # qops run promotes as the DAG does (one stage table)
    s = run_pipeline(spec, run_id="r1", progress=False)
    row = s["targets"][0]
    assert (row["method"], row["ptq_gate"], row["gate"]) == ("qat", "failed", "passed"), row
    assert "PTQ model failed its gates" in row["method_reason"]
    tdir = tmp_path / "artifacts" / "planted-qat" / "r1" / "targets" / "x86_64_vnni_int8"
    ptq = json.loads((tdir / "evaluation.json").read_text())
    small = next(x for x in ptq["slices"] if x["key"] == "group=small")["metrics"]["accuracy"]
    assert small["fp32"] == 1.0 and small["quantized"] < 0.7  # the 0.003 weights rounded to 0: ties
    card = json.loads((tdir / "card" / "card.json").read_text())
    rows = {r["key"]: r for r in card["qat"]["rows"]}
    assert rows["group=small"]["qat"] >= 0.95 and rows["group=small"]["recovered"] >= 0.9
    assert card["quantization"]["method"].startswith("static INT8 QAT (pt2e int8_static")
    assert (tdir / "card" / "card_qat.png").stat().st_size > 5000
    md = (tdir / "card" / "card.md").read_text()
    assert "## Quantization-aware training" in md and "| group=small | 1.0 |" in md
    assert 'id="qat-loss"' in (tdir / "card" / "card.html").read_text()
    mv = MlflowClient().get_model_version_by_alias("model-x86-64-vnni-int8", "champion")
    assert mv.tags["qops.method"] == "qat" and mv.tags["qops.qat_scheme"] == "pt2e:int8_static"
    assert mv.tags["qops.model_sha256"] == json.loads((tdir / "qat" / "quantize.json").read_text())["model_sha256"]
    promoted = json.loads((tdir / "promote.json").read_text())
    assert promoted["promoted"] and MlflowClient().get_model_version_by_alias(
        "model-x86-64-vnni-int8", "production").version == mv.version

    # when PTQ passes, ptq_fails leaves QAT out: loose gates, a second run
    loose = tmp_path / "loose"
    loose.mkdir()
    spec2 = load_spec(_planted(loose, gates={"max_overall_drop": 1.0, "max_slice_drop": 1.0,
                                             "max_fairness_increase": 1.0}))
    s2 = run_pipeline(spec2, run_id="r2", progress=False)
    assert (s2["targets"][0]["method"], s2["targets"][0]["gate"]) == ("ptq", "passed")
    assert not (tmp_path / "loose" / "artifacts" / "planted-qat" / "r2" / "targets" / "x86_64_vnni_int8" / "qat").exists()


def _stage(spec, run_id, stage, cwd, target="x86_64_vnni_int8"):
    args = [*QOPS, "stage", stage, "--spec", str(spec), "--run-id", run_id, "--json"]
    if stage not in ("source", "calibrate", "summary"):
        args += ["--target", target]
    return args


def test_a_qat_task_killed_mid_training_resumes_on_its_retry(tmp_path, mlflow_uri):
    """What an Airflow retry does: the same stage, same run id. Killed (SIGKILL) after a checkpoint, the retry
    resumes there and ends with the step count, losses and weights of an uninterrupted run."""
    from safetensors.numpy import load_file

    spec = _planted(tmp_path, steps=4000, checkpoint_every=50)
    for run in ("killed", "whole"):
        for stage in ("source", "calibrate", "quantize", "evaluate", "gate"):
            r = subprocess.run(_stage(spec, run, stage, tmp_path), capture_output=True, text=True, cwd=tmp_path)
            assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "artifacts" / "planted-qat" / "killed" / "targets" / "x86_64_vnni_int8" / "qat" / "work"
    p = subprocess.Popen(_stage(spec, "killed", "qat", tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        meta = work / "qat_state.json"
        if meta.is_file() and json.loads(meta.read_text())["step"] >= 100:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "training ended before it could be killed"
    killed_at = json.loads((work / "qat_state.json").read_text())["step"]
    assert 100 <= killed_at < 4000
    r = subprocess.run(_stage(spec, "killed", "qat", tmp_path), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    retry = json.loads(r.stdout)
    assert retry["ran"] and retry["resumed_from"] == killed_at
    r = subprocess.run(_stage(spec, "whole", "qat", tmp_path), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    whole_res = json.loads(r.stdout)
    assert whole_res["resumed_from"] is None and whole_res["steps"] == retry["steps"]
    whole = work.parents[4] / "whole" / "targets" / "x86_64_vnni_int8" / "qat" / "work"
    a, b = json.loads((work / "qat_state.json").read_text()), json.loads((whole / "qat_state.json").read_text())
    # the same end (4000 steps, or an early stop on the held-out rows at the same step) and the same best step
    assert a["step"] == b["step"] == retry["steps"] and a["losses"] == b["losses"] and a["evals"] == b["evals"]
    assert a["best_step"] == b["best_step"] is not None
    ta, tb = load_file(str(work / "qat_state.safetensors")), load_file(str(whole / "qat_state.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        if k.startswith("model."):
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    card = subprocess.run(_stage(spec, "killed", "card", tmp_path), capture_output=True, text=True, cwd=tmp_path)
    assert card.returncode == 0, card.stderr[-2000:]
    md = Path(json.loads(card.stdout)["markdown_path"]).read_text()
    assert f"resumed from the checkpoint of step {killed_at}" in md
    assert f"weights of step {a['best_step']} kept (lowest held-out loss)" in md


def test_qops_qat_cli_trains_for_a_target_and_resumes(tmp_path):
    from qops.runtime import open_session

    small_weight_program(tmp_path / "model.pt2")
    small_weight_data(0, 2000, 200).to_parquet(tmp_path / "train.parquet")
    args = [*QOPS, "qat", "--model", tmp_path / "model.pt2", "--target", "x86_64_vnni_int8", "--option", "mode=static",
            "--engine", "pt2e",
            "--train", tmp_path / "train.parquet", "--label", "y", "--steps", "150", "--lr", "0.01",
            "--checkpoint-every", "50", "--output-dir", tmp_path / "out"]
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "QAT (pt2e int8_static) 150 steps" in r.stdout and "on 400 held-out rows" in r.stdout
    val = small_weight_data(2, 400, 200)
    out = open_session(tmp_path / "out" / "model.onnx").run(None, {"features": val[["a", "b"]].to_numpy()})[0]
    small = (val.group == "small").to_numpy()
    assert (out.argmax(1) == val.y.to_numpy())[small].mean() >= 0.95
    r = subprocess.run([str(a) for a in args] + ["--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["qat"]["training"]["resumed_from"] == 150
    res = json.loads(r.stdout)
    cmp, t = res["comparison"], res["qat"]["training"]
    # 2000 rows: 400 held out (never trained on, never in PTQ's calibration), scored at every checkpoint
    assert cmp["rows"] == t["holdout_rows"] == 400 and t["rows"] == 1600 and len(t["evals"]) == 3
    assert cmp["fp32"]["top1_agreement"] == 1.0 and Path(cmp["ptq_model"]).is_file()
    # the planted slice: PTQ rounds its weights to 0, QAT learns around it (on rows it never saw)
    assert cmp["qat"]["accuracy"] >= 0.99 and cmp["ptq"]["accuracy"] <= cmp["qat"]["accuracy"] - 0.03
    bad = [*QOPS, "qat", "--model", tmp_path / "model.pt2", "--target", "codebook_4bit", "--train",
           tmp_path / "train.parquet", "--label", "y", "--output-dir", tmp_path / "o2"]
    r = subprocess.run([str(a) for a in bad], capture_output=True, text=True)
    assert r.returncode != 0 and "QAT does not serve target 'codebook_4bit'" in r.stderr and "Traceback" not in r.stderr


def test_docs_qat_page_lists_every_setting():
    from qops.spec import QatSpec, QatTargetSpec

    text = (Path(__file__).resolve().parents[2] / "docs" / "qat.md").read_text()
    settings = text[text.index("## Settings"):text.index("## The card")]
    for name in list(QatSpec.model_fields) + list(QatTargetSpec.model_fields):
        assert f"{name}:" in settings or f"`{name}`" in settings, name
    for target in supported_targets():
        assert f"`{target}`" in text, target


def test_pt2e_qat_of_a_cnn_folds_batch_norm_and_exports_qdq(tmp_path):
    """Conv-BN-ReLU blocks: PT2E QAT trains with batch norm, convert folds it, the ONNX QDQ file has INT8 convs
    and no BatchNormalization, and computes what the converted torch model computes."""
    import onnx
    import torch

    from qops.programs import load_program, save_program
    from qops.qat.job import run_qat, trainable_module
    from qops.qat.train import convert, train_qat
    from qops.registry import fetch_source_model
    from qops.runtime import open_session

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    ep = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    src = fetch_source_model(str(save_program(ep, tmp_path / "cnn.pt2", {})), tmp_path)
    x = np.random.default_rng(0).normal(size=(128, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0].mean((1, 2)) > 0).astype(np.int64)
    recipe = get_target("x86_64_vnni_int8")
    plan = plan_for(recipe, mode="static", engine="pt2e")
    cfg = QatConfig(engine="pt2e", scheme="int8_static", steps=8, lr=1e-3, checkpoint_every=4, batch_size=32)
    out = run_qat(source_onnx=src.path, program=src.pt2_path, recipe=recipe, plan=plan, cfg=cfg,
                  train_feeds={"features": x}, labels=y, out_dir=tmp_path / "o", work_dir=tmp_path / "w")
    ops = [n.op_type for n in onnx.load(out["model_path"]).graph.node]
    assert "Conv" in ops and "QuantizeLinear" in ops and "BatchNormalization" not in ops
    module, _ = trainable_module(load_program(src.pt2_path)[0], plan)
    module, res = train_qat(module, {"features": x}, cfg, tmp_path / "w", labels=y)  # the finished checkpoint
    assert res.resumed_from == 8
    ref = convert(module, cfg)(torch.from_numpy(x[:32])).detach().numpy()
    got = open_session(out["model_path"]).run(None, {"features": x[:32]})[0]
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max() + 1e-3
    assert out["size_bytes"] < out["source_size_bytes"]


def test_a_program_exported_for_batch_1_is_refused_with_the_export_recipe(tmp_path):
    import pandas as pd
    import torch

    from qops.programs import save_program

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    ep = torch.export.export(m, (torch.randn(1, 8),))  # no dynamic_shapes: the batch is fixed to 1
    save_program(ep, tmp_path / "b1.pt2", {"qops.feature_columns": ",".join(f"f{i}" for i in range(8))})
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(64, 8)).astype(np.float32), columns=[f"f{i}" for i in range(8)])
    df.assign(y=rng.integers(0, 3, 64)).to_parquet(tmp_path / "train.parquet")
    r = subprocess.run([str(a) for a in [*QOPS, "qat", "--model", tmp_path / "b1.pt2", "--target", "x86_64_vnni_int8",
                                         "--train", tmp_path / "train.parquet", "--label", "y", "--steps", "2",
                                         "--output-dir", tmp_path / "out"]], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "dynamic batch dimension" in r.stderr and "torch.export.Dim('batch')" in r.stderr
    assert "Traceback" not in r.stderr
