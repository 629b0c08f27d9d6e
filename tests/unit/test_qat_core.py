"""QAT training core (torchao QATConfig): checkpoints in safetensors + JSON, resume after a kill with the same
final weights as an uninterrupted run, distillation without labels, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from qops.errors import QopsError
from qops.qat import META, STATE, QatConfig, convert, train_qat


def _model(seed=0):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 3)

        def forward(self, features):
            return self.fc2(torch.relu(self.fc1(features)))

    torch.manual_seed(seed)
    return Net()


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int64)
    return {"features": x}, y


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path):
    import torch

    data, y = _data()
    cfg = QatConfig(steps=24, batch_size=32, lr=1e-3, checkpoint_every=5, seed=3)
    full = _model()
    full, res_full = train_qat(full, data, cfg, tmp_path / "full", labels=y)
    assert res_full.resumed_from is None and len(res_full.losses) == 24

    def kill_at_12(step, loss):
        if step == 12:
            raise Killed()

    part = _model()
    with pytest.raises(Killed):
        train_qat(part, data, cfg, tmp_path / "run", labels=y, on_step=kill_at_12)
    assert (tmp_path / "run" / STATE).is_file() and (tmp_path / "run" / META).is_file()
    retry = _model()  # a retry is a new process: a fresh FP32 model, the checkpoint on disk
    retry, res = train_qat(retry, data, cfg, tmp_path / "run", labels=y)
    assert res.resumed_from == 10 and res.steps == 24  # the last checkpoint before the kill
    assert res.losses == res_full.losses
    for (k, a), (_, b) in zip(full.state_dict().items(), retry.state_dict().items()):
        assert torch.equal(a, b), k
    convert(retry, cfg)
    out = retry(torch.from_numpy(data["features"][:8]))
    assert out.shape == (8, 3) and torch.isfinite(out).all()


def test_qat_learns_and_distillation_needs_no_labels(tmp_path):
    import torch

    data, y = _data(seed=1)
    cfg = QatConfig(steps=60, batch_size=32, lr=3e-3, checkpoint_every=30, seed=0)
    _, res = train_qat(_model(), data, cfg, tmp_path / "task", labels=y)
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])
    teacher = _model(seed=5).eval()
    dcfg = QatConfig(steps=40, batch_size=32, lr=3e-3, checkpoint_every=40, seed=0, loss="distill")
    student = _model(seed=5)
    student, res = train_qat(student, data, dcfg, tmp_path / "distill", teacher=teacher)
    assert len(res.losses) == 40 and all(np.isfinite(res.losses))
    with torch.no_grad():
        x = torch.from_numpy(data["features"][:64])
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
    assert agree > 0.8  # the fake-quantized student still follows its FP32 teacher


def test_bad_qat_settings_name_the_fix(tmp_path):
    data, y = _data(n=16)
    with pytest.raises(QopsError, match="is not one the torchao engine trains"):
        QatConfig(scheme="int3_magic")
    with pytest.raises(QopsError, match="needs labels"):
        train_qat(_model(), data, QatConfig(steps=2, batch_size=8), tmp_path / "a")
    with pytest.raises(QopsError, match="fewer than batch_size"):
        train_qat(_model(), data, QatConfig(steps=2, batch_size=32), tmp_path / "b", labels=y)
    train_qat(_model(), data, QatConfig(steps=2, batch_size=8, checkpoint_every=1), tmp_path / "c", labels=y)
    with pytest.raises(QopsError, match="checkpoint of another configuration"):
        train_qat(_model(), data, QatConfig(steps=3, batch_size=8, checkpoint_every=1), tmp_path / "c", labels=y)


def test_qat_on_a_pt2_program_trains_converts_exports_and_evaluates(tmp_path):
    """A .pt2 MLP through QAT (int8 dynamic activations, int4 weights), saved as a .pt2 program, then evaluated
    against FP32 by the evaluate stage's code."""
    import pandas as pd
    import torch
    from torch import nn

    from qops.evaluate import evaluate
    from qops.qat_job import qat_files
    from qops.quantize.torch_engine import export_fp32

    torch.manual_seed(0)
    feats = [f"f{i}" for i in range(32)]
    x = np.random.default_rng(0).normal(size=(400, 32)).astype(np.float32)
    df = pd.DataFrame(x, columns=feats).assign(y=x[:, :3].argmax(1))
    df.iloc[:300].to_parquet(tmp_path / "train.parquet")
    df.iloc[300:].to_parquet(tmp_path / "val.parquet")
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.from_numpy(x[:300])), torch.from_numpy(df["y"].to_numpy()[:300])).backward()
        opt.step()
    src = export_fp32(net.eval(), feats, tmp_path / "fp32.pt2")
    cfg = dict(steps=40, batch_size=50, lr=1e-3, group_size=32, checkpoint_every=20)
    res = qat_files(program=src, target="torch_int8_dynamic", scheme="int8_dynamic_int4_weight",
                    train=tmp_path / "train.parquet", label="y", out_dir=tmp_path / "qat", **cfg)
    assert res["qat"]["training"]["steps"] == 40 and (tmp_path / "qat" / "work" / STATE).is_file()
    assert res["model_path"].endswith(".pt2")
    ev = evaluate(src, res["model_path"], tmp_path / "val.parquet", "y", [], latency_runs=10, bootstrap=50)
    acc = ev.overall["accuracy"]
    assert acc["fp32"] > 0.8 and acc["quantized"] > acc["fp32"] - 0.1  # QAT kept the task
    with pytest.raises(QopsError, match="no label column 'nope'"):
        qat_files(program=src, target="torch_int8_dynamic", train=tmp_path / "train.parquet", label="nope",
                  out_dir=tmp_path / "q2", **cfg)


def test_a_time_budget_stops_training_with_a_checkpoint_and_counts_over_retries(tmp_path):
    data, y = _data()
    cfg = QatConfig(steps=10_000, batch_size=32, lr=1e-3, checkpoint_every=5_000, time_budget_s=0.3)
    _, res = train_qat(_model(), data, cfg, tmp_path, labels=y)
    assert res.stopped_by_budget and 0 < res.steps < 10_000 and res.seconds >= 0.3
    meta = __import__("json").loads((tmp_path / META).read_text())
    assert meta["step"] == res.steps  # the checkpoint holds the last step trained
    _, again = train_qat(_model(), data, cfg, tmp_path, labels=y)  # a retry: the budget is already spent
    assert again.stopped_by_budget and again.resumed_from == res.steps and again.steps == res.steps
