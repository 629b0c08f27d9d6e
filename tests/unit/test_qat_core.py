"""QAT training core (torchao QATConfig): checkpoints in safetensors + JSON, resume after a kill with the same
final weights as an uninterrupted run, distillation without labels, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from qops.errors import QopsError
from qops.qat.config import QatConfig
from qops.qat.state import META, STATE
from qops.qat.train import convert, train_qat


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
    from qops.qat.job import qat_files
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


def test_held_out_rows_keep_the_best_weights_and_patience_stops_a_diverging_run(tmp_path):
    """A learning rate that blows the model up after a few steps: the held-out rows score each checkpoint, the
    run stops once `patience` checkpoints brought nothing better, and the model it returns is the best one (its
    held-out loss is the lowest recorded, finite), not the diverged last step."""
    import torch

    data, y = _data(n=320)
    cfg = QatConfig(steps=200, batch_size=32, lr=0.05, optimizer="sgd", momentum=0.99, checkpoint_every=2,
                    patience=3, seed=1, holdout=0.25)
    model, res = train_qat(_model(), data, cfg, tmp_path / "w", labels=y)
    assert res.holdout_rows == 80 and res.rows == 240
    assert res.stopped_early and not res.stopped_by_budget and res.steps < 200
    losses = [h for _, h in res.evals]
    best = min(range(len(losses)), key=lambda i: (not np.isfinite(losses[i]), losses[i]))
    assert res.best_step == res.evals[best][0] < res.steps
    assert len(res.evals) - 1 - best == 3  # stopped after exactly `patience` checkpoints without improvement
    assert not np.isfinite(losses[-1]) or losses[-1] > losses[best]
    from qops.qat.train import holdout_split

    _, held = holdout_split(320, 0.25, 1)
    with torch.no_grad():
        out = model(torch.from_numpy(data["features"][held]))
    ce = float(torch.nn.functional.cross_entropy(out, torch.from_numpy(y[held])))
    assert abs(ce - losses[best]) < 1e-4  # the returned weights are the best checkpoint's
    # a retry of the finished run trains nothing more and keeps the same best step
    _, again = train_qat(_model(), data, cfg, tmp_path / "w", labels=y)
    assert again.stopped_early and again.steps == res.steps and again.best_step == res.best_step


def test_distillation_loss_sees_a_constant_logit_drift_that_kl_alone_ignores():
    import torch

    from qops.qat.loss import distill_loss

    t = torch.randn(16, 10)
    drifted = t + 3.0  # the same softmax: KL is 0
    assert float(distill_loss([drifted], [t], 1.0, logit_mse=0.0)) < 1e-6
    assert float(distill_loss([drifted], [t], 1.0, logit_mse=1.0)) > 0.5
    assert float(distill_loss([t], [t], 1.0, logit_mse=1.0)) < 1e-6


def test_batch_norm_statistics_and_ranges_freeze_after_the_warm_up(tmp_path):
    """PT2E conv-BN net, bn_freeze_after and freeze_after 0.5 of 8 steps: the checkpoints of step 4 and step 8 hold
    the same BN running statistics and activation ranges, while the weights kept training. By default
    (bn_freeze_after 0) the pretrained BN statistics are never overwritten by the training batches."""
    import shutil

    import torch
    from safetensors.numpy import load_file

    from qops.qat.state import STATE

    def program():  # a fresh export each time: training mutates the exported module's buffers in place
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
        net[1].running_mean.copy_(torch.linspace(-1, 1, 8))  # "pretrained" statistics, unlike these batches'
        ep = torch.export.export(net, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        return ep.module()

    pretrained = np.linspace(-1, 1, 8, dtype=np.float32)
    x = np.random.default_rng(0).normal(size=(160, 3, 8, 8)).astype(np.float32)
    y = (x[:, 0].mean((1, 2)) > 0).astype(np.int64)
    cfg = QatConfig(engine="pt2e", scheme="int8_static", steps=8, lr=1e-2, checkpoint_every=4, batch_size=32,
                    freeze_after=0.5, bn_freeze_after=0.5, patience=None)

    def keep_step_4(step, loss):
        if step == 4:
            shutil.copy(tmp_path / "w" / STATE, tmp_path / "step4.safetensors")

    _, res = train_qat(program(), {"features": x}, cfg, tmp_path / "w", labels=y, on_step=keep_step_4)
    assert res.frozen_at == res.bn_frozen_at == 4 and res.steps == 8
    a, b = load_file(str(tmp_path / "step4.safetensors")), load_file(str(tmp_path / "w" / STATE))
    frozen = [k for k in a if k.startswith("model.") and k.endswith(("running_mean", "running_var", "min_val",
                                                                      "max_val", ".scale", "zero_point"))]
    assert any("running_mean" in k for k in frozen) and any("min_val" in k for k in frozen)
    for k in frozen:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(a["model.0.weight"], b["model.0.weight"])
    assert not np.allclose(a["model.1.running_mean"], pretrained)  # 4 steps on batch statistics moved them
    _, res = train_qat(program(), {"features": x}, QatConfig(engine="pt2e", scheme="int8_static", steps=8,
                       lr=1e-2, checkpoint_every=4, batch_size=32), tmp_path / "default", labels=y)
    assert res.bn_frozen_at == 0 and res.frozen_at == 4
    np.testing.assert_allclose(load_file(str(tmp_path / "default" / STATE))["model.1.running_mean"], pretrained,
                               atol=1e-6)
