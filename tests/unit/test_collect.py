"""The statistics collector protocol (qops.calibration.collect): every reducer against the straightforward
computation over all rows at once (numpy and torch, channel last and channel 1), and bitwise against the running
formulas the ported SmoothQuant/equalization/bias-correction/GPTQ/importance-matrix loops used; memory that does
not grow with the batches; the ONNX tap driver and the torch hook driver (hooks gone afterwards, also on an error)."""

from __future__ import annotations

import numpy as np
import pytest

from qops.calibration.collect import AbsMax, Hessian, Mean, MinMax, SquaredMean, hooked, reader_feeds, tap


def _batches(shape=(6, 5, 12), n=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 1, shape) * rng.uniform(0.1, 10, shape[-1])).astype(dtype) for _ in range(n)]


def _feed(collector, batches):
    for b in batches:
        collector.collect(b)
    return collector.result()


def _rows(batches, axis):
    """All batches as one [rows, channels] matrix (channel = ``axis``)."""
    return np.concatenate([np.moveaxis(b, axis, -1).reshape(-1, b.shape[axis]) for b in batches])


@pytest.mark.parametrize("axis, shape", [(-1, (6, 5, 12)), (1, (3, 7, 4, 5)), (1, (9, 6))])
def test_numpy_reducers_equal_the_statistic_over_all_rows_at_once(axis, shape):
    batches = _batches(shape)
    x = _rows(batches, axis).astype(np.float64)
    np.testing.assert_array_equal(_feed(AbsMax(axis), batches), np.abs(x).max(0))
    mm = _feed(MinMax(axis), batches)
    np.testing.assert_array_equal(mm["min"], x.min(0))
    np.testing.assert_array_equal(mm["max"], x.max(0))
    assert mm["rows"] == len(x)
    np.testing.assert_allclose(_feed(Mean(axis), batches), x.mean(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(_feed(SquaredMean(axis), batches), (x * x).mean(0), rtol=1e-12)
    if axis == -1:
        np.testing.assert_allclose(_feed(Hessian(), batches), 2 * x.T @ x / len(x), rtol=1e-12, atol=1e-12)


def test_torch_reducers_equal_numpy_and_stay_torch():
    import torch

    batches = _batches((2, 9, 16))
    tb = [torch.from_numpy(b) for b in batches]
    for make in (AbsMax, lambda: MinMax(dtype="float64"), Mean, SquaredMean, Hessian):
        a, t = _feed(make(), batches), _feed(make(), tb)
        if isinstance(a, dict):
            a, t = a["max"], t["max"]
        assert isinstance(t, torch.Tensor)
        np.testing.assert_allclose(t.numpy(), a, rtol=1e-12, atol=1e-12)
    assert _feed(AbsMax(dtype="float32"), [b.double() for b in tb]).dtype == torch.float32
    assert _feed(AbsMax(), batches).dtype == np.float32  # maxima keep the input's dtype
    assert _feed(Mean(), batches).dtype == np.float64  # sums are float64


def test_reducers_match_the_running_formulas_they_replace_bitwise():
    """The formulas of the loops ported to the collectors (SmoothQuant ONNX and torch, equalization, bias correction,
    GPTQ Hessians, the GGUF importance matrix), each on its own batches, compared bit for bit."""
    import torch

    batches = _batches((3, 11, 24), n=5)
    old = None
    for b in batches:  # SmoothQuant (ONNX): per-token |x| maxima
        a = np.abs(b).reshape(-1, b.shape[-1]).max(axis=0)
        old = a if old is None else np.maximum(old, a)
    np.testing.assert_array_equal(_feed(AbsMax(), batches), old)

    maps = [torch.from_numpy(b) for b in _batches((2, 6, 5, 5), n=3)]
    mx = amax = None
    for x in maps:  # cross-layer equalization: channel = axis 1, float32
        x = np.asarray(x.numpy(), dtype=np.float32)
        axes = tuple(d for d in range(x.ndim) if d != 1)
        m, a = x.max(axis=axes), np.abs(x).max(axis=axes)
        mx, amax = (m, a) if mx is None else (np.maximum(mx, m), np.maximum(amax, a))
    np.testing.assert_array_equal(_feed(MinMax(axis=1, dtype="float32"), [m.numpy() for m in maps])["max"], mx)
    np.testing.assert_array_equal(_feed(AbsMax(axis=1, dtype="float32"), [m.numpy() for m in maps]), amax)

    total, count = None, 0
    for d in maps:  # bias correction: per-channel mean of the output shift (axis 1), torch, float64
        part = d.double().sum(dim=[k for k in range(d.dim()) if k != 1]).numpy()
        total, count = (part if total is None else total + part), count + d.numel() // d.shape[1]
    assert _feed(Mean(axis=1), maps).numpy().tobytes() == (total / max(count, 1)).tobytes()

    tb = [torch.from_numpy(b) for b in batches]
    m = None
    for x in tb:  # SmoothQuant (torch hooks)
        a = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        m = a if m is None else torch.maximum(m, a)
    assert torch.equal(_feed(AbsMax(dtype="float32"), tb), m)

    h, n = torch.zeros(24, 24, dtype=torch.float64), 0
    s, c = 0, 0
    for b in tb:  # GPTQ Hessian; llama-imatrix's mean square
        x = b.detach().reshape(-1, b.shape[-1]).double()
        h += 2 * x.T @ x
        n += len(x)
        s, c = s + (x * x).sum(0), c + x.shape[0]
    assert torch.equal(_feed(Hessian(torch.zeros(24, 24, dtype=torch.float64)), tb), h / max(n, 1))
    assert torch.equal(_feed(Hessian(), tb), h / n)
    assert torch.equal(_feed(SquaredMean(), tb), s / c)


def test_memory_does_not_grow_with_the_batches():
    def size(c):
        return sum(v.nbytes for v in vars(c).values() if isinstance(v, np.ndarray))

    for make in (AbsMax, MinMax, Mean, SquaredMean, Hessian):
        few, many = make(), make()
        _feed(few, _batches(n=2))
        _feed(many, _batches(n=40))
        assert size(few) == size(many) > 0, make


def test_empty_collectors():
    assert AbsMax().result() is None and Mean().result() is None and Hessian().result() is None
    assert MinMax().result() == {"min": None, "max": None, "rows": 0}
    np.testing.assert_array_equal(Hessian(np.zeros((3, 3))).result(), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        AbsMax(dtype="int8").collect(np.ones((2, 2)))


def _onnx_relu_scale():
    """x [n, 4] -> Relu -> r -> Mul 2 -> y."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_tap_feeds_each_tensor_to_its_collectors_batch_by_batch():
    model = _onnx_relu_scale()
    xs = _batches((10, 4), n=3)
    r_max, r_abs, y_mean = MinMax(), AbsMax(), Mean()
    rows = tap(model, [("r", r_max), ("r", r_abs), ("y", y_mean)],
               ({"x": x, "not_an_input": x} for x in xs))  # names the model lacks are dropped
    assert rows == 30 and len(model.graph.output) == 1  # the model itself is not changed
    x = np.concatenate(xs)
    np.testing.assert_array_equal(r_max.result()["max"], np.maximum(x, 0).max(0))
    np.testing.assert_array_equal(r_abs.result(), np.maximum(x, 0).max(0))
    np.testing.assert_allclose(y_mean.result(), (2 * np.maximum(x, 0)).mean(0), rtol=1e-6)


def test_reader_feeds_rewinds_before_and_after():
    class Reader:
        def __init__(self):
            self.i, self.rewinds = 5, 0

        def get_next(self):
            self.i += 1
            return {"x": np.ones((1, 4), np.float32)} if self.i <= 3 else None

        def rewind(self):
            self.i, self.rewinds = 0, self.rewinds + 1

    r = Reader()
    assert len(list(reader_feeds(r))) == 3 and r.rewinds == 2


def test_ported_onnx_statistics_equal_the_direct_computation():
    import onnxruntime as ort

    from qops.quantize.equalize import channel_stats
    from qops.quantize.smoothquant import activation_absmax

    model = _onnx_relu_scale()
    xs = _batches((8, 4), n=3, seed=2)
    x = np.concatenate(xs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            return {"x": xs[self.i - 1]} if self.i <= len(xs) else None

        def rewind(self):
            self.i = 0

    got = activation_absmax(model, ["x", "y"], Reader())
    np.testing.assert_array_equal(got["x"], np.abs(x).max(0))
    np.testing.assert_array_equal(got["y"], np.abs(y).max(0))
    stats = channel_stats(model, ["y"], ({"x": b} for b in xs))
    assert stats["y"]["rows"] == 24
    np.testing.assert_array_equal(stats["y"]["max"], y.max(0))
    np.testing.assert_array_equal(stats["y"]["absmax"], np.abs(y).max(0))


def test_hooked_feeds_module_inputs_and_removes_its_hooks():
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    h, sq = Hessian(), SquaredMean()
    xs = [torch.randn(2, 5, 6) for _ in range(3)]
    with hooked([(lin, h), (lin, sq)]), torch.inference_mode():
        for x in xs:
            lin(x)
    assert not lin._forward_hooks
    x = torch.cat([t.reshape(-1, 6) for t in xs]).double()
    torch.testing.assert_close(h.result(), 2 * x.T @ x / len(x))
    torch.testing.assert_close(sq.result(), (x * x).mean(0))
    with pytest.raises(RuntimeError, match="boom"):
        with hooked([(lin, AbsMax())]):
            raise RuntimeError("boom")
    assert not lin._forward_hooks
