"""Activation ranges searched by output error (qops.quantize.rangesearch): a range made too wide is found and
narrowed, the output error falls on rows the search never saw, every bias stays on its input x weight scale grid,
and the graph is the PTQ graph; the default recipe runs it on convolutional graphs only."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.unit.test_cnn_techniques import mobile_cnn_with_rows


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return mobile_cnn_with_rows(tmp_path_factory.mktemp("rangesearch"), seed=3, cal=(4, 128), val=(5, 128))


def _error(model, fp32, x) -> float:
    from qops.quantize.rangesearch import model_outputs, row_errors

    return float(row_errors(model_outputs(model, {"pixel_values": x}), model_outputs(onnx.load(str(fp32)), {"pixel_values": x})).mean())


def _scales(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_a_range_made_too_wide_is_narrowed_and_the_held_out_error_falls(cnn):
    import torch

    from qops.quantize import quantize
    from qops.quantize.qdq_sim import QdqModule, write_initializers
    from qops.quantize.rangesearch import clip_caps, search_ranges

    d, model, cal, val = cnn
    base = quantize(model, "x86_64_vnni_int8", d / "base.onnx", calibration=d / "cal.npz",
                    options={"range_search": "off"})
    assert "range_search" not in base.technique
    q = onnx.load(base.model_path)
    # plant a bad range: the first residual sum's scale 4x too wide (its consumers' biases re-derived with it)
    sim = QdqModule(q, torch, learn_ranges=True)
    planted = "/3/Add_output_0_scale"
    key = sim.act_scales[planted][0]
    with torch.no_grad():
        sim.ranges[key].fill_(float(np.log(4.0)))
    write_initializers(q, sim.export())
    wide = _scales(q)[planted].item()
    err_planted = _error(q, model, val)
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in q.graph.node]

    rep = search_ranges(q, onnx.load(str(model)), {"pixel_values": cal}, sweeps=2)
    assert rep["error_after"] < rep["error_before"]
    narrowed = _scales(q)[planted].item()
    assert narrowed < 0.8 * wide  # the planted range came back down
    assert _error(q, model, val) < 0.9 * err_planted  # on rows the search never saw
    assert [(n.op_type, list(n.input), list(n.output)) for n in q.graph.node] == nodes  # same graph
    # a ReLU6 output's range (ONNX Runtime folds the Clip into it) never widens past 6, even when only widening is
    # tried: the range is the clip
    base_q = onnx.load(base.model_path)
    base_sim = QdqModule(base_q, torch, learn_ranges=True)
    caps = clip_caps(base_q, onnx.load(str(model)), base_sim)
    clips = {k: v.item() for k, v in _scales(base_q).items() if k.endswith("Clip_output_0_scale")}
    assert len(clips) == 5 and len(caps) == 5
    for name, s0 in clips.items():  # the cap is the multiplier that puts the range's top at 6
        assert caps[base_sim.act_scales[name][0]] * s0 * 255 == pytest.approx(6.0, rel=1e-5)
    # a search that may only widen 3x tries every scale but those five
    rep3 = search_ranges(base_q, onnx.load(str(model)), {"pixel_values": cal}, multipliers=(3.0,))
    assert rep3["tried"] == rep3["scales"] - 5
    after = {k: v.item() for k, v in _scales(base_q).items() if k.endswith("Clip_output_0_scale")}
    assert all(v * 255 <= 6 * (1 + 1e-6) for v in after.values()), after
    # every INT32 bias stays on its layer's input scale x weight scale grid
    inits, producer = _scales(q), {o: n for n in q.graph.node for o in n.output}
    checked = 0
    for n in q.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3:
            continue
        x, w, b = (producer[t] for t in n.input[:3])
        if x.op_type != "DequantizeLinear":
            continue
        np.testing.assert_allclose(inits[b.input[1]].reshape(-1),
                                   (inits[x.input[1]] * inits[w.input[1]]).reshape(-1), rtol=1e-6)
        checked += 1
    assert checked >= 7


def test_default_recipe_searches_ranges_on_convolutional_graphs_only(cnn, tmp_path):
    from qops.quantize import quantize

    d, model, cal, val = cnn
    r = quantize(model, "x86_64_vnni_int8", tmp_path / "q.onnx", calibration=d / "cal.npz")
    rep = r.technique["range_search"]
    assert rep["rows"] == 128 and rep["scales"] > 5 and rep["tried"] >= rep["scales"]
    assert rep["error_after"] <= rep["error_before"]
    assert r.technique["float_islands"] == {"float_ops": {}, "requantizations": 0}
    off = quantize(model, "x86_64_vnni_int8", tmp_path / "off.onnx", calibration=d / "cal.npz",
                   options={"range_search": "off"})
    ops = lambda p: Counter(n.op_type for n in onnx.load(p).graph.node)  # noqa: E731
    assert ops(r.model_path) == ops(off.model_path)
    assert _error(onnx.load(r.model_path), model, val) <= 1.02 * _error(onnx.load(off.model_path), model, val)


def test_mlp_graphs_skip_the_search_by_default_and_bad_sweeps_are_refused(tmp_path):
    import torch
    from torch import nn

    from qops.errors import QopsError
    from qops.quantize import quantize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    torch.onnx.export(net, (torch.randn(2, 8),), str(tmp_path / "mlp.onnx"), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
    r = quantize(tmp_path / "mlp.onnx", "x86_64_vnni_int8", tmp_path / "q.onnx", calibration=tmp_path / "cal.npz",
                 options={"mode": "static"})
    assert "range_search" not in r.technique
    with pytest.raises(QopsError, match="range_sweeps"):
        quantize(tmp_path / "mlp.onnx", "x86_64_vnni_int8", tmp_path / "q2.onnx", calibration=tmp_path / "cal.npz",
                 options={"mode": "static", "range_search": "on", "range_sweeps": 0})
