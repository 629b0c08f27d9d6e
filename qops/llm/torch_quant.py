"""Calibrated weight quantization of a Hugging Face decoder's ``nn.Linear`` layers in PyTorch, the algorithms
llm-compressor's recipes run, for checkpoints written in the compressed-tensors format (:mod:`qops.llm.ct`):

- **SmoothQuant** (Xiao et al. 2023): per input channel ``s_j = max|X_j|^a / max|W_:,j|^(1-a)``; the RMSNorm
  before Q/K/V and before gate/up is divided by ``s``, the layers' input columns multiplied: FP32 outputs are
  unchanged while activation outliers move into the weights (W8A8 then quantizes activations per token).
- **AWQ** (Lin et al. 2024): per smoothing site (input RMSNorm → Q/K/V, post-attention RMSNorm → gate/up, up →
  down, V → O when no grouped-query attention), scales ``s = mean|X|^a / mean|W~|^(1-a)`` (llm-compressor's
  duo scaling; ``W~`` the weight normalised per group), ``a`` searched on a grid by the output error of the quantized
  layers on calibration tokens; folded exactly like SmoothQuant.
- **GPTQ** (Frantar et al. 2023): column by column with the inverse Hessian of the layer's calibration inputs,
  rounding error pushed to the columns not yet quantized; decoder layer by decoder layer, each layer's Hessians
  gathered through the already-quantized layers before it (the sequential schedule).

Memory does not grow with the calibration set: statistics are running sums or maxima (Hessians: ``in x in`` per
layer of one decoder layer at a time), and AWQ keeps a fixed-size sample of tokens per site.
"""

from __future__ import annotations

import logging

import numpy as np

from qops.calibration.collect import AbsMax, Hessian, hooked
from qops.errors import QopsError
from qops.llm.arch import arch_of_model

log = logging.getLogger(__name__)

AWQ_GRID = 20
AWQ_TOKENS = 2048  # tokens sampled per smoothing site for the AWQ search


def _torch():
    import torch

    return torch


def forward_windows(model, windows) -> None:
    torch = _torch()
    with torch.inference_mode():
        for w in windows:
            model(input_ids=torch.as_tensor(np.asarray(w.ids, np.int64))[None])


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise QopsError(f"{type(model).__name__} has no model.layers: qops' GPTQ/AWQ/SmoothQuant walk Llama-family "
                        "decoders (Llama, Mistral, Qwen2, Gemma).", "use an ONNX or GGUF target for this model.")
    return layers


def smoothing_sites(model) -> list[tuple[str, object, list]]:
    """(name, the module whose output feeds the layers, [the layers]) per site of every decoder layer, where the
    architecture table (:mod:`qops.llm.arch`) places them."""
    arch = arch_of_model(model)
    sites = []
    for i, layer in enumerate(decoder_layers(model)):
        att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        try:
            sites.append((f"layers.{i}.{arch.attn_norm}", getattr(layer, arch.attn_norm),
                          [getattr(att, n) for n in arch.attn_inputs]))
            sites.append((f"layers.{i}.{arch.mlp_norm}", getattr(layer, arch.mlp_norm),
                          [getattr(mlp, n) for n in arch.mlp_inputs]))
            if arch.up_site:
                sites.append((f"layers.{i}.mlp.up_proj", mlp.up_proj, [mlp.down_proj]))
            if arch.v_site and att.v_proj.out_features == att.o_proj.in_features:  # no GQA: V's rows map to O's
                sites.append((f"layers.{i}.self_attn.v_proj", att.v_proj, [att.o_proj]))
        except AttributeError as e:
            raise QopsError(f"Decoder layer {i} of {type(model).__name__} lacks a module its architecture row names "
                            f"({e}).", "check the row of this model_type in qops/llm/arch.py.") from None
    return sites


def fold(smooth, layers, s, norm_offset: float = 0.0) -> None:
    """Divide ``smooth``'s output channels by ``s`` and multiply ``layers``' input columns by it (exact). An RMSNorm
    computing ``x * (offset + w)`` (Gemma: 1) gets ``w' = (offset + w) / s - offset``."""
    torch = _torch()
    with torch.no_grad():
        if isinstance(smooth, torch.nn.Linear):
            smooth.weight.div_(s[:, None])
            if smooth.bias is not None:
                smooth.bias.div_(s)
        else:
            smooth.weight.copy_((smooth.weight + norm_offset) / s - norm_offset)
        for lin in layers:
            lin.weight.mul_(s[None, :])


