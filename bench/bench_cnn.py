"""A real ImageNet-pretrained mobile CNN (EfficientNet-Lite0 or MobileNetV2, from PyPI packages) on real photos: qops' static INT8
against ONNX Runtime's own variants, each technique alone and combined (an ablation), and peak memory of
`qops quantize` against the number of calibration images.

Calibration crops come from one half of the shipped photos, measured crops from the other half
(:mod:`qops.examples.photos`). Fidelity: top-1 agreement with FP32 and mean logit cosine on the measured crops;
size; batch-1 latency with one thread, every variant interleaved in one process (ratios to FP32).

    .venv/bin/python bench/bench_cnn.py [--model lite0|mobilenet_v2] [--variants all|core|block] [--per-photo 40]
                                        [--out bench/results]

Writes ``<out>/cnn.md`` and ``<out>/cnn.json`` (``cnn_<model>.*`` for another model than Lite0). ``--variants core``:
ONNX Runtime's static variants and qops' default alone (the ablation rows are Lite0's); ``--variants block``: those
and block reconstruction.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import _Reader, cpu_info, p50_interleaved  # noqa: E402


def _feeds(kind, table: Path) -> np.ndarray:
    df = pd.read_parquet(table)
    return np.stack([kind._pixels(kind._load(p)) for p in df["path"]])


def _outputs(path, x) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"pixel_values": x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def _fidelity(ref, out) -> dict:
    cos = np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    return {"agreement": float((out.argmax(1) == ref.argmax(1)).mean()), "cosine": float(cos.mean())}


def _depthwise(path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node
            if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def _ort_variant(pre: Path, out: Path, xc: np.ndarray, **kw) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    feeds = [{"pixel_values": xc[i:i + 16]} for i in range(0, len(xc), 16)]
    quantize_static(str(pre), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **kw)
    return out


def peak_rss_quantize(work: Path, model: Path, table: Path, rows: int, extra: list[str], ok=(0,),
                      cnn: str = "lite0") -> float:
    """Peak RSS (MB) of one `qops quantize` process on the first ``rows`` calibration images (``ok``: the exit
    codes that count as a run: `--tune` exits 3 when no candidate passes its gates)."""
    sub = work / f"cal{rows}.parquet"
    df = pd.read_parquet(table)
    pd.concat([df] * (rows // len(df) + 1), ignore_index=True).head(rows).to_parquet(sub)
    from qops.examples.photos import image_kind_options

    scaling = image_kind_options(cnn)
    r = subprocess.run(["/usr/bin/time", "-v", str(Path(sys.executable).parent / "qops"), "quantize", "--model",
                        str(model), "--target", "x86_64_vnni_int8",
                        "--calibration", str(sub), "--data-kind", "image", "--image-root", str(work),
                        "--resize", "224", "--crop", "224", "--mean", ",".join(map(str, scaling["mean"])),
                        "--std", ",".join(map(str, scaling["std"])), "--output", str(work / f"rss{rows}.onnx"), *extra],
                       capture_output=True, text=True)
    if r.returncode not in ok:
        raise RuntimeError(r.stderr[-2000:])
    line = next(x for x in r.stderr.splitlines() if "Maximum resident set size" in x)  # GNU time, in kB
    return int(line.split(":")[-1]) / 1024


def _tune_line(res: dict) -> str:
    return ("Peak RSS of `qops quantize --tune` (6 trials, gates agreement >= 0.95 and cosine >= 0.99 on 320 crops "
            "of the calibration photos; GNU time): " + ", ".join(
                f"{n} calibration images: {v:.0f} MB in {res['tune_seconds'][n]:.0f} s"
                for n, v in res["tune_peak_rss_mb"].items()))


def _memory_line(memory: dict) -> str:
    return ("Peak RSS of `qops quantize` (default recipe, GNU time): " +
            ", ".join(f"{n} calibration images: {v:.0f} MB" for n, v in memory.items()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("lite0", "mobilenet_v2"), default="lite0")
    ap.add_argument("--variants", choices=("all", "core", "block"), default="all")
    ap.add_argument("--per-photo", type=int, default=40)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", help="work folder (default: .bench-cnn, .bench-cnn-<model> for another model)")
    ap.add_argument("--runs", type=int, default=150)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-RSS rows (into the existing json)")
    ap.add_argument("--tune-memory", action="store_true",
                    help="only peak RSS and time of `qops quantize --tune` on 100 and 1000 calibration images")
    args = ap.parse_args()
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from qops.data.kinds import Image
    from qops.examples.photos import CNNS, export_cnn, image_kind_options, photo_tables
    from qops.quantize import quantize

    stem = "cnn" if args.model == "lite0" else f"cnn_{args.model}"
    work = Path(args.work or (".bench-cnn" if args.model == "lite0" else f".bench-cnn-{args.model}"))
    work.mkdir(exist_ok=True)
    if args.tune_memory:
        tables = photo_tables(work, per_photo=args.per_photo)
        res = json.loads((Path(args.out) / f"{stem}.json").read_text())
        tune = ["--tune", "--validation", tables["reference"], "--threshold", "agreement>=0.95", "--threshold",
                "cosine>=0.99", "--max-trials", "6", "--timeout", "600"]
        res["tune_peak_rss_mb"], res["tune_seconds"] = {}, {}
        for n in (100, 1000):
            t0 = time.perf_counter()
            res["tune_peak_rss_mb"][n] = round(peak_rss_quantize(work, work / "fp32.onnx", work / "pool.parquet", n,
                                                                 tune, ok=(0, 3), cnn=args.model), 0)
            res["tune_seconds"][n] = round(time.perf_counter() - t0, 0)
            print(n, res["tune_peak_rss_mb"][n], res["tune_seconds"][n], flush=True)
        (Path(args.out) / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        md = (Path(args.out) / f"{stem}.md").read_text().split("\nPeak RSS of `qops quantize --tune`")[0].rstrip("\n")
        (Path(args.out) / f"{stem}.md").write_text(md + "\n\n" + _tune_line(res) + "\n")
        return 0
    if args.memory_only:
        res = json.loads((Path(args.out) / f"{stem}.json").read_text())
        res["peak_rss_mb"] = {n: round(peak_rss_quantize(work, work / "fp32.onnx", work / "pool.parquet", n, [], cnn=args.model), 0)
                              for n in (100, 1000)}
        (Path(args.out) / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        md = (Path(args.out) / f"{stem}.md").read_text().split("\nPeak RSS")[0].rstrip("\n")
        (Path(args.out) / f"{stem}.md").write_text(md + "\n\n" + _memory_line(res["peak_rss_mb"]) + "\n")
        print(res["peak_rss_mb"])
        return 0
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        export_cnn(fp32, args.model)
    tables = photo_tables(work, per_photo=args.per_photo)
    opts = image_kind_options(args.model)
    kind = Image(root=str(work), **{k: v for k, v in opts.items()})
    xc, xv = _feeds(kind, Path(tables["pool"])), _feeds(kind, Path(tables["validation"]))
    ref = _outputs(fp32, xv)
    pre = work / "pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    cal_abs = work / "pool_abs.parquet"
    pd.read_parquet(tables["pool"]).assign(path=lambda d: str(work) + "/" + d["path"]).to_parquet(cal_abs)
    abs_kind = Image(**{k: v for k, v in opts.items()})

    variants: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name, kw in (("ORT static defaults (per-tensor, min-max)", {}),
                     ("ORT static per-channel", {"per_channel": True}),
                     ("ORT static per-channel, percentile", {"per_channel": True,
                                                             "calibrate_method": CalibrationMethod.Percentile}),
                     ("ORT static per-channel, entropy", {"per_channel": True,
                                                          "calibrate_method": CalibrationMethod.Entropy})):
        s = time.perf_counter()
        path = _ort_variant(pre, work / f"ort{len(variants)}.onnx", xc, **kw)
        variants[name] = {"path": str(path), "seconds": round(time.perf_counter() - s, 1)}
    qops_variants = (
        ("qops, Conv/Gemm only (the previous default recipe)", {"integer_graph": "off", "bias_correction": "off"}),
        ("qops, integer graph", {"bias_correction": "off"}),
        ("qops, integer graph + bias correction, ranges from calibration alone", {"range_search": "off"}),
        ("qops, integer graph + bias correction + range search (default)", {}),
        ("qops, integer graph + learned rounding", {"bias_correction": "off", "learned_rounding": True}),
        ("qops, integer graph + bias correction + learned rounding", {"learned_rounding": True}),
        ("qops, default with percentile calibration", {"calibration_method": "percentile"}),
        ("qops, default + exact cross-layer equalization", {"equalization": "exact"}),
        ("qops, default + calibrated cross-layer equalization (ReLU6 chains too)", {"equalization": "calibrated"}),
        ("qops, default with the depthwise layers kept out of INT8 (INT16 weights, float kernels)",
         {"nodes_to_exclude": tuple(_depthwise(fp32))}),
        ("qops, default + quantization-aware fine-tuning (300 steps)", {"finetune_steps": 300}),
        ("qops, default + block reconstruction (300 steps per block)", {"block_iters": 300}),
    )
    if args.variants == "core":
        qops_variants = tuple(v for v in qops_variants if v[0].endswith("(default)") or "alone" in v[0])
    elif args.variants == "block":
        qops_variants = tuple(v for v in qops_variants if v[0].endswith("(default)") or "block" in v[0])
    for name, o in qops_variants:
        if not name.endswith("(default)"):  # the ablation rows: each technique on ranges from calibration alone
            o = dict(o, range_search="off")
        s = time.perf_counter()
        r = quantize(fp32, "x86_64_vnni_int8", work / f"q{len(variants)}.onnx", calibration=cal_abs, features=abs_kind,
                     options=o)
        variants[name] = {"path": r.model_path, "seconds": round(time.perf_counter() - s, 1), "options": o,
                          "float_islands": r.technique.get("float_islands"),
                          "refinement": r.technique.get("refinement"),
                          "precision": r.technique.get("precision_summary"),
                          "equalization": r.technique.get("equalization"),
                          "finetune": r.technique.get("finetune"),
                          "range_search": {k: v for k, v in (r.technique.get("range_search") or {}).items()
                                           if k != "changed"} or None}
    print(f"quantized {len(variants)} variants in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = {"FP32": str(fp32), **{k: v["path"] for k, v in variants.items()}}
    p50 = p50_interleaved(paths, {"pixel_values": xv[:1]}, args.runs)
    rows = []
    for name, path in paths.items():
        out = ref if name == "FP32" else _outputs(path, xv)
        size = Path(path).stat().st_size
        rows.append({"variant": name, "mb": round(size / 1e6, 2), "smaller": round(fp32.stat().st_size / size, 2),
                     "b1_speedup": round(p50["FP32"] / p50[name], 2), "p50_ms": round(p50[name], 3),
                     **{k: round(v, 4) for k, v in _fidelity(ref, out).items()},
                     **({k: v for k, v in variants[name].items() if k != "path"} if name in variants else {})})
        print(rows[-1]["variant"], rows[-1]["agreement"], rows[-1]["cosine"], rows[-1]["b1_speedup"], flush=True)
    memory = {}
    if args.skip_memory and (Path(args.out) / f"{stem}.json").exists():  # keep the last measured figures
        memory = json.loads((Path(args.out) / f"{stem}.json").read_text()).get("peak_rss_mb") or {}
    if not args.skip_memory:
        for n in (100, 1000):
            memory[n] = round(peak_rss_quantize(work, fp32, Path(tables["pool"]), n, [], cnn=args.model), 0)
            print(f"peak RSS of qops quantize on {n} calibration images: {memory[n]:.0f} MB", flush=True)
    result = {"machine": cpu_info(), "model": CNNS[args.model]["model"],
              "calibration_images": len(xc), "measured_images": len(xv),
              "calibration_photos": sorted(set(pd.read_parquet(tables["pool"])["photo"])),
              "measured_photos": sorted(set(pd.read_parquet(tables["validation"])["photo"])),
              "rows": rows, "peak_rss_mb": memory}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Machine: {result['machine']}. Model: {result['model']}. {len(xc)} calibration crops of "
             f"{', '.join(result['calibration_photos'])}; {len(xv)} measured crops of "
             f"{', '.join(result['measured_photos'])} (photos never used for calibration).", "",
             "| variant | MB | x smaller | b1 speed-up | top-1 agreement | mean logit cosine | quantize s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mb']:.2f} | {r['smaller']:.2f} | {r['b1_speedup']:.2f} | "
                     f"{r['agreement']:.3f} | {r['cosine']:.4f} | {r.get('seconds', '')} |")
    if memory:
        lines += ["", _memory_line(memory)]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
