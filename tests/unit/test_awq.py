"""AWQ-style activation-aware scaling for INT4 weight-only MatMuls: the simulator matches ONNX Runtime's
MatMulNBits, the scaling keeps FP32 outputs, and on activations with outlier channels (as real transformers have)
it lowers the INT4 error on rows it was not calibrated on."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper


def _outlier_model(path, width=128, out=96, seed=0):
    """x -> LayerNorm-free MatMul -> Relu -> MatMul: two linear layers with random weights."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.1, (width, width)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (width, out)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                           helper.make_node("Relu", ["h"], ["r"], name="relu"),
                           helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "two",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _rows(n, seed, width=128):
    """Activations whose channels 0..3 are 30x the others, as in the outlier channels of real transformers."""
    x = np.random.default_rng(seed).normal(0, 1, (n, width)).astype(np.float32)
    x[:, :4] *= 30
    return x


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_block_simulator_is_what_matmulnbits_computes(tmp_path, symmetric):
    from qops.quantize import quantize
    from qops.quantize.awq import fake_quant_blockwise

    model = _outlier_model(tmp_path / "m.onnx")
    r = quantize(model, "int4_weight_only", tmp_path / "q.onnx",
                 options={"block_size": 32, "accuracy_level": 0, "op_types": ["MatMul"],
                          "symmetric_weights": symmetric})
    assert r.technique["quantized_ops"].get("MatMulNBits") == 2
    x = _rows(16, 1)
    ws = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model)).graph.initializer}
    h = np.maximum(x @ fake_quant_blockwise(ws["w1"], 32, symmetric), 0)
    want = h @ fake_quant_blockwise(ws["w2"], 32, symmetric)
    got = _run(r.model_path, x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_awq_keeps_fp32_outputs_and_lowers_int4_error_on_unseen_rows(tmp_path):
    from qops.quantize import graph, quantize
    from qops.quantize.awq import apply_awq

    model = _outlier_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=_rows(64, 2))
    x = _rows(200, 3)  # other rows than the calibration's
    ref = _run(model, x)
    opts = {"block_size": 32, "accuracy_level": 0, "op_types": ["MatMul"]}
    rtn = quantize(model, "int4_weight_only", tmp_path / "rtn.onnx", options=opts)
    awq = quantize(model, "int4_weight_only", tmp_path / "awq.onnx", calibration=tmp_path / "calib.npz",
                   options=dict(opts, algorithm="awq"))
    rep = awq.technique["awq"]
    assert rep["scaled"] >= 1 and rep["mean_relative_error"] < rep["mean_relative_error_rtn"]
    first = rep["alphas"]["x"]  # the layer reading the outlier channels: its calibration error at least halves
    assert first["alpha"] > 0 and first["relative_error"] < 0.5 * first["relative_error_rtn"]
    assert all(a["relative_error"] <= a["relative_error_scaled"] <= a["relative_error_rtn"] for a in rep["alphas"].values())
    err = {k: float(np.mean((_run(p, x) - ref) ** 2)) for k, p in (("rtn", rtn.model_path), ("awq", awq.model_path))}
    assert err["awq"] < 0.8 * err["rtn"], err  # and the model's output error on unseen rows falls
    # the scaling alone (before rounding) computes what the FP32 model computes
    m = graph.load(model)
    feeds = [{"x": _rows(32, 4)}]

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            return feeds[0] if self.i == 1 else None

        def rewind(self):
            self.i = 0

    apply_awq(m, Reader(), 32, True, clip=False)  # clipping changes the float weights by design
    assert any(n.op_type == "Mul" for n in m.graph.node)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_awq_needs_calibration_and_the_tuner_offers_it(tmp_path):
    from qops.errors import QopsError
    from qops.quantize import quantize
    from qops.targets import get_target

    model = _outlier_model(tmp_path / "m.onnx")
    with pytest.raises(QopsError, match="AWQ"):
        quantize(model, "int4_weight_only", tmp_path / "q.onnx", options={"algorithm": "awq"})
    assert get_target("int4_weight_only", {"algorithm": "awq"}).needs_calibration


def test_embedding_tables_take_their_own_int4_block_size(tmp_path):
    """Embedding tables dominate an encoder's size and are sensitive in their own way: embedding_block_size
    quantizes them (GatherBlockQuantized) in other blocks than the MatMuls (MatMulNBits); the model still
    computes the FP32 model's outputs closely."""
    from qops.quantize import graph, quantize
    from tests.unit.test_data_kinds import token_model

    model = token_model(tmp_path / "m.onnx", vocab=64, dim=64)
    r = quantize(model, "int4_weight_only", tmp_path / "q.onnx",
                 options={"block_size": 16, "embedding_block_size": 64, "accuracy_level": 0})
    q = graph.load(r.model_path)
    blocks = {n.op_type: {a.name: a.i for a in n.attribute}.get("block_size") for n in q.graph.node
              if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert blocks == {"MatMulNBits": 16, "GatherBlockQuantized": 64}
    assert r.technique["embedding_block_size"] == 64
    ids = np.random.default_rng(0).integers(0, 64, (8, 5))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    ref, out = run(model), run(r.model_path)
    assert float(np.mean((out - ref) ** 2)) < 0.02 * float(np.mean(ref ** 2))
