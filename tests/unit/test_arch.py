"""The architecture table on models built from configs with random weights (seconds each): for every supported
decoder architecture, SmoothQuant/AWQ folds with scales of 0.5-2 on every site keep the FP32 logits (formerly the
MLP scales went into Gemma's post_attention_layernorm, which normalises the attention output: 107% of the logit
range moved); the carried-forward GPTQ equals re-running the model per layer on Gemma 3's mix of sliding-window
and global layers; an unknown architecture is refused naming the known ones."""

from __future__ import annotations

import numpy as np
import pytest

from qops.errors import ModelError

ARCH_CONFIGS = {
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "phi3": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
    "gemma2": {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention"]},
}


def _model(model_type: str, kv_heads: int = 2):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                               **ARCH_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random norm weights, so a wrong offset or a wrong site shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand_like(p) + 0.5 - (1.0 if "gemma" in model_type else 0.0))
    return model


def _windows(n=4, length=24, seed=0):
    from qops.llm.data import Window

    rng = np.random.default_rng(seed)
    return [Window(i, rng.integers(3, 128, length), 1) for i in range(n)]


def _logits(model, windows):
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=torch.as_tensor(w.ids)[None]).logits for w in windows])


@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_every_fold_keeps_the_fp32_logits(model_type, kv_heads):
    import torch

    from qops.llm.arch import arch_of_model
    from qops.llm.torch_quant import fold, smoothing_sites

    model = _model(model_type, kv_heads)
    windows = _windows()
    before = _logits(model, windows)
    arch = arch_of_model(model)
    sites = smoothing_sites(model)
    assert any(arch.mlp_norm in name for name, _, _ in sites)
    gen = torch.Generator().manual_seed(1)
    for _name, smooth, layers in sites:
        s = 0.5 + 1.5 * torch.rand(layers[0].in_features, generator=gen)
        fold(smooth, layers, s, arch.norm_offset)
    after = _logits(model, windows)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5


def test_the_former_gemma_site_would_have_changed_the_model():
    """The check above can fail: folding the MLP scales into Gemma's post_attention_layernorm moves the logits."""
    import torch

    from qops.llm.torch_quant import fold

    model = _model("gemma3_text")
    windows = _windows()
    before = _logits(model, windows)
    layer = model.model.layers[0]
    s = 0.5 + 1.5 * torch.rand(64, generator=torch.Generator().manual_seed(1))
    fold(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], s, 1.0)
    assert float((_logits(model, windows) - before).abs().max() / before.abs().max()) > 1e-2


def test_smoothquant_and_awq_keep_the_function_on_gemma3():
    from qops.llm.torch_quant import awq, smoothquant

    model = _model("gemma3_text")
    windows = _windows()
    before = _logits(model, windows)
    smoothquant(model, windows, 0.5)
    awq(model, windows, 4, 32)
    assert float((_logits(model, windows) - before).abs().max() / before.abs().max()) < 1e-5


def test_carried_forward_gptq_equals_rerunning_the_model_on_sliding_and_global_layers():
    import torch

    from qops.llm.torch_quant import decoder_layers, forward_windows, gptq, gptq_weight

    windows = _windows(n=3, length=12)
    new, old = _model("gemma3_text"), _model("gemma3_text")
    gptq(new, windows, 4, 32)
    for layer in decoder_layers(old):
        lins = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        hs = {m: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in lins}

        def hook(m, a, o, hs=hs):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
            hs[m] += 2 * x.T @ x

        handles = [m.register_forward_hook(hook) for m in lins]
        forward_windows(old, windows)
        for h in handles:
            h.remove()
        n = sum(len(w.ids) for w in windows)
        with torch.no_grad():
            for m in lins:
                m.weight.copy_(gptq_weight(m.weight.detach(), hs[m] / n, 4, 32)[0])
    for (name, a), (_, b) in zip(new.named_parameters(), old.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_an_unknown_architecture_is_refused_naming_the_known_ones(tmp_path):
    import json

    from qops.llm.arch import ARCHS, arch_for

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="not one qops knows") as e:
        arch_for(tmp_path)
    assert all(name in str(e.value) for name in ARCHS)


