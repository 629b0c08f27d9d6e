"""Benchmark: the example model (German Credit MLP, 3x1024) in FP32, ONNX Runtime's quantize_dynamic /
quantize_static with defaults, and each qops CPU target. Prints a Markdown table for docs/benchmarks.md.

    .venv/bin/python bench/bench_targets.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def p50_ms(sess, x, runs):
    row = x[:1]
    name = sess.get_inputs()[0].name
    for _ in range(50):
        sess.run(None, {name: row})
    t = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: row})
        t[i] = time.perf_counter() - t0
    return float(np.median(t) * 1e3)


def throughput(sess, x, seconds=1.0):
    name = sess.get_inputs()[0].name
    batch = np.repeat(x, int(np.ceil(256 / len(x))), axis=0)[:256]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {name: batch})
        n += len(batch)
    return n / (time.perf_counter() - t0)


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    from qops.calibration import select_calibration
    from qops.evaluate import worker_hardware
    from qops.examples.german_credit import export_onnx, prepare_data, train_mlp
    from qops.quantize import quantize
    from qops.quantize.ort import TableCalibrationReader

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qops-bench-"))
    data = prepare_data(work / "data")
    fp32 = export_onnx(train_mlp(data.train, data.features, hidden=1024, epochs=60), len(data.features),
                       data.features, work / "fp32.onnx")
    cal = select_calibration(data.pool, data.train, work / "cal", size=150, features=data.features,
                             slice_columns=["sex", "age_group"])
    val = pd.read_parquet(data.validation)
    x = val[data.features].to_numpy(np.float32)
    y = val["risk"].to_numpy()

    models = {"FP32": fp32}
    quantize_dynamic(str(fp32), str(work / "ort_dynamic.onnx"))
    models["ORT quantize_dynamic (defaults)"] = work / "ort_dynamic.onnx"
    quantize_static(str(fp32), str(work / "ort_static.onnx"),
                    TableCalibrationReader(cal.path, str(fp32), data.features))
    models["ORT quantize_static (defaults)"] = work / "ort_static.onnx"
    for t in ("x86_64_vnni_int8", "x86_64_int8_dynamic", "arm64_int8"):
        quantize(fp32, t, work / f"{t}.onnx", calibration=cal.path)
        models[f"qops {t}"] = work / f"{t}.onnx"

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ref = ort.InferenceSession(str(fp32), opts).run(None, {"features": x})[0]
    rows = []
    for name, path in models.items():
        sess = ort.InferenceSession(str(path), opts)
        out = sess.run(None, {"features": x})[0]
        cos = float(np.mean(np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))))
        rows.append({
            "model": name, "size_mb": Path(path).stat().st_size / 1e6, "p50_ms": p50_ms(sess, x, args.runs),
            "rows_per_s": throughput(sess, x), "accuracy": float((out.argmax(1) == y).mean()),
            "agreement": float((out.argmax(1) == ref.argmax(1)).mean()), "cosine": cos,
        })
    base = rows[0]
    print(json.dumps(worker_hardware()))
    print("| model | size MB | x smaller | batch-1 p50 ms | speed-up | batch-256 rows/s | accuracy | agreement | cosine vs FP32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['size_mb']:.3f} | {base['size_mb'] / r['size_mb']:.2f} | {r['p50_ms']:.4f} | "
              f"{base['p50_ms'] / r['p50_ms']:.2f} | {r['rows_per_s']:.0f} | {r['accuracy']:.4f} | "
              f"{r['agreement']:.4f} | {r['cosine']:.5f} |")


if __name__ == "__main__":
    main()
