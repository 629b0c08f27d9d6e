"""Per-layer sensitivity of a decoder to 4-bit weights, as an artifact: each decoder layer's Linear weights (or,
at ``part`` granularity, each layer's attention and MLP separately) are rounded to the recipe's 4-bit grid
(symmetric, groups of ``block_size``) alone, the others kept in FP32, and the mean KL(FP32 || that model) of the
next-token distributions on calibration windows is that group's cost. The most costly groups are written as a
versioned override file (``qops_tensor_overrides``: 1) that a recipe accepts (``tensor_overrides``), as llama.cpp's
``--tensor-type-file``: those groups stay 8-bit, the rest 4-bit (mixed INT4/INT8), and every group's weight count
is written beside its cost so the size each override adds is known before quantizing. Keys are module paths under
the decoder (``layers.N`` or ``layers.N.self_attn`` / ``layers.N.mlp``); :func:`override_nodes` maps them to the
ONNX export's node names and :func:`override_modules` to the checkpoint's Linear modules (GPTQ leaves those in
FP32 for the 8-bit pass). The card lists the costs."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from qops.artifacts import write_json_atomic
from qops.errors import DataError
from qops.llm.torch_quant import decoder_layers, fake_quant, layer_inputs, qparams, run_layer

log = logging.getLogger(__name__)
VERSION = 1
GRANULARITIES = ("layer", "part")
# checkpoint module path -> ONNX Runtime GenAI builder's node-name part (/model/layers.N/attn/..., /model/layers.N/mlp/)
ONNX_PARTS = {"self_attn": "attn", "mlp": "mlp"}
_KEY = re.compile(r"^layers\.\d+(\.(self_attn|mlp))?$")


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def groups(layer, index: int, granularity: str) -> dict[str, list]:
    """{override key: the Linear modules it covers} of decoder layer ``index``: the whole layer, or its attention
    and MLP (``part``)."""
    import torch

    if granularity == "layer":
        return {f"layers.{index}": [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]}
    out = {}
    for part in ONNX_PARTS:
        sub = getattr(layer, part, None)
        if sub is not None:
            out[f"layers.{index}.{part}"] = [m for m in sub.modules() if isinstance(m, torch.nn.Linear)]
    return out


class LayerProbe:
    """A decoder's FP32 inputs to every layer on a few calibration windows, so that a change confined to decoder layer
    ``i`` is measured by running layers ``i..`` only (the layers before it are unchanged), then the final norm and
    lm_head. :meth:`cost` is the mean KL(FP32 || changed model) of the next-token distributions, in nats."""

    def __init__(self, model, windows):
        import torch

        self.model, self.layers = model, decoder_layers(model)
        self.names = {m: n for n, m in model.named_modules()}
        hidden, self.extras = layer_inputs(model, windows)
        self.inputs = [hidden]
        with torch.inference_mode():
            for li, layer in enumerate(self.layers[:-1]):
                self.inputs.append([run_layer(layer, h, extra[li]) for h, extra in zip(self.inputs[-1], self.extras)])
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        self.ref = self.log_probs()
        self.tokens = sum(r.shape[0] for r in self.ref)

    def log_probs(self, first: int = 0) -> list:
        import torch

        out = []
        with torch.inference_mode():
            for w, h in enumerate(self.inputs[first]):
                for li in range(first, len(self.layers)):
                    h = run_layer(self.layers[li], h, self.extras[w][li])
                z = self.model.lm_head(self.model.model.norm(h)).float()
                out.append(_log_softmax((torch.tanh(z / self.cap) * self.cap if self.cap else z)[0].numpy()))
        return out

    def cost(self, first: int = 0) -> float:
        """KL(FP32 || the model as it is now) when only layers ``first..`` changed."""
        got = self.log_probs(first)
        return float(sum((np.exp(r) * (r - g)).sum() for r, g in zip(self.ref, got)) / self.tokens)

    def input_sites(self, index: int) -> list[list[str]]:
        """Decoder layer ``index``'s Linear modules grouped by the tensor they read (q/k/v share the attention norm's
        output, gate/up the MLP norm's): the groups a serving engine fuses and quantizes alike."""
        import torch

        names = self.names
        seen: list[tuple[object, list[str]]] = []  # the input tensors are held, so identity is unambiguous

        def pre(mod, args):
            for t, group in seen:
                if t is args[0]:
                    group.append(names[mod])
                    return
            seen.append((args[0], [names[mod]]))

        layer = self.layers[index]
        handles = [m.register_forward_pre_hook(pre) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        try:
            with torch.inference_mode():
                run_layer(layer, self.inputs[index][0], self.extras[0][index])
        finally:
            for h in handles:
                h.remove()
        return [group for _t, group in seen]


def layer_sensitivity(hf_dir: str | os.PathLike, windows, block_size: int, keep: int = 4, progress=None,
                      granularity: str = "layer") -> dict:
    """The override document: every group's KL cost and weight count, and the ``keep`` costliest groups
    overridden to int8."""
    if granularity not in GRANULARITIES:
        raise DataError(f"Sensitivity granularity {granularity!r} is not one qops measures.",
                        f"use one of {', '.join(GRANULARITIES)}.")
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    probe = LayerProbe(model, windows)
    layers = probe.layers
    costs, sizes = {}, {}
    todo = [(k, i, lins) for i, layer in enumerate(layers) for k, lins in groups(layer, i, granularity).items()]
    for i, (key, li, lins) in enumerate(todo):
        saved = [m.weight.detach().clone() for m in lins]
        with torch.no_grad():
            for m in lins:
                group = block_size if m.in_features % block_size == 0 else None
                scale, qmin, qmax = qparams(m.weight, 4, group)
                m.weight.copy_(fake_quant(m.weight, scale, qmin, qmax, group))
        sizes[key] = int(sum(m.weight.numel() for m in lins))
        costs[key] = probe.cost(li)
        with torch.no_grad():
            for m, w in zip(lins, saved):
                m.weight.copy_(w)
        log.info("sensitivity: %s (%d/%d) KL %.5f", key, i + 1, len(todo), costs[key])
        if progress:
            progress(i + 1, len(todo))
    ranked = sorted(costs, key=costs.get, reverse=True)
    return {"qops_tensor_overrides": VERSION, "metric": f"mean KL(FP32 || one {'layer' if granularity == 'layer' else 'attention or MLP'} 4-bit) of the next-token "
            f"distributions, nats, on {len(windows)} calibration windows", "block_size": block_size,
            "granularity": granularity,
            "layers": {k: {"kl": round(costs[k], 6), "rank": ranked.index(k) + 1, "weights": sizes[k]}
                       for k in costs},
            "overrides": {k: "int8" for k in ranked[:keep]}, "seconds": round(time.perf_counter() - t0, 1)}


def keep_costliest(doc: dict, n: int) -> dict:
    """``doc`` with its ``n`` costliest groups (by rank) overridden to int8, the others 4-bit."""
    ranked = sorted(doc["layers"], key=lambda k: doc["layers"][k]["rank"])
    return {**doc, "overrides": {k: "int8" for k in ranked[:n]}}


def write_overrides(doc: dict, path: str | os.PathLike) -> Path:
    out = Path(path)
    write_json_atomic(out, doc)
    return out


def read_overrides(path: str | os.PathLike) -> dict:
    """A tensor-override file, checked: its version, and that every override is a layer and a precision qops
    writes."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"Tensor-override file {p} cannot be read: {e}.",
                        "write it with `qops sensitivity` (docs/llm.md#sensitivity).") from None
    if doc.get("qops_tensor_overrides") != VERSION:
        raise DataError(f"{p} is not a version-{VERSION} qops tensor-override file "
                        f"(qops_tensor_overrides: {doc.get('qops_tensor_overrides')!r}).",
                        "write it again with this qops' `qops sensitivity`.")
    bad = {k: v for k, v in (doc.get("overrides") or {}).items() if not _KEY.match(k) or v != "int8"}
    if bad:
        raise DataError(f"{p} overrides {bad}: qops reads `layers.N`, `layers.N.self_attn` or `layers.N.mlp` "
                        "entries set to int8.", "keep only decoder layers or their parts overridden to int8.")
    return doc


def _onnx_prefix(key: str) -> str:
    """``layers.3`` -> ``/model/layers.3/``; ``layers.3.mlp`` -> ``/model/layers.3/mlp/``; ``layers.3.self_attn``
    -> ``/model/layers.3/attn/``."""
    layers, index, *part = key.split(".", 2)
    return f"/model/{layers}.{index}/" + (f"{ONNX_PARTS[part[0]]}/" if part else "")


def override_nodes(doc: dict, node_names) -> list[str]:
    """The ONNX MatMul nodes of the overridden decoder layers or parts (ONNX Runtime GenAI's export names them
    ``/model/layers.N/attn/...`` and ``/model/layers.N/mlp/...``)."""
    prefixes = [_onnx_prefix(k) for k in doc.get("overrides", {})]
    return [n for n in node_names if any(n.startswith(prefix) for prefix in prefixes)]


def override_modules(doc: dict, module_names) -> list[str]:
    """The module names (``model.layers.3.mlp.down_proj``) of ``module_names`` that the overrides cover."""
    keys = [f".{k}." for k in (doc or {}).get("overrides", {})]
    return [n for n in module_names if any(k in f".{n}." for k in keys)]


def per_token_int8(x):
    """Symmetric int8 per token (the last axis), as compressed-tensors' dynamic W8A8 scheme quantizes activations
    (scale absmax / 127.5, codes -128..127) and vLLM runs them."""
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.5
    return (x / s).round().clamp(-128, 127) * s


def activation_sensitivity(model, windows, share: float, max_fraction: float = 0.1, progress=None) -> dict:
    """What int8 activations per token cost, site by site: each group of Linear modules that reads one tensor
    (:meth:`LayerProbe.input_sites`) gets its input quantized alone, the rest of ``model`` kept as it is, and the KL
    on ``windows`` is that site's cost (the costs add up to about the cost of quantizing them all). The costliest
    sites that together hold ``share`` of the summed cost — at most ``max_fraction`` of the sites — are ``kept``:
    a W8A8 recipe leaves their modules unquantized."""
    t0 = time.perf_counter()
    probe = LayerProbe(model, windows)
    todo = [(li, mods) for li in range(len(probe.layers)) for mods in probe.input_sites(li)]
    costs: dict[str, float] = {}
    modules = {n: m for m, n in probe.names.items()}
    site_modules = {}
    for i, (li, mods) in enumerate(todo):
        key = f"layers.{li}." + "+".join(n.rsplit(".", 1)[-1] for n in mods)
        site_modules[key] = mods
        handles = [modules[n].register_forward_pre_hook(lambda _m, a: (per_token_int8(a[0]),) + tuple(a[1:]))
                   for n in mods]
        try:
            costs[key] = probe.cost(li)
        finally:
            for h in handles:
                h.remove()
        log.info("activation sensitivity: %s (%d/%d) KL %.5f", key, i + 1, len(todo), costs[key])
        if progress:
            progress(i + 1, len(todo))
    ranked = sorted(costs, key=costs.get, reverse=True)
    total = sum(costs.values())
    kept, held = [], 0.0
    for key in ranked[:int(np.ceil(max_fraction * len(ranked)))]:
        if share <= 0 or held >= share * total:
            break
        kept.append(key)
        held += costs[key]
    return {"metric": f"mean KL(FP32 || one site's input int8 per token) of the next-token distributions, nats, on "
            f"{len(windows)} calibration windows", "sites": len(ranked), "summed_kl": float(f"{total:.4g}"),
            "costs": {k: float(f"{costs[k]:.4g}") for k in ranked},
            "kept": kept, "kept_share": round(held / total, 3) if total else 0.0,
            "kept_modules": [n for k in kept for n in site_modules[k]],
            "seconds": round(time.perf_counter() - t0, 1)}
