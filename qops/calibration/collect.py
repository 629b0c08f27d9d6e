"""One protocol for calibration statistics: a :class:`Collector` is fed one batch at a time (``collect(x)``) and
answers ``result()``, as ONNX Runtime's ``CalibraterBase`` collects ranges. The reducers keep running reductions
only (maxima, sums, row counts), so memory is one batch plus the statistic, whatever the number of rows:

- :class:`AbsMax`: per-channel running max ``|x|`` (SmoothQuant, cross-layer equalization);
- :class:`MinMax`: per-channel running min and max;
- :class:`Mean`: per-channel mean (bias correction's output shift);
- :class:`SquaredMean`: per-channel mean of ``x^2`` (llama.cpp's importance matrix);
- :class:`Hessian`: GPTQ's ``2 X^T X / n`` over the rows of the layer input.

A channel is one index of ``axis``; every other axis is a row axis. Inputs are numpy arrays or torch tensors; a
reducer keeps torch statistics as torch tensors (on the tensor's device) and numpy ones as numpy arrays. Sums are
accumulated in float64; maxima keep the input's dtype unless ``dtype`` asks for ``"float32"`` or ``"float64"``.

Two drivers feed collectors: :func:`tap` runs an ONNX model over feed batches with the tapped intermediate tensors
added as graph outputs (:func:`tap_session`) and hands each batch's value of each tensor to its collectors;
:func:`hooked` attaches torch forward hooks that hand each module's input to its collector while the block runs,
and removes them on the way out (also on an error). A new statistic is a class with ``collect`` and ``result``;
it plugs into either driver unchanged. torch is never imported here: tensors are used through their methods.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Protocol

import numpy as np


class Collector(Protocol):
    """A running statistic fed batch by batch."""

    def collect(self, x) -> None:
        """Fold one batch (a numpy array or a torch tensor) into the statistic."""

    def result(self) -> Any:
        """The statistic over every batch collected so far."""


def is_torch(x) -> bool:
    """Whether ``x`` is a torch tensor (told without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch"


def cast(x, dtype: str | None):
    """``x`` as ``dtype`` ("float32", "float64"; None: unchanged), numpy or torch alike."""
    if dtype is None:
        return x
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be None, 'float32' or 'float64' (got {dtype!r})")
    if is_torch(x):
        return x.float() if dtype == "float32" else x.double()
    return x.astype(dtype, copy=False)


def reduce_channels(x, axis: int, op: str):
    """``op`` ("max", "min", "sum") of ``x`` over every axis but ``axis``: one value per channel. For the last axis
    the rows are flattened first (``x.reshape(-1, C)`` reduced over axis 0), as the per-token statistics compute it."""
    if x.ndim == 0:
        raise ValueError("a per-channel statistic needs at least one axis")
    ax = axis % x.ndim
    if ax == x.ndim - 1:
        x, dims = x.reshape(-1, x.shape[-1]), 0
    else:
        dims = tuple(d for d in range(x.ndim) if d != ax)
    if is_torch(x):
        return {"max": x.amax, "min": x.amin, "sum": x.sum}[op](dims)
    return {"max": x.max, "min": x.min, "sum": x.sum}[op](axis=dims)


def channel_rows(x, axis: int) -> int:
    """How many rows a per-channel statistic of ``x`` along ``axis`` sees in it."""
    size = x.numel() if is_torch(x) else x.size
    return int(size // max(x.shape[axis], 1))


def maximum(a, b):
    """Elementwise max of two numpy arrays or two torch tensors (NaN propagates in both)."""
    if a is None:
        return b
    return a.maximum(b) if is_torch(a) else np.maximum(a, b)


def minimum(a, b):
    """Elementwise min of two numpy arrays or two torch tensors."""
    if a is None:
        return b
    return a.minimum(b) if is_torch(a) else np.minimum(a, b)


def detached(x):
    """A torch tensor without its graph; numpy arrays (and array-likes: ONNX Runtime outputs) as numpy arrays."""
    return x.detach() if is_torch(x) else np.asarray(x)


class AbsMax:
    """Per-channel running max of ``|x|`` along ``axis`` (default: the last axis, as per token)."""

    def __init__(self, axis: int = -1, dtype: str | None = None):
        self.axis, self.dtype = axis, dtype
        self.value, self.rows = None, 0

    def collect(self, x) -> None:
        x = detached(x)
        m = cast(reduce_channels(abs(x), self.axis, "max"), self.dtype)
        self.value = maximum(self.value, m)
        self.rows += channel_rows(x, self.axis)

    def result(self):
        """The per-channel maxima (None before any batch)."""
        return self.value


class MinMax:
    """Per-channel running min and max along ``axis``."""

    def __init__(self, axis: int = -1, dtype: str | None = None):
        self.axis, self.dtype = axis, dtype
        self.min = self.max = None
        self.rows = 0

    def collect(self, x) -> None:
        x = detached(x)
        self.min = minimum(self.min, cast(reduce_channels(x, self.axis, "min"), self.dtype))
        self.max = maximum(self.max, cast(reduce_channels(x, self.axis, "max"), self.dtype))
        self.rows += channel_rows(x, self.axis)

    def result(self) -> dict:
        """``{"min": per-channel minima, "max": per-channel maxima, "rows": rows seen}``."""
        return {"min": self.min, "max": self.max, "rows": self.rows}


class Mean:
    """Per-channel mean along ``axis`` (sums in float64)."""

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.sum, self.rows = None, 0

    def collect(self, x) -> None:
        x = cast(detached(x), "float64")
        part = reduce_channels(x, self.axis, "sum")
        self.sum = part if self.sum is None else self.sum + part
        self.rows += channel_rows(x, self.axis)

    def result(self):
        """The per-channel means, float64 (None before any batch)."""
        return None if self.sum is None else self.sum / max(self.rows, 1)


class SquaredMean:
    """Per-channel mean of ``x^2`` along ``axis`` (sums in float64): llama.cpp's importance matrix, the mean squared
    input activation of each input column of a weight."""

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.sum, self.rows = None, 0

    def collect(self, x) -> None:
        x = cast(detached(x), "float64")
        part = reduce_channels(x * x, self.axis, "sum")
        self.sum = part if self.sum is None else self.sum + part
        self.rows += channel_rows(x, self.axis)

    def result(self):
        """The per-channel mean squares, float64 (None before any batch)."""
        return None if self.sum is None else self.sum / self.rows


class Hessian:
    """GPTQ's layer Hessian ``2 X^T X / n`` over the rows of the inputs (the last axis holds the ``in`` columns),
    accumulated in float64: memory ``in x in`` whatever the number of rows. ``total``: a float64 ``[in, in]``
    buffer to accumulate into in place (then :meth:`result` is zeros, not None, when nothing was collected)."""

    def __init__(self, total=None):
        self.total, self.rows = total, 0

    def collect(self, x) -> None:
        x = cast(detached(x).reshape(-1, x.shape[-1]), "float64")
        if self.total is None:
            self.total = 2 * x.T @ x
        else:
            self.total += 2 * x.T @ x
        self.rows += len(x)

    def result(self):
        """``2 X^T X / n`` (None when nothing was collected and no ``total`` buffer was given)."""
        return None if self.total is None else self.total / max(self.rows, 1)


def tap_session(model, tensors):
    """An ONNX Runtime session over a copy of ``model`` that also outputs the intermediate ``tensors``; returns
    it with its output names (to zip with ``run``'s results)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess, [o.name for o in sess.get_outputs()]


def run_batched(sess, feeds: dict, batch: int) -> list:
    """Every output of the ONNX Runtime session ``sess`` over ``feeds`` (input name -> rows; names it lacks are
    dropped), run ``batch`` rows at a time and concatenated."""
    inputs = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    n = len(next(iter(feeds.values())))
    parts = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def reader_feeds(reader) -> Iterator[dict]:
    """The feeds of an ONNX Runtime ``CalibrationDataReader``, rewound before and after."""
    reader.rewind()
    try:
        while (feed := reader.get_next()) is not None:
            yield feed
    finally:
        reader.rewind()


def tap(model, taps: Iterable[tuple[str, Collector]], feeds: Iterable[dict]) -> int:
    """Run the ONNX ``model`` (a ModelProto) over ``feeds`` (dicts of input name to batch; names the model lacks
    are dropped) and hand each batch's value of each tapped tensor to its collector, in the order of ``taps`` (a
    tensor may have several collectors). One batch's tapped tensors are in memory at a time. Returns the number of
    rows (the first feed array's length per batch)."""
    taps = list(taps)
    sess, names = tap_session(model, list(dict.fromkeys(t for t, _ in taps)))
    index = {n: i for i, n in enumerate(names)}
    inputs = {x.name for x in sess.get_inputs()}
    rows = 0
    for feed in feeds:
        outs = sess.run(None, {k: v for k, v in feed.items() if k in inputs})
        rows += len(next(iter(feed.values()), ()))
        for t, c in taps:
            c.collect(outs[index[t]])
    return rows


@contextmanager
def hooked(hooks: Iterable[tuple[Any, Collector]]) -> Iterator[None]:
    """While the block runs, every ``(module, collector)`` pair's collector gets the module's first positional
    input on each forward call (a torch forward hook); the hooks are removed when the block ends, also on an
    error."""
    handles = []
    try:
        for module, c in hooks:
            handles.append(module.register_forward_hook(lambda _m, args, _out, c=c: c.collect(args[0])))
        yield
    finally:
        for h in handles:
            h.remove()
