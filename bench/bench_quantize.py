"""Benchmark: qops' tuned recipe against ONNX Runtime's defaults on a CNN, an MLP and a BERT-style transformer.

For each model, in one process: FP32; ``quantize_dynamic`` with defaults; ``quantize_static`` with defaults
(QDQ, s8/s8 per-tensor, min-max, same calibration rows); the qops ``x86_64_vnni_int8`` recipe after
accuracy-aware tuning (gates below); qops INT4 weight-only (MatMulNBits) and the 4-bit codebook (size only).
Reported: file size, batch-1 p50 latency (1 intra-op thread, all variants interleaved run by run), batch
throughput (all cores), fidelity to FP32 (mean cosine, SQNR, top-1 agreement) and accuracy where labelled.

    .venv/bin/python bench/bench_quantize.py [--models mlp,cnn,bert] [--runs 300] [--out bench/results]

Writes ``<out>/quantize.md`` (the table for docs/benchmarks.md) and ``<out>/quantize.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def cpu_info() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "avx_vnni")
                if f in flags]
        return f"{name}, {os.cpu_count()} vCPU, flags: {' '.join(keep)}"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class _Reader:
    """quantize_static's CalibrationDataReader over a feed list (for the ORT-defaults baseline)."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def _session(path, threads):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def p50_interleaved(paths: dict, row: dict, runs: int) -> dict:
    sess = {k: _session(p, 1) for k, p in paths.items()}
    for _ in range(10):
        for s in sess.values():
            s.run(None, row)
    t = {k: np.empty(runs) for k in sess}
    for i in range(runs):
        for k, s in sess.items():
            t0 = time.perf_counter()
            s.run(None, row)
            t[k][i] = time.perf_counter() - t0
    return {k: float(np.median(v) * 1e3) for k, v in t.items()}


