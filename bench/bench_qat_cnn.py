"""QAT on a real ImageNet-pretrained CNN (EfficientNet-Lite0) for ``x86_64_vnni_int8``, as a user runs it:
``qops qat`` (PT2E, distillation: KL + logit MSE, 20% of the training crops held out for the best checkpoint and
early stopping, BN statistics and ranges frozen after half the steps) on crops of the calibration photos; then
FP32, the target's PTQ model (qops' default recipe, calibrated on the same training crops) and the QAT model
measured on crops of *other* photos (neither trained, calibrated nor held out on): top-1 agreement with FP32 and
mean logit cosine.

    .venv/bin/python bench/bench_qat_cnn.py [--per-photo 40] [--budget 1500] [--lr 1e-5] [--batch 16]

Writes ``<out>/qat_cnn.md`` and ``<out>/qat_cnn.json``.
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
from bench_quantize import cpu_info  # noqa: E402


def export_program(path: Path) -> Path:
    """Lite0 as a torch.export program with a dynamic batch (what ``qops qat`` trains)."""
    import torch

    from qops.examples.photos import build_lite0
    from qops.programs import save_program

    if not path.exists():
        ep = torch.export.export(build_lite0(), (torch.randn(2, 3, 224, 224),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        save_program(ep, path, {})
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-photo", type=int, default=40)
    ap.add_argument("--budget", type=float, default=1500.0, help="QAT time budget (s)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default=".bench-cnn")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from qops.data.kinds import Image
    from qops.examples.photos import export_lite0, image_kind_options, photo_tables
    from qops.qat.job import qat_files

    work = Path(args.work)
    work.mkdir(exist_ok=True)
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        export_lite0(fp32)
    program = export_program(work / "lite0.pt2")
    tables = photo_tables(work, per_photo=args.per_photo)
    opts = image_kind_options()
    train = work / "qat_train.parquet"
    pd.read_parquet(tables["pool"]).assign(path=lambda d: str(work.resolve()) + "/" + d["path"]).to_parquet(train)
    kind = Image(**opts)
    fresh = work / "qat" / "work"
    shutil.rmtree(fresh, ignore_errors=True)  # a measurement trains from the start
    t0 = time.perf_counter()
    res = qat_files(program=program, onnx=fp32, target="x86_64_vnni_int8", train=train,
                    out_dir=work / "qat", work_dir=fresh,
                    distill=True, features=kind, steps=args.steps, lr=args.lr, batch_size=args.batch,
                    time_budget_s=args.budget, checkpoint_every=20)
    seconds = time.perf_counter() - t0
    xv = _feeds(Image(root=str(work), **opts), Path(tables["validation"]))
    ref = _outputs(fp32, xv)
    t = res["qat"]["training"]
    rows = {"FP32": _fidelity(ref, ref),
            "PTQ (qops default recipe, same training crops)": _fidelity(ref, _outputs(res["comparison"]["ptq_model"], xv)),
            "QAT (pt2e int8_static, distill)": _fidelity(ref, _outputs(res["model_path"], xv))}
    out = {"machine": cpu_info(), "training": {k: t[k] for k in ("steps", "planned_steps", "rows", "holdout_rows",
                                                                  "best_step", "stopped_early", "stopped_by_budget",
                                                                  "frozen_at", "evals", "seconds")},
           "config": {"lr": args.lr, "batch": args.batch, "budget_s": args.budget, "steps": args.steps},
           "held_out_comparison": res["comparison"], "unseen_photos": rows, "seconds": round(seconds, 1),
           "measured_rows": int(len(xv))}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "qat_cnn.json").write_text(json.dumps(out, indent=2) + "\n")
    cmp = res["comparison"]
    lines = [f"Machine: {cpu_info()}. EfficientNet-Lite0, `qops qat --target x86_64_vnni_int8 --distill` "
             f"(PT2E), lr {args.lr}, batch {args.batch}, budget {args.budget:.0f} s: {t['steps']} of "
             f"{t['planned_steps']} steps on {t['rows']} crops, {t['holdout_rows']} held out; best step "
             f"{t['best_step']}{', stopped early' if t['stopped_early'] else ''}"
             f"{', stopped by the budget' if t['stopped_by_budget'] else ''}; {seconds:.0f} s in all.", "",
             "| model | held-out crops (calibration photos): top-1 agreement | cosine | other photos "
             f"({len(xv)} crops): top-1 agreement | cosine |", "|---|---:|---:|---:|---:|"]
    for (name, r), key in zip(rows.items(), ("fp32", "ptq", "qat")):
        lines.append(f"| {name} | {cmp[key].get('top1_agreement', 0):.3f} | {cmp[key]['cosine_mean']:.4f} | "
                     f"{r['agreement']:.3f} | {r['cosine']:.4f} |")
    (Path(args.out) / "qat_cnn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
