"""Block reconstruction (qops.quantize.blockrec, BRECQ): blocks are found at the points where one tensor carries
everything forward (residual blocks stay whole), and fitting a block's output lowers its error on rows it never
saw below what layer-wise refinement (AdaRound per layer plus bias correction) reaches, with the PTQ graph kept."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from tests.unit.test_cnn_techniques import mobile_cnn_with_rows


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return mobile_cnn_with_rows(tmp_path_factory.mktemp("blockrec"), seed=2, cal=(1, 160), val=(2, 128))


def _block_errors(qpath, fp32, tensors, x) -> list[float]:
    from qops.calibration.collect import tap_session

    out = []
    (qs, qn), (fs, fn) = tap_session(onnx.load(str(qpath)), tensors), tap_session(onnx.load(str(fp32)), tensors)
    q, f = dict(zip(qn, qs.run(None, {"pixel_values": x}))), dict(zip(fn, fs.run(None, {"pixel_values": x})))
    for t in tensors:
        out.append(float(((q[t] - f[t]) ** 2).sum() / (f[t] ** 2).sum()))
    return out


def test_blocks_are_residual_blocks_and_reconstruction_beats_layer_wise_refinement(cnn):
    import torch

    from qops.quantize import quantize
    from qops.quantize.blockrec import find_blocks
    from qops.quantize.qdq_sim import QdqModule

    d, model, cal, val = cnn
    layer = quantize(model, "x86_64_vnni_int8", d / "layer.onnx", calibration=d / "cal.npz",
                     options={"learned_rounding": True, "rounding_iters": 300})
    block = quantize(model, "x86_64_vnni_int8", d / "block.onnx", calibration=d / "cal.npz",
                     options={"block_iters": 300})
    q = onnx.load(layer.model_path)
    fp32_tensors = {t for n in onnx.load(str(model)).graph.node for t in n.output} | {"pixel_values"}
    blocks = find_blocks(q, fp32_tensors, QdqModule(q, torch))
    # the stem (conv + ReLU6) and the first residual block, the second residual block, the head: 4 + 3 + 1 layers
    assert [(b["input"], b["output"], b["layers"]) for b in blocks] == [
        ("pixel_values", "/3/Add_output_0", 4), ("/3/Add_output_0", "/4/Add_output_0", 3),
        ("/4/Add_output_0", "logits", 1)]
    rep = block.technique["block_reconstruction"]
    assert [b["output"] for b in rep["blocks"]] == [b["output"] for b in blocks]
    assert all(b["error_after"] <= b["error_before"] for b in rep["blocks"])
    outs = [b["output"] for b in blocks]
    layer_err = _block_errors(layer.model_path, model, outs, val)
    block_err = _block_errors(block.model_path, model, outs, val)
    # the residual blocks (4 and 3 layers) end lower than layer-wise refinement on the held-out rows (measured on a
    # Sapphire Rapids Xeon: 20% and 16%; with AVX2 kernels and one thread 19% and 15%); the head is one layer, where
    # a block is a layer (there the two land within 2% of each other, either side, by CPU)
    multi = [(a, b) for a, b, blk in zip(layer_err, block_err, blocks) if blk["layers"] > 1]
    assert len(multi) == 2 and all(b < 0.97 * a for a, b in multi), (layer_err, block_err)
    ops = lambda p: Counter(n.op_type for n in onnx.load(p).graph.node)  # noqa: E731
    assert ops(block.model_path) == ops(layer.model_path)  # the same graph: only initializers changed
    assert block.technique["float_islands"] == {"float_ops": {}, "requantizations": 0}


def test_adaround_blocks_round_each_weight_up_or_down_from_its_fp32_value(cnn):
    """BRECQ's rounding: every INT8 weight ends within one step of the FP32 weight (its floor or ceiling), and the
    blocks' errors on the rows they were fitted on do not rise."""
    from onnx import numpy_helper

    from qops.quantize import quantize

    d, model, cal, val = cnn
    r = quantize(model, "x86_64_vnni_int8", d / "ada.onnx", calibration=d / "cal.npz",
                 options={"block_iters": 100, "block_rounding": "adaround", "bias_correction": "off"})
    rep = r.technique["block_reconstruction"]
    assert len(rep["blocks"]) == 3 and all(b["error_after"] <= b["error_before"] for b in rep["blocks"])
    q = onnx.load(r.model_path)
    f = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model)).graph.initializer}
    qi = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    checked = 0
    for n in q.graph.node:
        if n.op_type == "Conv":  # ONNX Runtime names a quantized weight after its FP32 initializer
            dq = producer[n.input[1]]
            w, s = qi[dq.input[0]].astype(np.float64), qi[dq.input[1]].astype(np.float64).reshape(-1, 1, 1, 1)
            steps = f[dq.input[0].removesuffix("_quantized")] / s
            assert np.all((w >= np.floor(steps) - 1e-6) & (w <= np.ceil(steps) + 1e-6)), n.name
            checked += 1
    assert checked == 7
