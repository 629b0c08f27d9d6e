"""Decode speed and memory of the LLM formats on a decoder large enough to be memory-bound at batch 1.

The example Llama (5 M parameters, 22 MB in FP32) fits in this CPU's caches, so its decode speed measures
per-token overheads, not the weight traffic that 4-bit formats cut. This benchmark builds a Llama-architecture
decoder of about 140 M parameters from a config (hidden 1024, 12 layers, 16 heads / 4 KV heads, SwiGLU 2816,
vocabulary and tokenizer of the example: random weights, seeded — speed and memory do not depend on the values, and
no accuracy is reported here), then times, interleaved in one process at batch 1 with the KV cache:

- FP32 ONNX (ONNX Runtime, the reference), ONNX INT4 RTN (MatMulNBits, accuracy_level 4);
- GGUF Q8_0, Q4_K_M (f16 and q8_0 KV cache) and Q4_0, written by llama.cpp's converter and quantizer, run by
  llama.cpp (llama-cpp-python).

Each: time to first token (64-token prompt), decode tokens/s (p50 per-token time over 32 new tokens x prompts x
rounds), peak resident memory of a fresh process that loads the model and generates (one thread), file size.

    python bench/bench_llm_speed.py [--layers 12] [--hidden 1024] [--out bench/results]

Writes llm_speed.json and llm_speed.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_decoder(work: Path, data: dict, hidden: int, layers: int, inter: int) -> tuple[Path, int]:
    import pandas as pd
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qops.examples.tiny_llama import train_tokenizer

    tok = train_tokenizer(pd.read_parquet(data["train"])["text"].tolist(), 4096)  # the example's tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    out = work / "hf"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out, int(sum(p.numel() for p in model.parameters()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np

    from qops.evaluate import worker_hardware
    from qops.examples.tiny_llama import prepare_data
    from qops.llm.evaluate import artifact_size, peak_memory
    from qops.llm.gguf import F32_NAME, quantize_gguf_llm
    from qops.llm.quantize import quantize_onnx_llm
    from qops.llm.runner import generation_timing, open_decoder
    from qops.llm.source import LlmInfo, export_onnx
    from qops.targets import get_target

    work = Path(tempfile.mkdtemp(prefix="qops-bench-llm-speed-"))
    paths = prepare_data(work / "data")
    t0 = time.perf_counter()
    hf, params = build_decoder(work, paths, args.hidden, args.layers, args.intermediate)
    ex = export_onnx(hf, work / "fp32")
    info = LlmInfo(**ex["info"])
    print(f"decoder: {params} parameters, built and exported in {time.perf_counter() - t0:.0f} s", flush=True)
    variants = [("FP32 ONNX", None, {}), ("llm_int4_rtn", "llm_int4_rtn", {}), ("gguf_q8_0", "gguf_q8_0", {}),
                ("gguf_q4_k_m", "gguf_q4_k_m", {"imatrix": False}),
                ("gguf_q4_k_m (KV q8_0)", "gguf_q4_k_m", {"imatrix": False, "kv_cache_type": "q8_0"}),
                ("gguf_q4_0", "gguf_q4_0", {"imatrix": False})]
    models = []
    for label, target, opts in variants:
        if target is None:
            models.append((label, ex["path"], None, 0.0))
            continue
        recipe = get_target(target, opts or None)
        t = time.perf_counter()
        if recipe.engine == "llama.cpp":
            out = work / label.replace(" ", "_").replace("(", "").replace(")", "") / "model.gguf"
            quantize_gguf_llm(hf, recipe, out, work / F32_NAME, info.num_layers, None)
        else:
            out = work / label / "model.onnx"
            quantize_onnx_llm(ex["path"], recipe, out)
        models.append((label, out, recipe.to_dict(), time.perf_counter() - t))
        print(f"{label}: written in {time.perf_counter() - t:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, info.vocab_size, 64) for _ in range(3)]
    decoders = [open_decoder(path, info, recipe=recipe) for _, path, recipe, _ in models]
    timing = generation_timing(decoders, prompts, args.new_tokens, rounds=args.rounds)
    del decoders
    rows = []
    for (label, path, recipe, qs), tm, in zip(models, timing):
        mem = peak_memory(path, info, prompts[0], args.new_tokens, recipe)
        rows.append({"variant": label, "size_bytes": artifact_size(path), "quantize_s": round(qs, 1),
                     "ttft_ms": round(tm["ttft_ms_p50"], 2), "decode_tokens_per_s": round(tm["decode_tokens_per_s"], 1),
                     "decode_ms_p50": round(tm["decode_ms_per_token_p50"], 3), "peak_memory_bytes": mem})
        print(json.dumps(rows[-1]), flush=True)
    hw = worker_hardware()
    report = {"machine": {**hw, "python": platform.python_version()}, "date": time.strftime("%Y-%m-%d"),
              "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                        "vocab": info.vocab_size, "parameters": params, "weights": "random (seed 0)"},
              "generation": {"prompt_tokens": 64, "new_tokens": args.new_tokens, "prompts": len(prompts),
                             "rounds": args.rounds, "interleaved": True}, "results": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "llm_speed.json").write_text(json.dumps(report, indent=1, default=str))
    md = render(report)
    (out_dir / "llm_speed.md").write_text(md)
    print(md)
    return 0


def render(report: dict) -> str:
    rows = report["results"]
    ref = rows[0]
    m = report["model"]
    md = [f"Machine: {report['machine'].get('cpu_model', '?')}, {report['machine'].get('cpu_count')} cores. Decoder: "
          f"Llama architecture, hidden {m['hidden']}, {m['layers']} layers, SwiGLU {m['intermediate']}, vocabulary "
          f"{m['vocab']} ({(m['parameters'] or 0) / 1e6:.0f} M parameters, {m['weights']} weights). Batch 1, KV cache, "
          f"{report['generation']['prompt_tokens']}-token prompts, {report['generation']['new_tokens']} new tokens, "
          "variants interleaved; ONNX Runtime and llama.cpp on all cores; peak memory of a fresh one-thread process.",
          "", "| variant | size MB | TTFT ms | decode tok/s | vs FP32 ONNX | peak MB | vs FP32 ONNX |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem, mem0 = r["peak_memory_bytes"] or 0, ref["peak_memory_bytes"] or 1
        md.append(f"| {r['variant']} | {r['size_bytes'] / 1e6:.1f} | {r['ttft_ms']:.1f} | {r['decode_tokens_per_s']:.1f} "
                  f"| {r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x | {mem / 1e6:.0f} | "
                  f"{mem / mem0:.2f}x |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
