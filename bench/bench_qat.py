"""PTQ vs QAT where PTQ fails a gate, on two models, in one process:

1. ``planted``: INT8 static (``x86_64_vnni_int8``) on the planted MLP of tests/unit/planted_models.py, whose
   'small' slice is carried by weights 300x smaller than their row's largest: every INT8 PTQ rounds them to 0.
   QAT: PT2E (X86InductorQuantizer, QAT mode) -> ONNX QDQ, task loss on the training split.
2. ``news``: INT4 weight-only (``int4_weight_only``, MatMulNBits, blocks of 32) on the real pretrained
   all-MiniLM-L6-v2 + topic head of the text example (BBC News). PTQ: ONNX Runtime's RTN (qops' recipe).
   QAT: torchao ``IntxWeightOnlyConfig`` int4 (groups of 32) through ``QATConfig``, distillation from the FP32
   model on the training split's text, then MatMulNBits written from torchao's integers.

Each model is evaluated and gated by qops' evaluate and gate code (the text example's gates for ``news``;
the planted spec's for ``planted``): accuracy overall and worst slice, the recovered fraction
(QAT - PTQ) / (FP32 - PTQ), size, batch-1 latency, training time.

    .venv/bin/python bench/bench_qat.py [--news-steps 300] [--news-lr 5e-6] [--news-batch 8] [--out bench/results]

Writes ``<out>/qat.md`` (the table for docs/benchmarks.md) and ``<out>/qat.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
from bench_quantize import cpu_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def evaluate_and_gate(fp32, model, validation, label, slices, kind, gates, recipe):
    from qops.artifacts import to_jsonable
    from qops.evaluate import evaluate
    from qops.gates import gate

    g = gates
    ev = to_jsonable(evaluate(fp32, model, validation, label, slices, features=kind, metric=g.metric,
                              latency_runs=g.latency_runs, task=g.task, metrics=g.metrics, min_slice_size=g.min_slice_size,
                              bootstrap=g.bootstrap, confidence=g.confidence, seed=g.seed, target=recipe,
                              outputs=g.outputs, output=g.output, embedding_output=g.embedding_output,
                              batch_size=g.batch_size))
    verdict = gate(ev, g)
    return ev, verdict


def row(name, ev, verdict, seconds, extra=None):
    m = ev["primary_metric"]
    slices = [s for s in ev["slices"] if s["n"] >= 20 and s["metrics"][m]["quantized"] is not None]
    worst = min(slices, key=lambda s: s["metrics"][m]["quantized"] - s["metrics"][m]["fp32"])
    perf = ev["performance"]
    out = {"variant": name, "metric": m, "fp32": ev["overall"][m]["fp32"], "value": ev["overall"][m]["quantized"],
           "worst_slice": worst["key"], "worst_fp32": worst["metrics"][m]["fp32"],
           "worst_value": worst["metrics"][m]["quantized"], "size_bytes": perf["size_bytes"]["quantized"],
           "fp32_size_bytes": perf["size_bytes"]["fp32"], "latency_ratio": round(perf["latency_p50_ms"]["quantized"]
                                                                                / perf["latency_p50_ms"]["fp32"], 3),
           "gate": "passed" if verdict.passed else "failed", "failed": list(verdict.failed), "seconds": seconds,
           "fidelity": ev.get("fidelity") or {},
           "slices": {s["key"]: [s["metrics"][m]["fp32"], s["metrics"][m]["quantized"]] for s in slices}}
    for k in ("embedding_cosine", "neighbor_agreement"):
        if k in ev["overall"]:
            out[k] = ev["overall"][k]["quantized"]
    out.update(extra or {})
    return out


def recovered(fp32, ptq, qat):
    return None if abs(fp32 - ptq) < 1e-12 else round((qat - ptq) / (fp32 - ptq), 3)


def planted(tmp: Path) -> list[dict]:
    from planted_models import small_weight_data, small_weight_program

    from qops.data import Tabular, onnx_io
    from qops.qat.job import qat_files
    from qops.quantize import quantize
    from qops.registry import fetch_source_model
    from qops.spec import GateSpec
    from qops.targets import get_target

    d = tmp / "planted"
    d.mkdir()
    small_weight_program(d / "model.pt2")
    for name, seed, n in (("train", 0, 2000), ("pool", 1, 1000), ("val", 2, 1000)):
        small_weight_data(seed, n, n // 10).to_parquet(d / f"{name}.parquet")
    src = fetch_source_model(str(d / "model.pt2"), d)
    kind = Tabular(["a", "b"])
    calib = d / "calib.npz"
    np.savez(calib, **kind.feeds(__import__("pandas").read_parquet(d / "pool.parquet").iloc[:200],
                                 onnx_io(src.path)[0], "calibration"))
    gates = GateSpec(max_latency_ratio=50.0, bootstrap=1000, latency_runs=200)
    recipe = get_target("x86_64_vnni_int8", {"mode": "static"})
    rows = []
    t = time.perf_counter()
    q = quantize(src.path, recipe, d / "ptq.onnx", calibration=str(calib), features=kind)
    ev, v = evaluate_and_gate(src.path, q.model_path, d / "val.parquet", "y", ["group"], kind, gates, recipe.to_dict())
    rows.append(row("PTQ static INT8 (minmax, per-channel)", ev, v, round(time.perf_counter() - t, 1)))
    t = time.perf_counter()
    res = qat_files(program=d / "model.pt2", onnx=src.path, target="x86_64_vnni_int8", target_options={"mode": "static"},
                    train=d / "train.parquet", label="y", out_dir=d / "qat", steps=150, lr=0.01, batch_size=32,
                    checkpoint_every=50)
    ev, v = evaluate_and_gate(src.path, res["model_path"], d / "val.parquet", "y", ["group"], kind, gates, res["recipe"])
    rows.append(row("QAT PT2E int8_static -> ONNX QDQ", ev, v, round(time.perf_counter() - t, 1),
                    {"train_seconds": res["qat"]["training"]["seconds"], "steps": res["qat"]["training"]["steps"]}))
    return rows


def news(tmp: Path, steps: int, batch: int, max_rows: int, lr: float) -> list[dict]:
    import pandas as pd
    import torch
    import yaml

    from qops.examples import news as ex
    from qops.programs import save_program
    from qops.qat.job import qat_files
    from qops.quantize import quantize
    from qops.spec import GateSpec
    from qops.targets import get_target

    d = tmp / "news"
    paths = ex.prepare_data(d / "data")
    train = pd.read_parquet(paths["train"])
    model = ex.train_head(ex.load_encoder(), train, seed=0)
    onnx_path = ex.export_onnx(model, d / "model.onnx", ["logits", "sentence_embedding"],
                               {"qops.example": "news-topics"})
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    batch_dim, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=512)
    program = torch.export.export(model, (ids, mask, torch.zeros_like(ids)),
                                  dynamic_shapes={k: {0: batch_dim, 1: seq} for k in ex.INPUTS})
    save_program(program, d / "model.pt2", {})
    spec = yaml.safe_load((REPO / "dags" / "specs" / "news_topics.yaml").read_text())
    gates = GateSpec(**{**spec["gates"], "bootstrap": 1000, "latency_runs": 100})
    kind = ex.text_kind()
    slices = spec["data"]["slice_columns"]
    val = paths["validation"]
    recipe = get_target("int4_weight_only", {"block_size": 32})
    rows = []
    t = time.perf_counter()
    q = quantize(str(onnx_path), recipe, d / "ptq.onnx")
    ev, v = evaluate_and_gate(str(onnx_path), q.model_path, val, "label", slices, kind, gates, recipe.to_dict())
    rows.append(row("PTQ INT4 RTN (MatMulNBits, block 32)", ev, v, round(time.perf_counter() - t, 1)))
    tr = train.sample(min(max_rows, len(train)), random_state=0)
    tr.to_parquet(d / "qat_train.parquet")
    t = time.perf_counter()
    res = qat_files(program=d / "model.pt2", onnx=str(onnx_path), target="int4_weight_only",
                    target_options={"block_size": 32}, train=d / "qat_train.parquet", distill=True, features=kind,
                    out_dir=d / "qat", steps=steps, lr=lr, batch_size=batch, checkpoint_every=50)
    ev, v = evaluate_and_gate(str(onnx_path), res["model_path"], val, "label", slices, kind, gates, res["recipe"])
    rows.append(row("QAT torchao int4 (distill) -> MatMulNBits", ev, v, round(time.perf_counter() - t, 1),
                    {"train_seconds": res["qat"]["training"]["seconds"], "steps": res["qat"]["training"]["steps"],
                     "layers": res["qat"]["export"]["layers"],
                     "loss_first_last": [res["qat"]["training"]["losses"][0], res["qat"]["training"]["losses"][-1]]}))
    return rows


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def table(case: str, rows: list[dict]) -> list[str]:
    ptq, qat = rows
    worst_key = ptq["worst_slice"]
    out = [f"**{case}**", "",
           "| Variant | size (MB) | p50 / FP32 p50 | " + rows[0]["metric"] + f" (FP32 → q) | {worst_key} (FP32 → q) | "
           "embedding cosine | NN agreement | gates | time (s) |", "|---|---:|---:|---|---|---:|---:|---|---:|"]
    for r in rows:
        fails = "" if r["gate"] == "passed" else " (" + ", ".join(r["failed"][:3]) + ("…" if len(r["failed"]) > 3
                                                                                       else "") + ")"
        out.append(f"| {r['variant']} | {r['size_bytes'] / 1e6:.3f} | {r['latency_ratio']}x | {r['fp32']:.4f} → "
                   f"{r['value']:.4f} | {r['slices'][worst_key][0]:.4f} → {r['slices'][worst_key][1]:.4f} | "
                   f"{_num(r.get('embedding_cosine'))} | {_num(r.get('neighbor_agreement'))} | {r['gate']}{fails} | "
                   f"{r['seconds']}" + (f" (training {r['train_seconds']} s, {r['steps']} steps)" if "steps" in r
                                        else "") + " |")
    rec = recovered(ptq["fp32"], ptq["value"], qat["value"])
    f32, p_w = ptq["slices"][worst_key]
    rec_w = recovered(f32, p_w, qat["slices"][worst_key][1])
    out += ["", f"Recovered (QAT − PTQ) / (FP32 − PTQ): overall {rec}, on PTQ's worst slice ({worst_key}) {rec_w}. "
            f"FP32 model {rows[0]['fp32_size_bytes'] / 1e6:.3f} MB.", ""]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--news-steps", type=int, default=300)
    ap.add_argument("--news-lr", type=float, default=5e-6)
    ap.add_argument("--news-batch", type=int, default=8)
    ap.add_argument("--news-rows", type=int, default=1000)
    ap.add_argument("--skip-news", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--from-json", help="rewrite the table from a results JSON of an earlier run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for n in ("onnx_ir", "matplotlib", "PIL", "great_expectations", "urllib3"):
        logging.getLogger(n).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        results = {"machine": cpu_info(), "settings": vars(args)}
        with tempfile.TemporaryDirectory() as tmp:
            results["planted"] = planted(Path(tmp))
            if not args.skip_news:
                results["news"] = news(Path(tmp), args.news_steps, args.news_batch, args.news_rows, args.news_lr)
    lines = [f"Machine: {results['machine']}", ""]
    lines += table("Planted MLP, INT8 static (x86_64_vnni_int8): a slice carried by weights INT8 rounds to 0",
                   results["planted"])
    if "news" in results:
        lines += table(f"all-MiniLM-L6-v2 + topic head (BBC News), INT4 weight-only (int4_weight_only, block 32); "
                       f"QAT: {args.news_steps} steps of batch {args.news_batch}, lr {args.news_lr}, distillation "
                       "(KL on the logits + relative MSE on the sentence embedding)",
                       results["news"])
    (out / "qat.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "qat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
