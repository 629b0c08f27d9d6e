"""A static QDQ ONNX graph as a differentiable PyTorch function (:class:`QdqModule`): what
:mod:`qops.quantize.finetune` trains.

- every weight ``DequantizeLinear`` of a constant INT8 tensor becomes a float parameter, fake-quantized in the
  forward pass with the recipe's per-channel scales (rounding by the straight-through estimator);
- every INT32 bias becomes a float parameter (rounded to its ``input scale x weight scale`` grid on export);
- every activation ``QuantizeLinear -> DequantizeLinear`` pair fake-quantizes with its calibrated scale and zero
  point (values outside the range get no gradient, as the integer kernels clip them);
- with ``learn_ranges`` the scales train too, as learned step sizes (LSQ, Esser et al. 2020; parameterised as a
  log-multiplier of the calibrated scale, so a step is a relative change): one per activation scale (scale
  initializers holding the same value and zero point share one, which keeps the equal scales ONNX Runtime
  needs to drop a QDQ pair around MaxPool, Reshape or Concat equal) and one per weight channel. Export writes
  the learned scales and re-derives every INT32 bias scale as ``input scale x weight scale``;
- the other ops (Conv, Gemm, MatMul, Add, Mul, Relu, Clip, pooling, Reshape, Flatten, Concat, ...) are their
  PyTorch equivalents.

Zero points and the graph are never changed, so the exported model has the PTQ model's structure and speed.
"""

from __future__ import annotations

import numpy as np

from qops.quantize.graph import node_attrs

# ops that only move or select data: ONNX Runtime runs them on the integer tensor when input and output scales match
_TIED = {"MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split",
         "Slice", "Gather", "Identity", "Resize", "Pad", "DepthToSpace", "SpaceToDepth"}


_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def _h(torch, v):
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


class UnsupportedGraph(ValueError):
    """The QDQ graph has an op this simulator does not run."""


def _shape(v, axis: int, ndim: int):
    if v.dim() == 0:
        return v
    sh = [1] * ndim
    sh[axis] = -1
    return v.reshape(sh)


