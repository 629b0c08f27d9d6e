"""An image model through the ``image`` data kind, end to end: PNG files + a labels table → calibration selection
with drift checks on image features → static INT8 for two CPU targets → evaluation per slice → gates.

Data: scikit-learn's ``digits`` (1,797 handwritten digits, shipped inside scikit-learn) written out as 32x32 RGB
PNG files with a labels table (path, label, digit). Model: a small CNN trained here for a few seconds (seeded),
exported to ONNX with one NCHW input ``pixels``. Preprocessing is the image kind's: resize, centre crop, scale,
mean/std.

    .venv/bin/python bench/bench_image.py [--out bench/results]

Writes ``<out>/image.md`` and ``<out>/image.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import cpu_info  # noqa: E402


def write_pngs(root: Path) -> pd.DataFrame:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        a = (255 - img * 255 / 16).astype(np.uint8)  # dark ink on white paper
        rgb = np.stack([a, a, a], axis=-1)
        Image.fromarray(rgb).resize((36, 36), Image.NEAREST).save(root / f"{i:04d}.png")
        rows.append({"path": f"{i:04d}.png", "label": int(y), "digit": str(int(y))})
    return pd.DataFrame(rows)


def train_cnn(pixels: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 25):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.from_numpy(pixels), torch.from_numpy(labels).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from qops.calibration import select_calibration
    from qops.data import Image, onnx_io
    from qops.evaluate import evaluate
    from qops.gates import gate
    from qops.quantize import quantize
    from qops.spec import CalibrationSpec, GateSpec

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="qops-bench-image-"))
    df = write_pngs(work / "images")
    idx = np.random.default_rng(3).permutation(len(df))
    parts = {"train": idx[:900], "validation": idx[900:1400], "pool": idx[1400:]}
    paths = {}
    for name, rows in parts.items():
        paths[name] = work / f"{name}.csv"
        df.iloc[np.sort(rows)].to_csv(paths[name], index=False)
    kind = Image("path", str(work / "images"), resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    train = pd.read_csv(paths["train"])
    x_train = np.stack([kind._pixels(kind._load(p)) for p in train["path"]]).astype(np.float32)
    model = train_cnn(x_train, train["label"].to_numpy())
    fp32 = work / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(fp32), input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    cal = select_calibration(CalibrationSpec(size=128), pool=paths["pool"], reference=paths["train"],
                             output_dir=work / "calibration", features=kind, slice_columns=["digit"],
                             validation=paths["validation"], model_inputs=onnx_io(fp32)[0])
    gates = GateSpec(metric="accuracy", max_overall_drop=0.01, max_slice_drop=0.03, fairness_metrics=["metric_gap"])
    results = []
    for target in ("x86_64_vnni_int8", "arm64_int8"):
        q = quantize(fp32, target, work / f"{target}.onnx", calibration=cal.feeds_path)
        ev = evaluate(fp32, q.model_path, paths["validation"], "label", ["digit"], features=kind, latency_runs=300,
                      bootstrap=1000, target=q.recipe)
        verdict = gate(ev, gates)
        acc = ev.overall["accuracy"]
        worst = max(ev.slices, key=lambda s: (s["metrics"]["accuracy"]["fp32"] or 0)
                    - (s["metrics"]["accuracy"]["quantized"] or 0))
        perf = ev.performance
        results.append({
            "target": target, "mode": q.mode, "size_kb": round(perf["size_bytes"]["quantized"] / 1e3, 1),
            "fp32_size_kb": round(perf["size_bytes"]["fp32"] / 1e3, 1),
            "p50_ms": perf["latency_p50_ms"]["quantized"], "fp32_p50_ms": perf["latency_p50_ms"]["fp32"],
            "accuracy": round(acc["quantized"], 4), "fp32_accuracy": round(acc["fp32"], 4),
            "agreement": round(ev.overall["agreement"]["quantized"], 4), "worst_slice": worst["key"],
            "worst_slice_delta": round(worst["metrics"]["accuracy"]["delta"], 4),
            "gate": "passed" if verdict.passed else "failed", "failed": verdict.failed})
    drift = json.loads(Path(cal.drift_report_path).read_text())
    meta = {"machine": cpu_info(), "data": "scikit-learn digits as 36x36 PNG (900 train / 500 validation / 397 pool)",
            "model": "CNN (3 conv + 2 linear, 356k parameters) trained here, ONNX input pixels float32[batch, 3, 32, 32]",
            "calibration": {"rows": cal.rows, "feeds": cal.feeds, "drift_passed": cal.drift_passed,
                            "drift_features": sorted({c["column"] for c in drift["checks"]})},
            "wall_seconds": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "image.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"Machine: {meta['machine']}. Data: {meta['data']}. Model: {meta['model']}. Calibration: "
             f"{cal.rows} images stratified by digit, drift-checked on {', '.join(meta['calibration']['drift_features'])}"
             f" ({'passed' if cal.drift_passed else 'DRIFT'}).", "",
             "| target | mode | KB (FP32) | batch-1 p50 ms (FP32) | accuracy (FP32) | top-1 agreement | worst slice "
             "(change) | gate |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {r['target']} | {r['mode']} | {r['size_kb']} ({r['fp32_size_kb']}) | {r['p50_ms']:.4f} "
                     f"({r['fp32_p50_ms']:.4f}) | {r['accuracy']} ({r['fp32_accuracy']}) | {r['agreement']} | "
                     f"{r['worst_slice']} ({r['worst_slice_delta']:+.4f}) | {r['gate']}"
                     f"{' (' + ', '.join(r['failed']) + ')' if r['failed'] else ''} |")
    (out / "image.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