@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
def test_sensitivity_from_carried_layer_inputs_equals_rerunning_the_model(model_type, tmp_path):
    """`qops sensitivity` measures a group of layer i by running layers i.. from their captured FP32 inputs, then the
    final norm, lm_head and (Gemma 2) the logit soft-cap: the same KL as the whole model run again, on every
    architecture of the table (sliding and global layers included)."""
    import torch

    from qops.llm.sensitivity import layer_sensitivity
    from qops.llm.torch_quant import fake_quant, qparams

    model = _model(model_type)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    windows = _windows(n=3, length=12)
    doc = layer_sensitivity(tmp_path / "hf", windows, 32, keep=0, granularity="part")
    ref = torch.log_softmax(_logits(model, windows), -1)
    for key, part in (("layers.0.mlp", model.model.layers[0].mlp), ("layers.1.self_attn",
                                                                     model.model.layers[1].self_attn)):
        lins = [m for m in part.modules() if isinstance(m, torch.nn.Linear)]
        saved = [m.weight.detach().clone() for m in lins]
        with torch.no_grad():
            for m in lins:
                group = 32 if m.in_features % 32 == 0 else None
                scale, qmin, qmax = qparams(m.weight, 4, group)
                m.weight.copy_(fake_quant(m.weight, scale, qmin, qmax, group))
        got = torch.log_softmax(_logits(model, windows), -1)
        kl = float((ref.exp() * (ref - got)).sum(-1).mean())
        assert doc["layers"][key]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6), (model_type, key)
        with torch.no_grad():
            for m, w in zip(lins, saved):
                m.weight.copy_(w)


@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
def test_activation_sites_are_the_tensors_linears_share_and_cost_what_the_whole_model_says(model_type):
    """W8A8's activation fallback measures each input site (the Linear modules that read one tensor: q/k/v, o,
    gate/up, down; Phi-3's fused qkv and gate_up) by quantizing that input per token alone: the KL equals the whole
    model run again with that input quantized, on every architecture; the costliest sites holding the asked share are
    kept, never more than the cap."""
    import torch

    from qops.llm.sensitivity import activation_sensitivity, per_token_int8

    model = _model(model_type)
    from qops.llm.arch import arch_of_model

    off = arch_of_model(model).norm_offset
    with torch.no_grad():  # sharper next-token distributions (random init gives near-uniform ones, KL ~1e-7)
        model.model.norm.weight.copy_((model.model.norm.weight + off) * 40 - off)
    windows = _windows(n=3, length=12)
    doc = activation_sensitivity(model, windows, share=0.5, max_fraction=0.5)
    assert doc["summed_kl"] > 1e-4, doc["costs"]
    assert doc["sites"] == 8 and len(doc["costs"]) == 8
    fused = model_type == "phi3"
    for site in (("layers.0.qkv_proj", "layers.1.gate_up_proj") if fused else
                 ("layers.0.q_proj+k_proj+v_proj", "layers.1.gate_proj+up_proj")):
        assert site in doc["costs"], (model_type, sorted(doc["costs"]))
    ref = torch.log_softmax(_logits(model, windows), -1)
    for key, mod in (("layers.1.down_proj", model.model.layers[1].mlp.down_proj),
                     ("layers.0.o_proj", model.model.layers[0].self_attn.o_proj)):
        h = mod.register_forward_pre_hook(lambda _m, a: (per_token_int8(a[0]),))
        got = torch.log_softmax(_logits(model, windows), -1)
        h.remove()
        kl = float((ref.exp() * (ref - got)).sum(-1).mean())
        assert doc["costs"][key] == pytest.approx(kl, rel=2e-3, abs=1e-7), (model_type, key)
    ranked = sorted(doc["costs"], key=doc["costs"].get, reverse=True)
    kept = doc["kept"]
    assert kept == ranked[:len(kept)] and 1 <= len(kept) <= 4
    held = sum(doc["costs"][k] for k in kept)
    assert held >= 0.5 * doc["summed_kl"] * (1 - 1e-3) or len(kept) == 4
    assert held - doc["costs"][kept[-1]] < 0.5 * doc["summed_kl"] * (1 + 1e-3)  # no site more than the share needs
    mods = dict(model.named_modules())
    assert all(isinstance(mods[n], torch.nn.Linear) for n in doc["kept_modules"])
    assert sorted(n.rsplit(".", 1)[1] for n in doc["kept_modules"]) == sorted(
        part for k in kept for part in k.rsplit(".", 1)[1].split("+"))