class QdqModule:
    """The QDQ graph as a differentiable function of its weight and bias parameters (a ``torch.nn.Module`` is
    built in :meth:`__init__`; call :meth:`forward` with feeds by input name)."""

    def __init__(self, model, torch, learn_ranges: bool = False):
        from onnx import numpy_helper

        self.torch = torch
        self.model = model
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.const = {k: torch.from_numpy(np.array(v)) for k, v in self.inits.items()}
        for n in model.graph.node:
            if n.op_type == "Constant":
                self.const[n.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(node_attrs(n)["value"])))
        self.params = torch.nn.ParameterDict()
        self.weight_dq: dict[str, dict] = {}  # DQ output -> how its parameter is fake-quantized
        consumers: dict[str, list] = {}
        for n in model.graph.node:
            for t in n.input:
                consumers.setdefault(t, []).append(n)
        for n in model.graph.node:
            if n.op_type != "DequantizeLinear" or n.input[0] not in self.inits:
                continue
            q = self.inits[n.input[0]]
            if q.dtype not in (np.int8, np.uint8, np.int32) or q.ndim == 0:
                continue
            users = consumers.get(n.output[0], [])
            if not users or any(u.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose") for u in users):
                continue
            scale = self.inits[n.input[1]].astype(np.float32)
            zp = self.inits[n.input[2]].astype(np.float32) if len(n.input) > 2 and n.input[2] else np.zeros_like(scale)
            axis = node_attrs(n).get("axis", 1)
            if q.ndim == 1:
                axis = 0
            s, z = torch.from_numpy(scale), torch.from_numpy(zp)
            value = (torch.from_numpy(q.astype(np.float32)) - _shape(z, axis, q.ndim)) * _shape(s, axis, q.ndim)
            key = f"p{len(self.params)}"
            self.params[key] = torch.nn.Parameter(value.clone())
            info = np.iinfo(q.dtype)
            qmin = -127.0 if q.dtype == np.int8 and not zp.any() and q.min() >= -127 else float(info.min)
            self.weight_dq[n.output[0]] = {"key": key, "init": n.input[0], "scale": s, "zp": z, "axis": axis,
                                           "qmin": qmin, "qmax": float(info.max), "dtype": q.dtype,
                                           "bias": q.dtype == np.int32}
        self.ranges = torch.nn.ParameterDict()  # learned step sizes: log-multipliers of the calibrated scales
        self.act_scales: dict[str, tuple[str, object]] = {}  # scale initializer -> (its parameter, calibrated)
        if learn_ranges:
            self._learnable_ranges(consumers)
        self.inputs = [i.name for i in model.graph.input if i.name not in self.inits]
        self.outputs = [o.name for o in model.graph.output]
        for n in model.graph.node:
            if n.op_type not in _OPS and n.op_type != "Constant" and not (
                    n.op_type == "DequantizeLinear" and n.output[0] in self.weight_dq):
                raise UnsupportedGraph(f"op {n.op_type} ({n.name})")

    def _learnable_ranges(self, consumers) -> None:
        """A log-multiplier per weight channel and per distinct activation (scale, zero point)."""
        torch = self.torch
        for spec in self.weight_dq.values():
            if not spec["bias"]:
                spec["range"] = f"w{len(self.ranges)}"
                self.ranges[spec["range"]] = torch.nn.Parameter(torch.zeros_like(spec["scale"]))
        # one step size per activation scale initializer; those that ONNX Runtime needs equal stay tied: scales
        # of equal value on both sides of an op that only moves data (it drops the QDQ pair around MaxPool,
        # Reshape, Concat... only between equal scales and zero points)
        parent: dict[str, str] = {}

        def find(a: str) -> str:
            while parent.setdefault(a, a) != a:
                a = parent[a]
            return a

        producer = {o: n for n in self.model.graph.node for o in n.output}
        act = {}
        for n in self.model.graph.node:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.output[0] in self.weight_dq:
                continue
            if n.input[0] in self.inits or n.input[1] not in self.inits:
                continue
            scale = self.inits[n.input[1]]
            if not scale.ndim and scale.dtype == np.float32:
                act[n.output[0] if n.op_type == "DequantizeLinear" else n.input[0]] = n.input[1]
                find(n.input[1])
        for n in self.model.graph.node:
            if n.op_type not in _TIED or not n.output or n.output[0] not in act:
                continue
            out_scale = act[n.output[0]]
            for i in n.input:
                src = producer.get(i)
                if src is not None and src.op_type == "DequantizeLinear" and i in act and \
                        np.array_equal(self.inits[act[i]], self.inits[out_scale]):
                    parent[find(act[i])] = find(out_scale)
        keys: dict[str, str] = {}
        for name in parent:
            root = find(name)
            if root not in keys:
                keys[root] = f"a{len(self.ranges)}"
                self.ranges[keys[root]] = torch.nn.Parameter(torch.zeros(()))
            self.act_scales[name] = (keys[root], torch.from_numpy(np.array(self.inits[name])))

    def weight_scale(self, spec):
        s = spec["scale"]
        return s * self.torch.exp(self.ranges[spec["range"]]) if "range" in spec else s

    def _ste_round(self, x):
        return x + (self.torch.round(x) - x).detach()

    def soft_rounding(self, dq_outputs, fp32: dict | None = None) -> list:
        """Switch the weights behind ``dq_outputs`` to AdaRound's learned rounding (Nagel et al. 2020): each weight
        is ``floor(w / s) + h(v)`` steps, ``h`` a rectified sigmoid of a parameter ``v`` that starts at the weight's
        fractional part — of the FP32 weight in ``fp32`` (DQ output -> array) where it lies within a step of the
        quantized one, else of the quantized weight itself; the scale stays fixed. Returns the ``v`` parameters; :meth:`rounding_penalty` pushes each
        ``h`` to 0 or 1 and :meth:`hard_rounding` ends it."""
        torch, out = self.torch, []
        for dq in dq_outputs:
            spec = self.weight_dq[dq]
            if spec["bias"] or "soft" in spec:
                continue
            with torch.no_grad():
                w = self.params[spec["key"]]
                s = _shape(self.weight_scale(spec), spec["axis"], w.dim())
                f = (fp32 or {}).get(dq)
                if f is not None and f.shape == tuple(w.shape):
                    f = torch.from_numpy(np.array(f, dtype=np.float32))
                    if bool(((f - w).abs() <= s * 1.001).all()):
                        w = f
                floor = torch.floor(w / s)
                rest = (w / s - floor).clamp(0.01, 0.99)
            v = torch.nn.Parameter(torch.log((rest - _GAMMA) / (_ZETA - rest)))
            spec["soft"] = {"floor": floor, "v": v, "scale": s}
            out.append(v)
        return out

    def rounding_penalty(self, beta: float):
        """AdaRound's regulariser over the weights in soft rounding: 0 when every ``h`` is 0 or 1."""
        terms = [(1 - (2 * _h(self.torch, sp["soft"]["v"]) - 1).abs().pow(beta)).sum()
                 for sp in self.weight_dq.values() if "soft" in sp]
        return sum(terms) if terms else 0.0

    def hard_rounding(self) -> None:
        """End soft rounding: each weight becomes its rounded-up or -down value (``h >= 0.5``)."""
        torch = self.torch
        with torch.no_grad():
            for spec in self.weight_dq.values():
                soft = spec.pop("soft", None)
                if soft is not None:
                    self.params[spec["key"]].copy_((soft["floor"] + (soft["v"] >= 0).float()) * soft["scale"])

    def _fake_weight(self, spec):
        torch = self.torch
        w = self.params[spec["key"]]
        if spec["bias"]:
            return w  # INT32 biases: float while training, rounded on export
        if "soft" in spec:
            sp, z = spec["soft"], _shape(spec["zp"], spec["axis"], w.dim())
            return (torch.clamp(sp["floor"] + _h(torch, sp["v"]) + z, spec["qmin"], spec["qmax"]) - z) * sp["scale"]
        s = _shape(self.weight_scale(spec), spec["axis"], w.dim())
        z = _shape(spec["zp"], spec["axis"], w.dim())
        q = torch.clamp(self._ste_round(w / s) + z, spec["qmin"], spec["qmax"])
        return (q - z) * s

    def environment(self, feeds: dict) -> dict:
        """Constants, the current (learned) activation scales and ``feeds``: what :meth:`run` evaluates nodes in."""
        env = dict(self.const)
        for name, (key, s0) in self.act_scales.items():
            env[name] = s0 * self.torch.exp(self.ranges[key])
        env.update(feeds)
        return env

    def run(self, env: dict, nodes) -> dict:
        """Evaluate ``nodes`` (in graph order) in ``env``, adding their outputs to it."""
        for n in nodes:
            if n.op_type == "Constant":
                continue
            if n.op_type == "DequantizeLinear" and n.output[0] in self.weight_dq:
                env[n.output[0]] = self._fake_weight(self.weight_dq[n.output[0]])
                continue
            args = [env[i] if i else None for i in n.input]
            out = _OPS[n.op_type](self, n, args)
            if not isinstance(out, (list, tuple)):
                out = [out]
            for name, v in zip(n.output, out):
                env[name] = v
        return env

    def forward(self, feeds: dict):
        env = self.run(self.environment(feeds), self.model.graph.node)
        return [env[o] for o in self.outputs]

    def export(self) -> dict:
        """Initializers (name -> array) for the trained parameters: INT8 weights, INT32 biases and, with learned
        ranges, the scales (each bias scale re-derived as input scale x weight scale of its layer)."""
        torch = self.torch
        out = {}
        names = self.scale_names()
        with torch.no_grad():
            for name, (key, s0) in self.act_scales.items():
                out[name] = (s0 * torch.exp(self.ranges[key])).numpy().astype(np.float32)
            bias_scale = self._bias_scales(out) if self.ranges else {}
            for dq, spec in self.weight_dq.items():
                w = self.params[spec["key"]]
                if spec["bias"]:
                    s = bias_scale.get(dq, spec["scale"])
                    if dq in bias_scale:
                        out[names[dq]] = s.numpy().astype(np.float32).reshape(self.inits[names[dq]].shape)
                    info = np.iinfo(np.int32)
                    out[spec["init"]] = np.clip(np.round((w / s).double().numpy()), info.min, info.max).astype(np.int32)
                    continue
                scale = self.weight_scale(spec)
                if "range" in spec:
                    out[names[dq]] = scale.numpy().astype(np.float32).reshape(self.inits[names[dq]].shape)
                s = _shape(scale, spec["axis"], w.dim())
                z = _shape(spec["zp"], spec["axis"], w.dim())
                q = torch.clamp(torch.round(w / s) + z, spec["qmin"], spec["qmax"])
                out[spec["init"]] = q.numpy().astype(spec["dtype"])
        return out

    def scale_names(self) -> dict[str, str]:
        """Weight and bias DequantizeLinear output -> its scale initializer."""
        return {n.output[0]: n.input[1] for n in self.model.graph.node
                if n.op_type == "DequantizeLinear" and n.output[0] in self.weight_dq}

    def _bias_scales(self, act: dict) -> dict:
        """Bias DQ output -> its layer's input scale x weight scale (after training), for layers whose input comes
        from an activation DequantizeLinear."""
        producer = {o: n for n in self.model.graph.node for o in n.output}
        out = {}
        for n in self.model.graph.node:
            if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in self.weight_dq:
                continue
            x, w = producer.get(n.input[0]), self.weight_dq.get(n.input[1])
            if x is None or x.op_type != "DequantizeLinear" or w is None or w["bias"]:
                continue
            s_in = act.get(x.input[1])
            if s_in is None:
                s_in = self.inits.get(x.input[1])
            if s_in is None or np.ndim(s_in):
                continue
            out[n.input[2]] = self.weight_scale(w) * float(s_in)
        return out


def _q(self, n, a):
    torch = self.torch
    x, s = a[0], a[1]
    z = a[2] if len(a) > 2 and a[2] is not None else torch.zeros((), dtype=torch.float32)
    axis = node_attrs(n).get("axis", 1)
    dtype = z.dtype
    info = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
            torch.uint16: (0, 65535)}.get(dtype, (-128, 127))
    s_, z_ = _shape(s.float(), axis, x.dim()), _shape(z.float(), axis, x.dim())
    # values outside the range get no gradient (the kernels clip them): clamp is applied after the rounding
    return torch.clamp(self._ste_round(x / s_) + z_, *info)


