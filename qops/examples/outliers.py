"""Real-LLM activation statistics for a decoder trained in minutes: a function-preserving transformation that gives
a Llama-architecture model the outlier channels real checkpoints have (LLM.int8(), SmoothQuant: a few hidden
channels 50-100x larger than the rest at the inputs of the attention and MLP projections, the same channels in
every layer).

For every decoder layer and both RMSNorm → projection sites (``input_layernorm`` → ``q/k/v_proj``;
``post_attention_layernorm`` → ``gate/up_proj``), a seeded choice of ``channels`` hidden channels ``c`` gets
``norm.weight[c] *= scale`` and every consuming projection's ``weight[:, c] /= scale``. A projection then computes
``W diag(1/s) · diag(s) x = W x``: the model's outputs are unchanged up to float rounding, while the activations
its projections read (what activation quantization and AWQ/SmoothQuant see) carry channels ``scale`` times larger.
torch is imported inside the functions.
"""

from __future__ import annotations

import numpy as np

SITES = (("input_layernorm", ("q_proj", "k_proj", "v_proj"), "self_attn"),
         ("post_attention_layernorm", ("gate_proj", "up_proj"), "mlp"))


def activation_stats(model, input_ids) -> dict:
    """Per layer and site, ``max|x| / median|x|`` over the channels' absolute maxima of the activation the site's
    projections read (the RMSNorm output), on ``input_ids`` (a ``[batch, seq]`` array of token ids)."""
    import torch

    stats: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for norm_name, projs, block in SITES:
            proj = getattr(getattr(layer, block), projs[0])

            def hook(module, args, key=f"layer{i}.{norm_name}"):
                per_channel = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                stats[key] = {"max": round(float(per_channel.max()), 4),
                              "median": round(float(per_channel.median()), 4),
                              "max_over_median": round(float(per_channel.max() / per_channel.median()), 2)}

            hooks.append(proj.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=torch.as_tensor(np.asarray(input_ids, dtype=np.int64)))
    finally:
        for h in hooks:
            h.remove()
    return stats


def add_outlier_channels(model, channels: int = 4, scale: float = 64.0, seed: int = 0) -> dict:
    """Scale ``channels`` hidden channels up by ``scale`` after each RMSNorm and the consuming projections' input
    columns down by the same factor, in place. Returns what was done (the channels, the scale, the sites)."""
    import torch

    hidden = model.config.hidden_size
    if not 0 < channels < hidden or scale <= 0:
        raise ValueError(f"channels must be in 1..{hidden - 1} and scale > 0 (got {channels}, {scale})")
    chosen = np.sort(np.random.default_rng(seed).choice(hidden, size=channels, replace=False))
    idx = torch.as_tensor(chosen)
    sites = 0
    with torch.no_grad():
        for layer in model.model.layers:
            for norm_name, projs, block in SITES:
                getattr(layer, norm_name).weight[idx] *= scale
                for p in projs:
                    getattr(getattr(layer, block), p).weight[:, idx] /= scale
                sites += 1
    return {"channels": chosen.tolist(), "scale": float(scale), "sites": sites,
            "transformation": "RMSNorm weight[c] *= scale; consuming projections' weight[:, c] /= scale"}
