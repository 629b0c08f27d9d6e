"""QAT on a real ImageNet-pretrained CNN (EfficientNet-Lite0 or MobileNetV2) for ``x86_64_vnni_int8``, as a user
runs it: ``qops qat --distill`` on crops of the calibration photos — engine ``qdq`` (default: the target's PTQ
model fine-tuned, weights and LSQ step sizes) or ``pt2e`` (PT2E QAT of the torch program) — with a share of the
crops held out for the report and the best state; then FP32, the target's PTQ model (qops' default recipe,
calibrated on the same training crops) and the QAT model measured on crops of *other* photos (neither trained,
calibrated nor held out on): top-1 agreement with FP32, mean logit cosine, and batch-1 latency of PTQ and QAT
interleaved on one thread.

    .venv/bin/python bench/bench_qat_cnn.py [--model lite0|mobilenet_v2] [--engine qdq|pt2e] [--steps 600]

Writes ``<out>/qat_cnn.md``/``.json`` (Lite0, pt2e) or ``<out>/qat_cnn_<model>_<engine>.*``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cnn import _feeds, _fidelity, _outputs  # noqa: E402
from bench_quantize import cpu_info, p50_interleaved  # noqa: E402


def export_program(path: Path, model: str) -> Path:
    """The CNN as a torch.export program with a dynamic batch (what ``qops qat`` trains with engine pt2e)."""
    import torch

    from qops.examples.photos import CNNS
    from qops.programs import save_program

    if not path.exists():
        ep = torch.export.export(CNNS[model]["build"](), (torch.randn(2, 3, 224, 224),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        save_program(ep, path, {})
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("lite0", "mobilenet_v2"), default="lite0")
    ap.add_argument("--engine", choices=("qdq", "pt2e"), default="qdq")
    ap.add_argument("--per-photo", type=int, default=40)
    ap.add_argument("--tables", default="pool,reference", help="the photo tables QAT trains on (crops of the "
                    "calibration photos)")
    ap.add_argument("--budget", type=float, default=1500.0, help="QAT time budget (s)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=150, help="timed batch-1 runs per model")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from qops.data.kinds import Image
    from qops.examples.photos import export_cnn, image_kind_options, photo_tables
    from qops.qat.job import qat_files

    work = Path(args.work or (".bench-cnn" if args.model == "lite0" else f".bench-cnn-{args.model}"))
    work.mkdir(exist_ok=True)
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        export_cnn(fp32, args.model)
    program = export_program(work / f"{args.model}.pt2", args.model) if args.engine == "pt2e" else fp32
    tables = photo_tables(work, per_photo=args.per_photo)
    opts = image_kind_options(args.model)
    train = work / "qat_train.parquet"
    pd.concat([pd.read_parquet(tables[t]) for t in args.tables.split(",")], ignore_index=True).assign(
        path=lambda d: str(work.resolve()) + "/" + d["path"]).to_parquet(train)
    kind = Image(**opts)
    fresh = work / "qat" / "work"
    shutil.rmtree(work / "qat", ignore_errors=True)  # a measurement trains from the start
    t0 = time.perf_counter()
    res = qat_files(program=program, onnx=fp32 if args.engine == "pt2e" else None, target="x86_64_vnni_int8",
                    train=train, out_dir=work / "qat", work_dir=fresh, engine=args.engine,
                    distill=True, features=kind, steps=args.steps, lr=args.lr, batch_size=args.batch,
                    time_budget_s=args.budget, checkpoint_every=25)
    seconds = time.perf_counter() - t0
    xv = _feeds(Image(root=str(work), **opts), Path(tables["validation"]))
    ref = _outputs(fp32, xv)
    t = res["qat"]["training"]
    ptq = res["comparison"]["ptq_model"]
    rows = {"FP32": _fidelity(ref, ref),
            "PTQ (qops default recipe, same training crops)": _fidelity(ref, _outputs(ptq, xv)),
            f"QAT ({args.engine} int8_static, distill)": _fidelity(ref, _outputs(res["model_path"], xv))}
    p50 = p50_interleaved({"fp32": str(fp32), "ptq": ptq, "qat": res["model_path"]}, {"pixel_values": xv[:1]},
                          args.runs)
    for (name, r), key in zip(rows.items(), ("fp32", "ptq", "qat")):
        r.update(p50_ms=round(p50[key], 3), b1_speedup=round(p50["fp32"] / p50[key], 2),
                 smaller=round(fp32.stat().st_size / Path({"fp32": fp32, "ptq": ptq, "qat": res["model_path"]}[key])
                               .stat().st_size, 2))
    out = {"machine": cpu_info(), "training": {k: t[k] for k in ("steps", "planned_steps", "rows", "holdout_rows",
                                                                  "best_step", "stopped_early", "stopped_by_budget",
                                                                  "frozen_at", "evals", "seconds")},
           "config": {"lr": args.lr, "batch": args.batch, "budget_s": args.budget, "steps": args.steps,
                      "engine": args.engine, "model": args.model, "tables": args.tables},
           "export": res["qat"].get("export"),
           "held_out_comparison": res["comparison"], "unseen_photos": rows, "seconds": round(seconds, 1),
           "measured_rows": int(len(xv))}
    stem = "qat_cnn" if (args.model, args.engine) == ("lite0", "pt2e") else f"qat_cnn_{args.model}_{args.engine}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    cmp = res["comparison"]
    lines = [f"Machine: {cpu_info()}. {args.model}, `qops qat --target x86_64_vnni_int8 --distill --engine "
             f"{args.engine}`, lr {args.lr}, batch {args.batch}, budget {args.budget:.0f} s: {t['steps']} of "
             f"{t['planned_steps']} steps on {t['rows']} crops, {t['holdout_rows']} held out; best step "
             f"{t['best_step']}{', stopped early' if t['stopped_early'] else ''}"
             f"{', stopped by the budget' if t['stopped_by_budget'] else ''}; {seconds:.0f} s in all.", "",
             "| model | held-out crops (calibration photos): top-1 agreement | cosine | other photos "
             f"({len(xv)} crops): top-1 agreement | cosine | x smaller | b1 speed-up vs FP32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (name, r), key in zip(rows.items(), ("fp32", "ptq", "qat")):
        lines.append(f"| {name} | {cmp[key].get('top1_agreement', 0):.3f} | {cmp[key]['cosine_mean']:.4f} | "
                     f"{r['agreement']:.3f} | {r['cosine']:.4f} | {r['smaller']:.2f} | {r['b1_speedup']:.2f} |")
    (Path(args.out) / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