def _dq(self, n, a):
    x, s = a[0], a[1]
    z = a[2] if len(a) > 2 and a[2] is not None else None
    axis = node_attrs(n).get("axis", 1)
    x = x.float()
    s_ = _shape(s.float(), axis, x.dim())
    return (x - _shape(z.float(), axis, x.dim())) * s_ if z is not None else x * s_


def _conv(self, n, a):
    import torch.nn.functional as F

    at = node_attrs(n)
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    k = w.dim() - 2
    pads = at.get("pads", [0] * (2 * k))
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedGraph(f"Conv auto_pad ({n.name})")
    if any(pads):
        spec = []
        for d in reversed(range(k)):
            spec += [pads[d], pads[d + k]]
        x = F.pad(x, spec)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
    return conv(x, w, b, stride=at.get("strides", 1), dilation=at.get("dilations", 1), groups=at.get("group", 1))


def _gemm(self, n, a):
    at = node_attrs(n)
    x, w = a[0], a[1]
    if at.get("transA", 0):
        x = x.t()
    if at.get("transB", 0):
        w = w.t()
    y = x @ w * at.get("alpha", 1.0)
    if len(a) > 2 and a[2] is not None:
        y = y + a[2] * at.get("beta", 1.0)
    return y


def _clip(self, n, a):
    at = node_attrs(n)
    lo = a[1] if len(a) > 1 and a[1] is not None else at.get("min")
    hi = a[2] if len(a) > 2 and a[2] is not None else at.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return self.torch.clamp(a[0], lo, hi)


