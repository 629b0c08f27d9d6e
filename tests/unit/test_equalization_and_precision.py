"""Cross-layer equalization (exact on Relu/linear chains, calibrated on Clip chains) and layers kept out of INT8 in a
static QDQ graph (ONNX Runtime would otherwise quantize their float weights per tensor at load time)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.unit.test_cnn_techniques import _mobile_cnn, export_image_model


def _run(model, x):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]


def _relu_net(path, seed=0, squash=100.0):
    """conv -> Relu -> depthwise conv -> Relu -> conv -> (pool) -> Gemm -> Relu -> Gemm, where a third of the first
    conv's output channels were scaled down by ``squash`` and the depthwise kernels of those channels up by as much:
    the same function, but those channels use 1/squash of the activation's quantization range."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1, groups=24),
                        nn.ReLU(), nn.Conv2d(24, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32),
                        nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        idx = torch.arange(0, 24, 3)
        net[0].weight[idx] /= squash
        net[0].bias[idx] /= squash
        net[2].weight[idx] *= squash
    return export_image_model(net, path, 16)


@pytest.fixture(scope="module")
def relu(tmp_path_factory):
    d = tmp_path_factory.mktemp("eq")
    model = _relu_net(d / "fp32.onnx")
    rng = np.random.default_rng(1)
    cal = rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    val = rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    np.savez(d / "cal.npz", pixel_values=cal)
    return d, model, cal, val


def _batches(x, n=16):
    return lambda: ({"pixel_values": x[i:i + n]} for i in range(0, len(x), n))


def test_exact_equalization_preserves_fp32_outputs_and_evens_out_channel_ranges(relu):
    from qops.quantize.equalize import channel_stats, equalize, find_pairs

    d, model, cal, val = relu
    m = onnx.load(str(model))
    pairs = find_pairs(m, clip=False)
    kinds = sorted((p.a.op_type, p.b.op_type) for p in pairs)
    assert kinds == [("Conv", "Conv"), ("Conv", "Conv"), ("Gemm", "Gemm")], pairs  # dense->dw, dw->dense, fc->fc
    first = pairs[0].tensor if pairs[0].a.input[0] == "pixel_values" else pairs[1].tensor
    share = lambda s: s["max"] / s["max"].max()  # noqa: E731 - each channel's share of the tensor's range
    before = share(channel_stats(m, [first], _batches(cal)())[first])
    rep = equalize(m, _batches(cal), mode="exact")
    assert rep["chains"] == 3 and rep["channels_scaled"] > 0
    after = share(channel_stats(m, [first], _batches(cal)())[first])
    assert before.min() < 0.02 and after.min() > 10 * before.min()  # the squashed channels use far more of it
    ref = _run(onnx.load(str(model)), val)
    np.testing.assert_allclose(_run(m, val), ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_equalized_static_int8_is_more_faithful_on_rows_it_never_saw(relu):
    from qops.quantize import quantize

    d, model, cal, val = relu
    ref = _run(model, val)
    err = {}
    for eq in ("off", "exact"):
        r = quantize(model, "x86_64_vnni_int8", d / f"q_{eq}.onnx", calibration=d / "cal.npz",
                     options={"equalization": eq, "bias_correction": "off", "range_search": "off"})
        err[eq] = float(np.mean((_run(r.model_path, val) - ref) ** 2))
        if eq == "exact":
            assert r.technique["equalization"]["chains"] == 3
    assert err["exact"] < 0.5 * err["off"], err


def test_calibrated_equalization_of_relu6_chains_is_exact_on_the_calibration_rows(tmp_path):
    from qops.quantize.equalize import equalize, find_pairs

    model = _mobile_cnn(tmp_path / "m.onnx")
    m = onnx.load(str(model))
    assert not find_pairs(m, clip=False) or all(p.act is None for p in find_pairs(m, clip=False))
    assert any(p.act is not None and p.act.op_type == "Clip" for p in find_pairs(m, clip=True))
    cal = np.random.default_rng(2).normal(0.3, 1, (48, 3, 32, 32)).astype(np.float32)
    rep = equalize(m, _batches(cal), mode="calibrated")
    assert rep["channels_scaled"] > 0 and rep["max_scale"] > 1
    ref = _run(onnx.load(str(model)), cal)
    np.testing.assert_allclose(_run(m, cal), ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_a_layer_kept_out_of_int8_stays_out_when_onnx_runtime_loads_the_model(tmp_path):
    """ONNX Runtime's WeightBiasQuantization would quantize a float weight between QDQ per tensor: the layer is
    stored with INT16 per-channel weights instead, and runs in float."""
    from onnx import numpy_helper

    from qops.quantize import quantize
    from qops.quantize.cnn import float_islands
    from qops.quantize.precision import at_risk

    model = _mobile_cnn(tmp_path / "m.onnx")
    cal = np.random.default_rng(0).normal(0.3, 1, (64, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", pixel_values=cal)
    dw = next(n.name for n in onnx.load(str(model)).graph.node
              if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    r = quantize(model, "x86_64_vnni_int8", tmp_path / "q.onnx", calibration=tmp_path / "cal.npz",
                 options={"nodes_to_exclude": [dw]})
    assert r.technique["int16_weights"] == [dw]
    assert r.technique["precision"][dw] == "int16 per-channel"
    assert r.technique["precision_summary"] == {"int8 per-channel": 7, "int16 per-channel": 1}
    assert r.technique["float_islands"]["float_ops"] == {"Conv": 1}  # it really runs in float
    assert r.technique["weighted_nodes"]["Conv"] == {"quantized": 6, "total": 7}
    q = onnx.load(r.model_path)
    assert at_risk(q) == []
    # the same model with that weight as a plain float initializer: ONNX Runtime fuses it into an integer kernel
    node = next(n for n in q.graph.node if n.name == dw)
    dq = next(n for n in q.graph.node if n.output[0] == node.input[1])
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    w = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]].reshape(-1, 1, 1, 1)
    q.graph.initializer.append(numpy_helper.from_array(w, "float_w"))
    node.input[1] = "float_w"
    onnx.save(q, tmp_path / "unprotected.onnx")
    assert [n.name for n in at_risk(q)] == [dw]
    assert float_islands(tmp_path / "unprotected.onnx")["float_ops"] == {}  # quantized behind the recipe's back


def _matmul_chain(path, width=64, layers=3, seed=0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.normal(0, 0.2, (width, width)).astype(np.float32)
        w[:, 0] *= 40  # an outlier column: coarse at 4 bits in its block
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", width])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("fallback", ["int8", "fp32"])
def test_layers_kept_out_of_int4_get_int8_or_fp32_weights(tmp_path, fallback):
    from qops.quantize import quantize

    model = _matmul_chain(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(0, 1, (32, 64)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    r = quantize(model, "int4_weight_only", tmp_path / f"q_{fallback}.onnx",
                 options={"block_size": 32, "op_types": ["MatMul"], "nodes_to_exclude": ["mm1"],
                          "fallback_precision": fallback})
    kept = "MatMulInteger" if fallback == "int8" else "fp32"
    assert r.technique["precision_summary"] == {"MatMulNBits": 2, kept: 1}
    assert r.technique.get("int8_layers", []) == (["mm1"] if fallback == "int8" else [])
    ref, out = run(model), run(r.model_path)
    assert float(np.mean((out - ref) ** 2)) < 0.05 * float(np.mean(ref ** 2))