def observe(model, sites, collectors: dict, windows) -> None:
    """Run the calibration windows with each site's first layer's input fed to ``collectors[site name]``."""
    with hooked((layers[0], collectors[name]) for name, _smooth, layers in sites):
        forward_windows(model, windows)


def smoothquant(model, windows, alpha: float = 0.5, linear_sites: bool = False) -> dict:
    """SmoothQuant on the norm → linear sites (per-channel activation maxima over the calibration windows); with
    ``linear_sites`` also up_proj → down_proj (and v_proj → o_proj without GQA), where the largest activation
    outliers of real decoders sit (the down_proj input)."""
    torch = _torch()
    sites = [s for s in smoothing_sites(model) if linear_sites or not isinstance(s[1], torch.nn.Linear)]
    stats = {name: AbsMax(dtype="float32") for name, _, _ in sites}
    observe(model, sites, stats, windows)
    amax = {name: c.result() for name, c in stats.items()}
    ratios = []
    for name, smooth, layers in sites:
        wmax = torch.stack([lin.weight.detach().abs().amax(0) for lin in layers]).amax(0).float()
        s = (amax[name].clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        fold(smooth, layers, s, arch_of_model(model).norm_offset)
        ratios.append(float((amax[name].max() / amax[name].median().clamp(min=1e-8))))
    return {"alpha": alpha, "sites": len(sites), "linear_sites": linear_sites,
            "activation_max_over_median_before": round(float(np.median(ratios)), 1)}


def qparams(w, bits: int, group: int | None, grid: str = "ct"):
    """Symmetric scales per group of ``group`` input columns (or per output row), and the integer range.
    ``grid="ct"``: as compressed-tensors computes them, absmax / ((2^bits - 1) / 2). ``grid="ort"``: as ONNX
    Runtime's MatMulNBits quantizer (MLAS) does, the group's largest-magnitude value / -2^(bits-1) (a signed scale:
    that value lands on the code -8), so ONNX Runtime's round-to-nearest re-derives exactly these scales and integers
    from weights already on this grid."""
    torch = _torch()
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    g = w.reshape(w.shape[0], -1, group) if group else w[:, None, :]
    if grid == "ort":
        scale = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))[..., 0] / qmin
    else:
        scale = g.abs().amax(-1) / ((qmax - qmin) / 2)
    return torch.where(scale == 0, torch.ones_like(scale), scale), qmin, qmax


def fake_quant(w, scale, qmin: int, qmax: int, group: int | None):
    """``w`` on the grid of ``scale`` ([out, groups]), as the compressor will round it."""
    torch = _torch()
    s = scale.repeat_interleave(group, dim=1) if group else scale
    return torch.clamp(torch.round(w / s), qmin, qmax) * s


class TokenSample:
    """A reservoir-like sample of up to ``AWQ_TOKENS`` tokens (rows of the last axis) of a site's input, as a
    collector (:mod:`qops.calibration.collect`); samplers sharing ``gen`` draw in the order they are fed."""

    def __init__(self, gen, size: int | None = None):
        self.gen, self.size, self.parts, self.seen = gen, AWQ_TOKENS if size is None else size, [], 0

    def collect(self, x) -> None:
        torch = _torch()
        x = x.detach().reshape(-1, x.shape[-1]).float()
        have = sum(len(t) for t in self.parts)
        self.seen += len(x)
        if have < self.size:
            self.parts.append(x[:self.size - have].clone())
        else:
            keep = torch.rand(len(x), generator=self.gen) < self.size / self.seen
            if keep.any():
                pool = torch.cat(self.parts)
                idx = torch.randint(0, len(pool), (int(keep.sum()),), generator=self.gen)
                pool[idx] = x[keep]
                self.parts = [pool]

    def result(self):
        """The sampled tokens, ``[n, channels]`` float32."""
        return _torch().cat(self.parts)


