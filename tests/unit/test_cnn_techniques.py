"""Static INT8 for convolutional graphs on a small mobile-style CNN (depthwise-separable blocks with ReLU6, a residual
Add, global pooling; weights drawn with the spread of real checkpoints' BatchNorm-folded depthwise kernels):
the integer graph, layer-wise bias correction and learned rounding, streaming calibration, and the coverage note."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper


def _mobile_cnn(path, seed=0):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, c, e):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(c, c * e, 1), nn.BatchNorm2d(c * e), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e), nn.BatchNorm2d(c * e),
                                    nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(c * e, c, 1), nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.project(self.dw(self.expand(x)))

    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                        Block(16, 4), Block(16, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # BatchNorm statistics like a trained network's: some channels nearly silent
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features) ** 4 * 2 + 1e-3)
                m.running_mean.copy_(torch.randn(m.num_features) * 0.3)
                m.weight.copy_(1 + torch.rand(m.num_features))
    return export_image_model(net, path, 32)


def mobile_cnn_with_rows(d, seed: int, cal: tuple[int, int], val: tuple[int, int]):
    """:func:`_mobile_cnn` at ``d/fp32.onnx`` with calibration rows (``cal`` = (rng seed, rows), saved as
    ``d/cal.npz``) and validation rows (``val``) drawn around 0.3: ``(d, model, cal rows, val rows)``."""
    def rows(spec):
        return np.random.default_rng(spec[0]).normal(0.3, 1.0, (spec[1], 3, 32, 32)).astype(np.float32)

    model = _mobile_cnn(d / "fp32.onnx", seed=seed)
    x_cal, x_val = rows(cal), rows(val)
    np.savez(d / "cal.npz", pixel_values=x_cal)
    return d, model, x_cal, x_val


def export_image_model(net, path, side: int):
    """``net`` (eval mode) as ONNX: input ``pixel_values`` [n, 3, side, side], output ``logits``, dynamic batch."""
    import torch

    net.eval()
    torch.onnx.export(net, (torch.randn(2, 3, side, side),), str(path), input_names=["pixel_values"],
                      output_names=["logits"], dynamic_axes={"pixel_values": {0: "n"}, "logits": {0: "n"}},
                      opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn")
    model = _mobile_cnn(d / "fp32.onnx")
    rng = np.random.default_rng(0)
    cal = rng.normal(0.3, 1.0, (96, 3, 32, 32)).astype(np.float32)
    val = rng.normal(0.3, 1.0, (64, 3, 32, 32)).astype(np.float32)
    np.savez(d / "cal.npz", pixel_values=cal)
    return d, model, val


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]


def _q(cnn, name, **options):
    from qops.quantize import quantize

    d, model, _ = cnn
    options.setdefault("range_search", "off")  # each technique measured alone (the range search: test_rangesearch)
    return quantize(model, "x86_64_vnni_int8", d / f"{name}.onnx", calibration=d / "cal.npz", options=options)


def test_the_integer_graph_leaves_no_float_op_between_integer_ops(cnn):
    from qops.quantize.cnn import float_islands

    res = _q(cnn, "int", bias_correction="off")
    assert res.technique["integer_graph"]
    assert res.technique["float_islands"] == {"float_ops": {}, "requantizations": 0}
    assert float_islands(res.model_path) == res.technique["float_islands"]
    off = _q(cnn, "no_int", integer_graph="off", bias_correction="off")
    islands = off.technique["float_islands"]  # Conv/Gemm-only QDQ: pooling and an Add run in float, and the
    assert islands["float_ops"].get("GlobalAveragePool") == 1 and islands["float_ops"].get("Add", 0) >= 1
    assert islands["requantizations"] >= 5  # graph goes back to float and is quantized again, again and again
    assert res.technique["weighted_nodes"]["Conv"] == {"quantized": 7, "total": 7}


def test_bias_correction_removes_the_mean_output_shift_it_measures(cnn):
    d, model, val = cnn
    plain = _q(cnn, "plain", bias_correction="off")
    corrected = _q(cnn, "bc", bias_correction="on", refine_rows=96)
    assert corrected.technique["refinement"]["bias_corrected"] == 8  # 7 Convs and the classifier's Gemm
    cal = np.load(d / "cal.npz")["pixel_values"]
    ref_cal = _run(model, cal)

    def shift(path):  # the mean output difference per logit, relative to the logits' spread
        return float(np.abs((_run(path, cal) - ref_cal).mean(axis=0)).mean() / ref_cal.std())

    before, after = shift(plain.model_path), shift(corrected.model_path)
    # the last layer is corrected on the quantized network's own inputs: the shift it measured is gone
    assert after < 0.2 * before, (before, after)
    # and the model is more faithful on rows it never saw
    ref = _run(model, val)
    err = [float(np.mean((_run(p, val) - ref) ** 2)) for p in (plain.model_path, corrected.model_path)]
    assert err[1] < err[0], err


def test_bias_correction_streamed_batch_by_batch_equals_one_pass_over_its_rows(cnn):
    def biases(res):
        m = onnx.load(res.model_path)
        return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer
                if i.data_type == onnx.TensorProto.INT32 and not i.name.endswith("zero_point")}

    streamed = _q(cnn, "bc4", bias_correction="on", refine_rows=96, calibration_batch=4)
    whole = _q(cnn, "bc96", bias_correction="on", refine_rows=96, calibration_batch=96)
    assert streamed.technique["refinement"]["rows"] == whole.technique["refinement"]["rows"] == 96
    a, b = biases(streamed), biases(whole)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:  # the same correction up to summation order (one INT32 step)
        assert np.abs(a[k].astype(np.int64) - b[k].astype(np.int64)).max() <= 1, k


def test_learned_rounding_moves_weights_by_at_most_one_step_and_never_hurts_a_layer(cnn):
    d, model, _ = cnn
    near = _q(cnn, "near", bias_correction="off")
    ada = _q(cnn, "ada", bias_correction="off", learned_rounding=True, rounding_iters=150, rounding_rows=48)
    ref = ada.technique["refinement"]
    assert ref["rounding_learned"] >= 1 and ref["rounding_mse_ratio_median"] <= 1.0
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(ada.model_path).graph.initializer}
    n = {i.name: numpy_helper.to_array(i) for i in onnx.load(near.model_path).graph.initializer}
    moved = 0
    for k, v in a.items():
        if v.dtype == np.int8 and k in n and v.shape == n[k].shape:
            step = np.abs(v.astype(int) - n[k].astype(int))
            assert step.max() <= 1, k
            moved += int(step.sum())
    assert moved > 0


def test_streaming_calibration_gives_the_ranges_of_one_pass_over_all_rows(cnn):
    def scales(res):
        m = onnx.load(res.model_path)
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}

    small = scales(_q(cnn, "b4", bias_correction="off", calibration_batch=4))
    whole = scales(_q(cnn, "b96", bias_correction="off", calibration_batch=96))
    assert small.keys() == whole.keys() and all(small[k] == pytest.approx(whole[k], rel=1e-6) for k in small)
    # histogram methods merge batch by batch: close to one pass (the merge re-bins)
    p4 = scales(_q(cnn, "p4", bias_correction="off", calibration_batch=4, calibration_method="percentile"))
    p96 = scales(_q(cnn, "p96", bias_correction="off", calibration_batch=96, calibration_method="percentile"))
    assert all(p4[k] == pytest.approx(p96[k], rel=0.1) for k in p4)


def test_a_target_that_leaves_most_of_a_cnn_in_float_says_so(cnn):
    from qops.quantize import quantize

    d, model, _ = cnn
    res = quantize(model, "int4_weight_only", d / "int4.onnx")
    assert res.technique["weighted_nodes"]["Conv"] == {"quantized": 0, "total": 7}
    assert any("only 1 of 8 weighted nodes were quantized" in n for n in res.notes), res.notes


def test_tuning_trials_that_calibrate_the_same_graph_reuse_its_ranges(cnn, tmp_path):
    """Inside a calibration_cache block (the tuner's trials), a second static quantization of the same prepared
    graph with the same calibration reuses the first one's ranges, and its model is the one computed from scratch;
    another calibration method (or another graph) computes its own."""
    from qops.quantize import quantize
    from qops.quantize.calib_cache import calibration_cache

    d, model, _ = cnn
    cal = d / "cal.npz"
    q = lambda name, **o: quantize(model, "x86_64_vnni_int8", tmp_path / f"{name}.onnx", calibration=cal,  # noqa: E731
                                   options={"bias_correction": "off", **o})
    with calibration_cache(tmp_path / "cache"):
        a = q("a")
        b = q("b", per_channel=False)  # weights differ, activation ranges do not
        c = q("c", calibration_method="percentile")
        a2 = q("a2")
    assert [r.technique["calibration_reused"] for r in (a, b, c, a2)] == [False, True, False, True]
    assert len(list((tmp_path / "cache").glob("ranges-*.json"))) == 2
    fresh = q("fresh")  # outside the block: nothing cached, computed again
    assert fresh.technique["calibration_reused"] is False
    x = np.load(cal)["pixel_values"][:8]
    np.testing.assert_array_equal(_run(a2.model_path, x), _run(fresh.model_path, x))
