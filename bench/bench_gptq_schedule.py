"""GPTQ schedule: qops' carried-forward GPTQ (each decoder layer's inputs are the previous quantized layer's outputs)
against the former schedule (the whole model re-run over the calibration windows once per decoder layer), on a
decoder with SmolLM2-135M's shape built from its config (random weights: time and memory only), interleaved in one
process. Writes bench/results/gptq_schedule.json.

    .venv/bin/python bench/bench_gptq_schedule.py [--layers 30] [--windows 32] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from qops.llm.data import Window
from qops.llm.torch_quant import decoder_layers, forward_windows, gptq, gptq_weight


def smollm2_shape(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def former_schedule(model, windows, bits, group):
    for layer in decoder_layers(model):
        lins = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        hs = {m: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in lins}
        n = {m: 0 for m in lins}

        def hook(m, a, o, hs=hs, n=n):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
            hs[m] += 2 * x.T @ x
            n[m] += len(x)

        handles = [m.register_forward_hook(hook) for m in lins]
        forward_windows(model, windows)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for m in lins:
                m.weight.copy_(gptq_weight(m.weight.detach(), hs[m] / n[m], bits, group)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    windows = [Window(i, rng.integers(0, 49152, a.seq_len), 1) for i in range(a.windows)]
    out = {"model": f"Llama, SmolLM2-135M's shape ({a.layers} layers, hidden 576), random weights",
           "windows": a.windows, "seq_len": a.seq_len, "bits": 4, "group": 64, "threads": torch.get_num_threads()}
    for name, fn in (("carried_forward", lambda m: gptq(m, windows, 4, 64)),
                     ("former_whole_model_per_layer", lambda m: former_schedule(m, windows, 4, 64))):
        model = smollm2_shape(a.layers)
        t0 = time.perf_counter()
        fn(model)
        out[name + "_s"] = round(time.perf_counter() - t0, 1)
        print(name, out[name + "_s"], "s", flush=True)
    out["speedup"] = round(out["former_whole_model_per_layer_s"] / out["carried_forward_s"], 2)
    out["peak_rss_mb_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    path = Path(__file__).parent / "results" / "gptq_schedule.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