def awq(model, windows, bits: int, group: int) -> dict:
    """AWQ scale search and folding on every site; returns the chosen exponent per site."""
    torch = _torch()
    sites = smoothing_sites(model)
    gen = torch.Generator().manual_seed(0)
    samples = {name: TokenSample(gen) for name, _, _ in sites}
    observe(model, sites, samples, windows)
    chosen = {}
    with torch.no_grad():
        for name, smooth, layers in sites:
            x = samples[name].result()
            ws = [lin.weight.detach().float() for lin in layers]
            ref = [x @ w.T for w in ws]
            x_mean = x.abs().mean(0)
            w_norm = torch.cat([(w.reshape(w.shape[0], -1, group).abs() / w.reshape(w.shape[0], -1, group).abs()
                                 .amax(-1, keepdim=True).clamp(min=1e-8)).reshape(w.shape) for w in ws])
            w_mean = w_norm.mean(0)
            best, best_err = None, None
            for k in range(AWQ_GRID + 1):
                a = k / AWQ_GRID
                s = (x_mean.clamp(min=1e-4) ** a / (w_mean.clamp(min=1e-4) ** (1 - a))).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                err = 0.0
                for w, r in zip(ws, ref):
                    scale, qmin, qmax = qparams(w * s, bits, group)
                    wq = fake_quant(w * s, scale, qmin, qmax, group) / s
                    err += float(((x @ wq.T - r) ** 2).mean())
                if best_err is None or err < best_err:
                    best, best_err = (a, s), err
            chosen[name] = best[0]
            fold(smooth, layers, best[1], arch_of_model(model).norm_offset)
    seen = max((c.seen for c in samples.values()), default=0)
    return {"sites": len(sites), "tokens_per_site": min(AWQ_TOKENS, seen),
            "alpha_median": float(np.median(list(chosen.values()))) if chosen else None}


def group_grid(g, bits: int, symmetric: bool, grid: str = "ct", mse: bool = False):
    """One scale and integer zero point per row of ``g`` ([out, cols]) and the code range. Symmetric: zero 0, codes
    -2^(bits-1)..2^(bits-1)-1 (scales as :func:`qparams`). Asymmetric (as GPTQ's and AWQ's ``zero_point``): the
    range [min(w, 0), max(w, 0)] over 2^bits - 1 steps, zero = round(-min / scale), codes 0..2^bits-1 (0 stays
    exact). ``mse``: the range shrunk by the factor (1.0, 0.97 ... 0.76) whose rounding error (sum of |error|^2.4,
    GPTQ's ``mse`` option) is least, per row: clipping a few large weights buys a finer grid for the rest."""
    torch = _torch()
    if symmetric:
        scale, qmin, qmax = qparams(g, bits, None, grid)
        scale, zero = scale[:, 0], torch.zeros_like(scale[:, 0])
    else:
        qmin, qmax = 0, 2 ** bits - 1
        scale, zero = _asym(g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0), qmax)
    if not mse:
        return scale, zero, qmin, qmax
    best = torch.full_like(scale, float("inf"))
    out_s, out_z = scale.clone(), zero.clone()
    for shrink in torch.linspace(1.0, 0.76, 9).tolist():
        if symmetric:
            s, z = scale * shrink, zero
        else:
            s, z = _asym(g.amin(-1).clamp(max=0) * shrink, g.amax(-1).clamp(min=0) * shrink, qmax)
        q = (torch.clamp(torch.round(g / s[:, None]) + z[:, None], qmin, qmax) - z[:, None]) * s[:, None]
        err = ((q - g).abs() ** 2.4).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        out_s, out_z = torch.where(better, s, out_s), torch.where(better, z, out_z)
    return out_s, out_z, qmin, qmax


def _asym(lo, hi, qmax: int):
    torch = _torch()
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-lo / scale)