def _pool(self, n, a):
    import torch.nn.functional as F

    at = node_attrs(n)
    k = at["kernel_shape"]
    pads = at.get("pads", [0] * (2 * len(k)))
    if any(pads[i] != pads[i + len(k)] for i in range(len(k))):
        raise UnsupportedGraph(f"asymmetric pooling pads ({n.name})")
    f = {("AveragePool", 2): F.avg_pool2d, ("MaxPool", 2): F.max_pool2d}.get((n.op_type, len(k)))
    if f is None:
        raise UnsupportedGraph(f"{n.op_type} in {len(k)}-D ({n.name})")
    kw = {"count_include_pad": bool(at.get("count_include_pad", 0))} if n.op_type == "AveragePool" else {}
    return f(a[0], k, stride=at.get("strides", k), padding=pads[:len(k)], ceil_mode=bool(at.get("ceil_mode", 0)), **kw)


def _reshape(self, n, a):
    shape = [int(v) for v in a[1].tolist()]
    shape = [a[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return a[0].reshape(shape)


def _flatten(self, n, a):
    axis = node_attrs(n).get("axis", 1)
    return a[0].reshape(int(np.prod(a[0].shape[:axis])) if axis else 1, -1)


_OPS = {
    "QuantizeLinear": _q,
    "DequantizeLinear": _dq,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda self, n, a: a[0] @ a[1],
    "Add": lambda self, n, a: a[0] + a[1],
    "Sub": lambda self, n, a: a[0] - a[1],
    "Mul": lambda self, n, a: a[0] * a[1],
    "Div": lambda self, n, a: a[0] / a[1],
    "Relu": lambda self, n, a: self.torch.relu(a[0]),
    "Sigmoid": lambda self, n, a: self.torch.sigmoid(a[0]),
    "HardSigmoid": lambda self, n, a: self.torch.clamp(a[0] * node_attrs(n).get("alpha", 0.2)
                                                       + node_attrs(n).get("beta", 0.5), 0, 1),
    "Clip": _clip,
    "GlobalAveragePool": lambda self, n, a: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda self, n, a: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "AveragePool": _pool,
    "MaxPool": _pool,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Identity": lambda self, n, a: a[0],
    "Concat": lambda self, n, a: self.torch.cat([x for x in a], dim=node_attrs(n)["axis"]),
    "Transpose": lambda self, n, a: a[0].permute(*node_attrs(n)["perm"]),
    "Squeeze": lambda self, n, a: a[0].reshape([d for i, d in enumerate(a[0].shape)
                                                if i not in [int(x) % a[0].dim() for x in a[1].tolist()]]),
    "Unsqueeze": lambda self, n, a: a[0].reshape(_unsqueezed(a[0].shape, a[1].tolist())),
    "Softmax": lambda self, n, a: self.torch.softmax(a[0], dim=node_attrs(n).get("axis", -1)),
}


def _unsqueezed(shape, axes) -> list[int]:
    out = list(shape)
    for ax in sorted(int(x) % (len(shape) + len(axes)) for x in axes):
        out.insert(ax, 1)
    return out




def write_initializers(model, arrays: dict) -> None:
    """Replace ``model``'s initializers named in ``arrays`` (what :meth:`QdqModule.export` returns)."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))


def range_change(sim, torch) -> dict | None:
    """How far the learned scales moved from the calibrated ones (relative), or None without learned ranges."""
    if not len(sim.ranges):
        return None
    with torch.no_grad():
        acts = [float(v) for k, v in sim.ranges.items() if k.startswith("a")]
        ws = torch.cat([v.reshape(-1) for k, v in sim.ranges.items() if k.startswith("w")] or [torch.zeros(0)])
    rel = lambda u: float(np.expm1(np.abs(u)).max()) if len(u) else 0.0  # noqa: E731
    return {"activation_scales": len(acts), "weight_channels": int(ws.numel()),
            "activation_max_rel_change": round(rel(np.array(acts)), 4),
            "activation_mean_rel_change": round(float(np.expm1(np.abs(np.array(acts))).mean()) if acts else 0.0, 4),
            "weight_max_rel_change": round(rel(ws.numpy()), 4)}