def throughput(path, batch: dict, seconds: float = 1.5) -> float:
    s = _session(path, os.cpu_count() or 1)
    n_rows = len(next(iter(batch.values())))
    s.run(None, batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.run(None, batch)
        n += n_rows
    return n / (time.perf_counter() - t0)


def fidelity(ref: np.ndarray, out: np.ndarray, y: np.ndarray | None) -> dict:
    from qops.evaluate import output_fidelity

    f = output_fidelity("classification" if ref.shape[1] > 1 else "regression", ref, out)
    if y is not None:
        f["accuracy"] = float((out.argmax(1) == y).mean())
    return f


def prepare(name: str, work: Path):
    """FP32 ONNX model, calibration file, validation file, features, label, gate spec for tuning."""
    from qops.spec import CalibrationSpec, GateSpec, MetricThreshold

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    if name == "mlp":
        from qops.calibration import select_calibration
        from qops.examples.german_credit import export_onnx, prepare_data, train_mlp

        data = prepare_data(d / "data")
        fp32 = export_onnx(train_mlp(data.train, data.features, hidden=1024, epochs=60), len(data.features),
                           data.features, d / "fp32.onnx")
        cal = select_calibration(CalibrationSpec(size=150), pool=data.pool, reference=data.train, output_dir=d / "cal",
                                 features=data.features, slice_columns=["sex", "age_group"]).path
        gates = GateSpec(metric="accuracy", max_overall_drop=0.01, max_slice_drop=0.03)
        return dict(fp32=fp32, cal=cal, val=data.validation, features=data.features, label="risk",
                    slices=["sex", "age_group"], gates=gates, task="classification",
                    desc="German Credit MLP, 27 -> 3x1024 -> 2 (2.2M params)")
    if name == "cnn":
        from qops.examples.models import digits_tables, export_onnx_2d, train_cnn

        t = digits_tables(d / "data")
        model = train_cnn(t["train"], epochs=8)
        fp32 = export_onnx_2d(model, t["features"], d / "fp32.onnx")
        pool = pd.read_parquet(t["pool"])
        cal = d / "cal.parquet"
        pool.sample(n=min(200, len(pool)), random_state=0).to_parquet(cal, index=False)
        gates = GateSpec(metric="accuracy", metrics=["accuracy", "agreement", "cosine"], max_overall_drop=0.01,
                         fairness_metrics=[])
        return dict(fp32=fp32, cal=cal, val=t["validation"], features=t["features"], label="digit", slices=[],
                    gates=gates, task="classification",
                    desc="CNN on 32x32 digits, 3 conv-BN-ReLU blocks (128/256/512 ch, BN folded) + linear (1.5M params)")
    if name == "bert":
        from qops.examples.models import BertConfig, build_bert, export_bert_onnx, token_table

        cfg = BertConfig()
        fp32 = export_bert_onnx(build_bert(cfg), cfg, d / "fp32.onnx")
        cal, val = d / "cal.parquet", d / "val.parquet"
        token_table(cfg, 64, seed=1).to_parquet(cal, index=False)
        token_table(cfg, 128, seed=2).to_parquet(val, index=False)
        gates = GateSpec(task="regression", metric="cosine", metrics=["cosine"], max_overall_drop=0.005,
                         thresholds=[MetricThreshold(metric="cosine", min_value=0.995)], fairness_metrics=[])
        return dict(fp32=fp32, cal=cal, val=val, features=[f"tok_{i}" for i in range(cfg.seq_len)], label=None,
                    slices=[], gates=gates, task="regression",
                    desc="BERT-style encoder from config (MiniLM-L6 shape: 6 layers, 384 hidden, 12 heads, "
                         "seq 128; 22.7M params, random BERT init), mean-pooled embedding")
    raise SystemExit(f"unknown model {name}")


def bench_model(name: str, work: Path, runs: int, trials: int) -> dict:
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    from qops.data import feature_matrix, read_table
    from qops.evaluate import evaluate
    from qops.gates import gate
    from qops.quantize import quantize
    from qops.quantize.graph import model_size
    from qops.quantize.tune import tune
    from qops.spec import TuningSpec

    p = prepare(name, work)
    d = work / name
    val = read_table(p["val"], "validation")
    feed = feature_matrix(val, p["fp32"], p["features"], "validation")
    cal_feed = feature_matrix(read_table(p["cal"], "calibration"), p["fp32"], p["features"], "calibration")
    (in_name, x), = feed.items()
    y = val[p["label"]].to_numpy() if p["label"] else None
    paths = {"FP32": p["fp32"]}

    quantize_dynamic(str(p["fp32"]), str(d / "ort_dynamic.onnx"))
    paths["ORT quantize_dynamic (defaults)"] = d / "ort_dynamic.onnx"
    batches = [{in_name: cal_feed[in_name][i : i + 16]} for i in range(0, len(cal_feed[in_name]), 16)]
    quantize_static(str(p["fp32"]), str(d / "ort_static.onnx"), _Reader(batches))
    paths["ORT quantize_static (defaults)"] = d / "ort_static.onnx"

    def judge(res):
        ev = evaluate(p["fp32"], res.model_path, p["val"], p["label"], p["slices"], features=p["features"],
                      metric=p["gates"].metric, metrics=p["gates"].metrics, task=p["task"], latency_runs=120,
                      bootstrap=100, target=res.recipe)
        v = gate(ev, p["gates"])
        return {"passed": v.passed, "failures": [f"{c.name}: {c.detail}" for c in v.checks if not c.passed],
                "latency_ratio": ev.performance["latency_ratio"], "size_ratio": ev.performance["size_ratio"],
                "fidelity": ev.fidelity}

    t0 = time.perf_counter()
    tuned = tune(p["fp32"], _recipe("x86_64_vnni_int8"), d / "qops_tuned.onnx",
                 judge, calibration=p["cal"], features=p["features"],
                 config=TuningSpec(max_trials=trials, timeout_s=1800))
    tune_s = time.perf_counter() - t0
    paths[f"qops x86_64_vnni_int8, tuned ({tuned.tuning['chosen_config']})"] = d / "qops_tuned.onnx"
    int4 = quantize(p["fp32"], "int4_weight_only", d / "qops_int4.onnx", calibration=p["cal"], features=p["features"])
    if int4.graph_kind != "convolutional":  # MatMulNBits covers MatMul only; a CNN's weights are in Conv
        paths["qops int4_weight_only (RTN, block 128)"] = d / "qops_int4.onnx"
    quantize(p["fp32"], "codebook_4bit", d / "qops_codebook.onnx", features=p["features"])
    paths["qops codebook_4bit (k-means; size only)"] = d / "qops_codebook.onnx"

    lat = p50_interleaved(paths, {in_name: x[:1]}, runs)
    batch = {in_name: np.repeat(x, int(np.ceil(32 / len(x))), axis=0)[:32]}
    ref = np.asarray(_session(p["fp32"], os.cpu_count()).run(None, feed)[0], np.float64).reshape(len(x), -1)
    rows = []
    size32 = model_size(p["fp32"])
    for label, path in paths.items():
        out = np.asarray(_session(path, os.cpu_count()).run(None, feed)[0], np.float64).reshape(len(x), -1)
        f = fidelity(ref, out, y)
        rows.append({
            "variant": label, "size_mb": model_size(path) / 1e6, "size_x": size32 / model_size(path),
            "p50_ms": lat[label], "speedup": lat["FP32"] / lat[label],
            "throughput": throughput(path, batch), **f,
        })
    return {"model": name, "description": p["desc"], "rows": rows, "tuning_seconds": round(tune_s, 1),
            "trials": tuned.trials, "chosen": tuned.tuning}


def _recipe(name):
    from qops.targets import get_target

    return get_target(name)


def to_markdown(results: list[dict], machine: str) -> str:
    out = [f"Machine: {machine}. Batch-1 p50: 1 intra-op thread, all variants interleaved run by run; "
           "throughput: batch 32, all cores.", ""]
    for r in results:
        out += [f"### {r['model'].upper()}: {r['description']}", "",
                "| variant | size MB | smaller | batch-1 p50 ms | speed-up | rows/s (b32) | cosine vs FP32 | "
                "SQNR dB | top-1 agree | accuracy |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            def fmt(v, f):
                return "—" if v is None else format(v, f)

            out.append(f"| {row['variant']} | {row['size_mb']:.2f} | {row['size_x']:.2f}x | {row['p50_ms']:.3f} | "
                       f"{row['speedup']:.2f}x | {row['throughput']:.0f} | {row['cosine_mean']:.5f} | "
                       f"{fmt(row.get('sqnr_db'), '.1f')} | {fmt(row.get('top1_agreement'), '.3f')} | "
                       f"{fmt(row.get('accuracy'), '.3f')} |")
        out += ["", f"Tuning ({r['tuning_seconds']} s, {len(r['trials'])} trials; chosen: trial "
                    f"{r['chosen']['chosen_trial']}, {r['chosen']['chosen_config']}):", "",
                "| trial | phase | config | verdict | latency vs FP32 | cosine | reasons |", "|---|---|---|---|---:|---:|---|"]
        for t in r["trials"]:
            out.append(f"| {t['trial']}{' (chosen)' if t['chosen'] else ''} | {t['phase']} | {t['config']} | "
                       f"{t['verdict']} | {t['latency_ratio'] if t['latency_ratio'] is not None else '—'} | "
                       f"{t['cosine'] if t['cosine'] is not None else '—'} | "
                       f"{'; '.join(t['reasons'])[:160].replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp,cnn,bert")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnxruntime", "qops.evaluate", "qops.quantize.ort"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import onnxruntime as ort

    work = Path(tempfile.mkdtemp(prefix="qops-bench-"))
    machine = f"{cpu_info()}; onnxruntime {ort.__version__}"
    results = []
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        results.append(bench_model(name, work, args.runs, args.trials))
        print(to_markdown(results[-1:], machine), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize.md").write_text(to_markdown(results, machine))
    (out / "quantize.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1, default=str))
    print(f"wrote {out / 'quantize.md'}")


if __name__ == "__main__":
    main()