def gptq_weight(w, hessian, bits: int, group: int | None, block: int = 128, damp: float = 0.01, grid: str = "ct",
                symmetric: bool = True, act_order: bool = False, mse: bool = False):
    """GPTQ of one weight ``w`` ([out, in]) against ``hessian`` ([in, in]): the dequantized weight and scales
    ([out, groups]; with ``symmetric=False`` also the zero points: ``(weight, scales, zeros)``). ``act_order``:
    columns quantized in order of decreasing Hessian diagonal (the inputs with the most energy first, so the error
    of the others absorbs theirs), with each group's scale and zero fixed beforehand from the unquantized weights
    ("static groups": the groups stay contiguous blocks of the original columns, as the 4-bit formats store them).
    ``mse``: each group's range searched for the least rounding error (:func:`group_grid`)."""
    torch = _torch()
    w = w.clone().double()
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    cols = w.shape[1]
    gsize = group or cols
    n_groups = cols // gsize
    scales = torch.zeros(w.shape[0], n_groups, dtype=w.dtype)
    zeros = torch.zeros_like(scales)
    qmin, qmax = group_grid(w[:, :1], bits, symmetric, grid)[2:]
    gg = lambda x: group_grid(x, bits, symmetric, grid, mse)[:2]  # noqa: E731
    static = act_order or group is None
    if static:  # every group's grid from the weights as they are
        for gi in range(n_groups):
            scales[:, gi], zeros[:, gi] = gg(w[:, gi * gsize:(gi + 1) * gsize])
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(perm[col]) // gsize
            if not static and col % gsize == 0:  # the group's grid from its current (updated) weights
                g = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gsize]
                scales[:, gi], zeros[:, gi] = gg(g)
            s, z = scales[:, gi], zeros[:, gi]
            qc = (torch.clamp(torch.round(w1[:, i] / s) + z, qmin, qmax) - z) * s
            q[:, col] = qc
            e = (w1[:, i] - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    if symmetric:
        return q.float(), scales.float()
    return q.float(), scales.float(), zeros.float()


def layer_inputs(model, windows) -> tuple[list, list[list[tuple[tuple, dict]]]]:
    """For each calibration window: the first decoder layer's hidden states, and every layer's other inputs
    (position embeddings, attention mask: per layer, since sliding-window and global layers of Gemma-style models get
    different ones; the tensors are shared between layers, not copied). One forward pass without a KV cache."""
    torch = _torch()
    layers = decoder_layers(model)
    hidden: list = []
    per_window: list[list[tuple[tuple, dict]]] = []

    def grab(i):
        def pre(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                hidden.append(h)
                per_window.append([])
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            per_window[-1].append((tuple(args[1:]), rest))
        return pre

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for w in windows:
                model(input_ids=torch.as_tensor(np.asarray(w.ids, np.int64))[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, per_window


def run_layer(layer, h, extra: tuple[tuple, dict]):
    """One decoder layer on hidden states ``h`` with the other inputs :func:`layer_inputs` captured for it."""
    args, kwargs = extra
    o = layer(h, *args, **kwargs)
    return o[0] if isinstance(o, tuple) else o


def gptq(model, windows, bits: int, group: int | None, skip=("lm_head",), progress=None, grid: str = "ct",
         symmetric: bool = True, act_order: bool = False, mse: bool = False) -> dict:
    """Sequential GPTQ over the decoder layers, one layer at a time: each layer's calibration inputs are the
    previous (already quantized) layer's outputs, carried forward, so the windows pass through each layer twice
    (Hessians, then the quantized outputs) instead of through the whole model once per layer. Sets each Linear's
    weight to its dequantized GPTQ weight and returns {module name: scales} ({module name: (scales, zeros)} when
    ``symmetric`` is false)."""
    torch = _torch()
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, object] = {}
    layers = decoder_layers(model)
    hidden, extras = layer_inputs(model, windows)
    for li, layer in enumerate(layers):
        linears = [(names[m], m) for m in layer.modules() if isinstance(m, torch.nn.Linear)
                   and not any(names[m].endswith(s) for s in skip)]
        hs = {n: Hessian(torch.zeros(m.in_features, m.in_features, dtype=torch.float64)) for n, m in linears}
        with hooked((m, hs[n]) for n, m in linears), torch.inference_mode():
            for h, extra in zip(hidden, extras):
                run_layer(layer, h, extra[li])
        with torch.no_grad():
            for n, m in linears:
                wq, *params = gptq_weight(m.weight.detach(), hs[n].result(), bits, group, grid=grid,
                                          symmetric=symmetric, act_order=act_order, mse=mse)
                m.weight.copy_(wq)
                out[n] = params[0] if symmetric else tuple(params)
        with torch.inference_mode():  # the quantized layer's outputs are the next layer's inputs
            hidden = [run_layer(layer, h, extra[li]) for h, extra in zip(hidden, extras)]
        log.info("GPTQ: decoder layer %d/%d quantized", li + 1, len(layers))
        if progress:
            progress(li + 1, len(layers))
    return out


def group_size_for(model, requested: int, skip=("lm_head",)) -> int:
    """The quantization group size: ``requested`` when it divides the input size of every quantized Linear, else
    the largest power of two below it that does (576 = 9 x 64: groups of 64); an error when none of 16 or more
    does."""
    torch = _torch()
    sizes = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not any(n.endswith(s) for s in skip)}
    g = requested
    while g >= 16 and any(k % g for k in sizes):
        g //= 2
    if g < 16:
        raise QopsError(f"No group size from {requested} down to 16 divides every layer's input size {sorted(sizes)}.",
                        "set target_options block_size to a size that divides them all, or use an 8-bit target.")
    return g


def rtn(model, bits: int, group: int | None, skip=("lm_head",)) -> dict:
    """Round-to-nearest of every Linear (but ``skip``); returns {module name: scales}."""
    torch = _torch()
    out = {}
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and not any(n.endswith(s) for s in skip):
                scale, qmin, qmax = qparams(m.weight, bits, group)
                m.weight.copy_(fake_quant(m.weight, scale, qmin, qmax, group))
                out[n] = scale
    return out
