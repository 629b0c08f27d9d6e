"""QAT engine qdq: quantization-aware fine-tuning of the target's PTQ model itself. On a small depthwise CNN with
folded batch norm: the QAT model has the PTQ model's graph (so its speed), its ranges moved, batch norm stays
frozen (folded), the state shipped is the best held-out one, and `qops qat` with an ONNX model reports
FP32/PTQ/QAT on rows it never trained or calibrated on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.unit.test_cnn_techniques import _mobile_cnn

QOPS = [sys.executable, "-m", "qops.cli"]
OPTIONS = {"per_channel": False, "bias_correction": "off"}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    from qops.quantize import quantize

    d = tmp_path_factory.mktemp("qdq_qat")
    model = _mobile_cnn(d / "fp32.onnx", seed=2)
    rng = np.random.default_rng(1)
    train = rng.normal(0.3, 1.0, (240, 3, 32, 32)).astype(np.float32)
    np.savez(d / "train.npz", pixel_values=train)
    # per-tensor weights and no bias correction: a PTQ model that loses enough for training to have work to do
    ptq = quantize(model, "x86_64_vnni_int8", d / "ptq.onnx", calibration=d / "train.npz", options=OPTIONS)
    return d, model, ptq, train


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_qdq_qat_keeps_the_ptq_graph_learns_ranges_and_ships_the_best_state(cnn, tmp_path):
    from qops.qat.config import QatConfig
    from qops.qat.job import run_qat
    from qops.qat.plan import plan_for
    from qops.quantize.cnn import float_islands
    from qops.runtime import open_session
    from qops.targets import get_target

    d, model, ptq, train = cnn
    recipe = get_target("x86_64_vnni_int8", OPTIONS)
    plan = plan_for(recipe, mode="static")
    assert plan.engine == "qdq"
    cfg = QatConfig(engine="qdq", scheme="int8_static", steps=60, batch_size=16, checkpoint_every=10, loss="distill",
                    lr=1e-4, holdout=0.25, patience=None)
    out = run_qat(source_onnx=str(model), program=None, recipe=recipe, plan=plan, cfg=cfg,
                  train_feeds={"pixel_values": train}, labels=None, out_dir=tmp_path / "o", work_dir=tmp_path / "w",
                  ptq_model=ptq.model_path, ptq_recipe=ptq.recipe)
    q = onnx.load(out["model_path"])
    p = onnx.load(ptq.model_path)
    # the PTQ graph, node for node (so ONNX Runtime fuses it the same way: no float island appears)
    assert [(n.op_type, list(n.input)) for n in q.graph.node] == [(n.op_type, list(n.input)) for n in p.graph.node]
    assert float_islands(out["model_path"]) == float_islands(ptq.model_path) == {"float_ops": {}, "requantizations": 0}
    assert out["size_bytes"] == pytest.approx(ptq.size_bytes, rel=0.01)
    # batch norm is frozen: folded into the convolutions, never a trained statistic
    assert "BatchNormalization" not in _ops(out["model_path"]) and out["qat"]["training"]["bn_frozen_at"] == 0
    exp = out["qat"]["export"]
    assert exp["learned_ranges"]["activation_max_rel_change"] > 0.001
    pi = {i.name: numpy_helper.to_array(i) for i in p.graph.initializer}
    qi = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    act_scales = [k for k, v in pi.items() if v.dtype == np.float32 and v.ndim == 0 and k.endswith("_scale")]
    assert sum(not np.array_equal(pi[k], qi[k]) for k in act_scales) >= len(act_scales) // 2
    # the state shipped is the best held-out one (the lowest of the recorded evaluations), and in ONNX Runtime it is
    # closer to FP32 on those held-out rows than the PTQ model it started from
    t = out["qat"]["training"]
    assert t["best_step"] == min(t["evals"], key=lambda e: e[1])[0] and t["best_step"] > 0
    assert exp["held_out_after"]["loss"] == pytest.approx(min(e[1] for e in t["evals"]), abs=1e-6)
    assert exp["held_out_after"]["loss"] < exp["held_out_before"]["loss"]
    rng = np.random.default_rng(0)  # finetune's held-out rows: a seeded permutation of the rows
    hold = rng.permutation(len(train))[:t["holdout_rows"]]
    ref = open_session(str(model)).run(None, {"pixel_values": train[hold]})[0]
    got = open_session(out["model_path"]).run(None, {"pixel_values": train[hold]})[0]
    before = open_session(ptq.model_path).run(None, {"pixel_values": train[hold]})[0]
    mse = lambda a: float(np.mean((a - ref) ** 2))  # noqa: E731
    assert mse(got) < mse(before)
    assert out["recipe"]["qat"]["engine"] == "qdq" and "learned during QAT" in \
        out["recipe"]["qat"]["card_facts"]["calibration_method"]
    assert any("fine-tuned the PTQ model" in n for n in out["notes"])


def test_qops_qat_fine_tunes_the_ptq_graph_of_an_onnx_model_and_reports_on_held_out_rows(cnn, tmp_path):
    d, model, ptq, train = cnn
    r = subprocess.run([str(a) for a in (*QOPS, "qat", "--model", model, "--target", "x86_64_vnni_int8", "--train",
                                         d / "train.npz", "--option", "per_channel=false", "--option",
                                         "bias_correction=off", "--option", "range_search=off", "--distill", "--steps", "60", "--batch-size", "16",
                                         "--lr", "1e-4", "--checkpoint-every", "10", "--output-dir", tmp_path / "o",
                                         "--json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["qat"]["plan"]["engine"] == "qdq" and res["qat"]["program"] is None
    cmp = res["comparison"]
    # 240 rows: 48 held out for the report (never calibrated on, never trained on); QAT trains on the other 192
    # less its own early-stopping share
    assert cmp["rows"] == 48 and res["qat"]["training"]["rows"] + res["qat"]["training"]["holdout_rows"] == 192
    assert _ops(res["model_path"]) == _ops(cmp["ptq_model"])  # QAT started from the PTQ model it is compared with
    assert cmp["qat"]["sqnr_db"] > cmp["ptq"]["sqnr_db"], cmp
    r = subprocess.run([str(a) for a in (*QOPS, "qat", "--model", model, "--target", "x86_64_vnni_int8", "--train",
                                         d / "train.npz", "--distill", "--engine", "torchao", "--output-dir",
                                         tmp_path / "o2")], capture_output=True, text=True)
    assert r.returncode == 2 and "takes QAT engine qdq or pt2e" in r.stderr and "Traceback" not in r.stderr
