"""Planted models whose outcome under quantization is known by construction (no training, no luck)."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

SIDE_FEATURES = ["x0", "x1", "x2", "x3"]


def side_path_model(path):
    """logits = main(x) + side(x), each path starting with a float Mul that selects its features.

    main: Gemm -> Relu -> Gemm on x0, the majority's signal (|x0| in [1, 60]).
    side: Gemm on x1, a small feature (|x1| <= 0.1) that alone decides the 'small' group's rows (their x0 is 0);
    the side path's input also carries x2, x3 (N(0, 30), ignored by its weights), so one per-tensor INT8
    range for that input is ~100x coarser than x1 and rounds it to 0: every INT8 candidate that quantizes the
    side Gemm's input, static or dynamic, per-tensor or per-channel weights, erases the group's signal.
    Keeping the one Gemm ``side_fc`` in FP32 fixes it, but only while the Muls are not quantized (with every
    op quantized, the shared input is quantized too and the fallback of side_fc alone does not help)."""
    w_main1 = np.zeros((4, 16), np.float32)
    w_main1[0, :8], w_main1[0, 8:] = 1.0, -1.0
    w_main2 = np.zeros((16, 2), np.float32)
    w_main2[:8, 1], w_main2[8:, 0] = 1.0, 1.0
    w_side = np.zeros((4, 2), np.float32)
    w_side[1, 1], w_side[1, 0] = 40.0, -40.0
    inits = {"w_main1": w_main1, "w_main2": w_main2, "w_side": w_side,
             "mask_side": np.array([[0, 1, 1, 1]], np.float32), "mask_main": np.array([[1, 0, 0, 0]], np.float32)}
    nodes = [helper.make_node("Mul", ["features", "mask_side"], ["side_in"], name="side_select"),
             helper.make_node("Mul", ["features", "mask_main"], ["main_in"], name="main_select"),
             helper.make_node("Gemm", ["main_in", "w_main1"], ["h"], name="main_fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="main_relu"),
             helper.make_node("Gemm", ["hr", "w_main2"], ["main_logits"], name="main_fc2"),
             helper.make_node("Gemm", ["side_in", "w_side"], ["side_logits"], name="side_fc"),
             helper.make_node("Add", ["main_logits", "side_logits"], ["logits"], name="combine")]
    g = helper.make_graph(nodes, "side_path", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])],
                          [numpy_helper.from_array(w, n) for n, w in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    m.metadata_props.add(key="qops.feature_columns", value=",".join(SIDE_FEATURES))
    onnx.save(m, str(path))
    return path


def side_path_data(seed: int, n: int = 1000, small: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 4), np.float32)
    x[: n - small, 0] = rng.choice([-1, 1], n - small) * rng.uniform(1, 60, n - small)
    x[n - small:, 1] = rng.choice([-1, 1], small) * rng.uniform(0.01, 0.1, small)
    x[:, 2:] = rng.normal(0, 30, (n, 2))
    df = pd.DataFrame(x, columns=SIDE_FEATURES)
    df["group"] = ["majority"] * (n - small) + ["small"] * small
    df["y"] = ((df.x0 + df.x1) > 0).astype(int)
    return df


SMALL_FEATURES = ["a", "b"]


def small_weight_program(path):
    """A torch.export MLP (.pt2) whose PTQ loses a slice by construction and whose QAT wins it back.

    h = relu(W1 x + 0.1), logits = [h1, h0], with W1 = [[1, 0.003], [-1, -0.003]]: the majority's class is the sign
    of ``a`` (|a| in [1, 60]); the 'small' group has a = 0 and its class is the sign of ``b`` (|b| in [0.5, 1]),
    carried only by the 0.003 weights. INT8 weights with one scale per output row (1/127, set by the weight 1)
    round 0.003 to 0, so every PTQ model gives the small group a tie (class 0): about half of it wrong. QAT keeps
    the gradient of the 0.003 weights through the straight-through estimator (the +0.1 bias keeps the ReLU open),
    and the task loss grows them until the quantized model separates the group again."""
    import torch

    from qops.programs import save_program

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, bias=False)
            with torch.no_grad():
                self.fc1.weight.copy_(torch.tensor([[1.0, 0.003], [-1.0, -0.003]]))
                self.fc1.bias.fill_(0.1)
                self.fc2.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))

        def forward(self, features):
            return self.fc2(torch.relu(self.fc1(features)))

    ep = torch.export.export(Net().eval(), (torch.zeros(4, 2),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},))
    return save_program(ep, path, {"qops.feature_columns": ",".join(SMALL_FEATURES)})


def small_weight_data(seed: int, n: int = 1000, small: int = 100) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.choice([-1, 1], n) * rng.uniform(1, 60, n)
    a[n - small:] = 0.0
    b = rng.choice([-1, 1], n) * rng.uniform(0.5, 1.0, n)
    df = pd.DataFrame({"a": a.astype(np.float32), "b": b.astype(np.float32)})
    df["group"] = ["majority"] * (n - small) + ["small"] * small
    df["y"] = np.where(df.a != 0, df.a > 0, df.b > 0).astype(int)
    return df


def planted_pipeline_spec(d, name: str = "planted-approval", **extra) -> dict:
    """A pipeline spec (a dict) of :func:`small_weight_program` with data written to ``d``: one CPU target, gates
    its PTQ model passes, promotion to ``production`` behind an Airflow approval (tests of the approval)."""
    small_weight_program(d / "model.pt2")
    for f, seed, n in (("train", 0, 2000), ("pool", 1, 1000), ("val", 2, 1000)):
        small_weight_data(seed, n, n // 10).to_parquet(d / f"{f}.parquet")
    raw = {"name": name, "source_model": str(d / "model.pt2"),
           "data": {"pool": str(d / "pool.parquet"), "reference": str(d / "train.parquet"),
                    "validation": str(d / "val.parquet"), "label": "y", "slice_columns": ["group"]},
           "calibration": {"size": 200, "drift": {"enabled": False}},
           "targets": ["x86_64_vnni_int8"], "target_options": {"x86_64_vnni_int8": {"mode": "static"}},
           "gates": {"max_latency_ratio": 50.0, "bootstrap": 200, "latency_runs": 20, "max_overall_drop": 1.0,
                     "max_slice_drop": 1.0, "max_fairness_increase": 1.0},
           "mlflow": {"promotion": {"alias": "production", "approval": "airflow"}},
           "artifact_root": str(d / "artifacts")}
    raw.update(extra)
    return raw
