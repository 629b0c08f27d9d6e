"""Quantization-aware fine-tuning of a static QDQ model, on the graph that will be served.

PT2E QAT trains a PyTorch program and exports a *different* quantized graph from the one qops' PTQ writes (other
op coverage, ranges observed during training, no bias correction). This module instead runs the PTQ model itself —
the ONNX QDQ graph, after integer-graph quantization, bias correction and the rest — as a PyTorch module:

- every weight ``DequantizeLinear`` of a constant INT8 tensor becomes a float parameter, fake-quantized in the
  forward pass with the recipe's own per-channel scales (rounding by the straight-through estimator);
- every INT32 bias becomes a float parameter (rounded to its ``input scale x weight scale`` grid on export);
- every activation ``QuantizeLinear -> DequantizeLinear`` pair fake-quantizes with its calibrated scale and zero
  point (values outside the range get no gradient, as the integer kernels clip them);
- the other ops (Conv, Gemm, MatMul, Add, Mul, Relu, Clip, pooling, Reshape, Flatten, Concat, ...) are their
  PyTorch equivalents.

It trains by distillation from the FP32 model's outputs (KL divergence of the softened outputs plus a relative
squared error that keeps the logits calibrated, not only their ranking), on the calibration rows less a held-out
share, evaluates the held-out rows every ``eval_every`` steps, keeps the state with the lowest held-out loss
(smoother than top-1 agreement on a few rows), stops early when it no longer improves, and writes the best
weights and biases back as INT8/INT32 initializers. The graph, the scales and the zero points are unchanged: the
model runs exactly as fast as the PTQ model it started from. BatchNorm was folded into the convolutions on export, as the literature folds it before QAT
ends (Krishnamoorthi 2018, section 3.2).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from qops.quantize.graph import node_attrs

log = logging.getLogger(__name__)


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

    def __init__(self, model, torch):
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
        self.inputs = [i.name for i in model.graph.input if i.name not in self.inits]
        self.outputs = [o.name for o in model.graph.output]
        for n in model.graph.node:
            if n.op_type not in _OPS and n.op_type != "Constant" and not (
                    n.op_type == "DequantizeLinear" and n.output[0] in self.weight_dq):
                raise UnsupportedGraph(f"op {n.op_type} ({n.name})")

    def _ste_round(self, x):
        return x + (self.torch.round(x) - x).detach()

    def _fake_weight(self, spec):
        torch = self.torch
        w = self.params[spec["key"]]
        if spec["bias"]:
            return w  # INT32 biases: float while training, rounded on export
        s = _shape(spec["scale"], spec["axis"], w.dim())
        z = _shape(spec["zp"], spec["axis"], w.dim())
        q = torch.clamp(self._ste_round(w / s) + z, spec["qmin"], spec["qmax"])
        return (q - z) * s

    def forward(self, feeds: dict):
        env = dict(self.const)
        env.update(feeds)
        for n in self.model.graph.node:
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
        return [env[o] for o in self.outputs]

    def export(self) -> dict:
        """Integer initializers (name -> array) for the trained parameters."""
        out = {}
        with self.torch.no_grad():
            for spec in self.weight_dq.values():
                w = self.params[spec["key"]]
                s = _shape(spec["scale"], spec["axis"], w.dim())
                z = _shape(spec["zp"], spec["axis"], w.dim())
                if spec["bias"]:
                    info = np.iinfo(np.int32)
                    out[spec["init"]] = np.clip(np.round((w / s).double().numpy()), info.min, info.max).astype(np.int32)
                else:
                    q = self.torch.clamp(self.torch.round(w / s) + z, spec["qmin"], spec["qmax"])
                    out[spec["init"]] = q.numpy().astype(spec["dtype"])
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


def _fidelity(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    cos = np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return agree, float(cos.mean())


def finetune(qmodel, fmodel, feeds: dict[str, np.ndarray], *, steps: int = 300, lr: float = 1e-5,
             batch_size: int = 8, holdout: float = 0.2, eval_every: int = 25, patience: int = 4,
             time_budget_s: float = 1200.0, seed: int = 0, mse_weight: float = 1.0) -> dict:
    """Fine-tune ``qmodel`` (a static QDQ ModelProto, changed in place) to reproduce ``fmodel``'s first output on
    ``feeds`` (model inputs by name, rows on axis 0). Returns a report: steps, rows trained and held out, the held-out
    top-1 agreement and cosine before and after, the step kept, why it stopped, seconds."""
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    t0 = time.perf_counter()
    names = list(feeds)
    n = len(feeds[names[0]])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = max(1, int(round(n * holdout))) if n >= 10 else 0
    hold, train = order[:n_hold], order[n_hold:]
    if len(train) < batch_size:
        return {"skipped": f"{len(train)} training rows, fewer than the batch size {batch_size}"}
    fsess = ort.InferenceSession(fmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    finputs = {i.name for i in fsess.get_inputs()}

    def teacher(idx):
        return np.concatenate([fsess.run(None, {k: feeds[k][idx[i:i + 32]] for k in names if k in finputs})[0]
                               for i in range(0, len(idx), 32)])

    t_all = teacher(np.arange(n))  # the FP32 model's outputs, once
    try:
        sim = QdqModule(qmodel, torch)
    except UnsupportedGraph as e:
        return {"skipped": f"the QDQ graph has {e}, which the fine-tuning simulator does not run"}
    params = list(sim.params.values())
    opt = torch.optim.Adam(params, lr=lr)
    torch.manual_seed(seed)

    def predict(idx):
        with torch.no_grad():
            return np.concatenate([sim.forward({k: torch.from_numpy(feeds[k][idx[i:i + 16]]) for k in names})[0].numpy()
                                   for i in range(0, len(idx), 16)])

    def loss_fn(s, t):
        kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                        reduction="batchmean")
        return kl + mse_weight * ((s - t) ** 2).mean() / (t.pow(2).mean() + 1e-12)

    def score(idx):
        """Held-out loss (what selects the step: smoother than agreement on a few rows), agreement, cosine."""
        out = predict(idx)
        with torch.no_grad():
            held = float(loss_fn(torch.from_numpy(out), torch.from_numpy(t_all[idx])))
        return (held, *_fidelity(out, t_all[idx]))

    start = score(hold) if n_hold else (None, None, None)
    best = {"step": 0, "loss": start[0], "agreement": start[1], "cosine": start[2],
            "state": [p.detach().clone() for p in params]}
    stopped, bad, step = "steps done", 0, 0
    log.info("fine-tuning: %d training rows, %d held out (agreement %.3f, cosine %.4f before)", len(train), n_hold,
             start[1] or 0, start[2] or 0)
    for step in range(1, steps + 1):
        idx = train[rng.choice(len(train), batch_size, replace=False)]
        x = {k: torch.from_numpy(feeds[k][idx]) for k in names}
        t = torch.from_numpy(t_all[idx])
        loss = loss_fn(sim.forward(x)[0], t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if n_hold and (step % eval_every == 0 or step == steps):
            held, agree, cos = score(hold)
            log.info("fine-tuning step %d/%d: loss %.4f, held-out loss %.4f, agreement %.3f, cosine %.4f", step,
                     steps, float(loss.detach()), held, agree, cos)
            if held < best["loss"]:
                best = {"step": step, "loss": held, "agreement": agree, "cosine": cos,
                        "state": [p.detach().clone() for p in params]}
                bad = 0
            else:
                bad += 1
                if bad >= patience:
                    stopped = f"no held-out improvement in {patience} evaluations"
                    break
        if time.perf_counter() - t0 > time_budget_s:
            stopped = f"time budget ({time_budget_s:.0f} s)"
            break
    with torch.no_grad():
        for p, v in zip(params, best["state"]):
            p.copy_(v)
    new = sim.export()
    for init in qmodel.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    return {"steps": step, "kept_step": best["step"], "train_rows": int(len(train)), "held_out_rows": int(n_hold),
            "held_out_before": {"loss": start[0], "agreement": start[1], "cosine": start[2]},
            "held_out_after": {"loss": best["loss"], "agreement": best["agreement"], "cosine": best["cosine"]},
            "stopped": stopped, "lr": lr, "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 1)}
