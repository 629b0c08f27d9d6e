"""QAT engine ``qdq``: quantization-aware fine-tuning of the target's PTQ model itself.

The PTQ model — the ONNX QDQ graph the tuner chose, with its integer graph, equalization and bias correction —
is run as a PyTorch function (:class:`~qops.quantize.qdq_sim.QdqModule`) and trained: weights and biases with
the straight-through estimator, weight and activation scales as learned step sizes (LSQ), by distillation from
the FP32 model on unlabelled rows (KL of the softened outputs plus the logits' relative squared error; with a
label column, cross-entropy too). A seeded share of the rows is held out: it is scored every
``checkpoint_every`` steps, the best state is the one shipped, and ``patience`` evaluations without a better
held-out loss stop training. BatchNorm is frozen: it was folded into the convolutions on export, as QAT folds it
for its last phase (Krishnamoorthi 2018). The exported model has the PTQ model's nodes, zero points and tied
scales, so ONNX Runtime fuses and runs it exactly as it runs the PTQ model. No PyTorch program is needed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from qops.artifacts import atomic_path, sha256_file
from qops.errors import QopsError
from qops.qat.config import QatConfig
from qops.qat.train import QatResult
from qops.quantize.finetune import finetune
from qops.quantize.graph import load, save_model

log = logging.getLogger(__name__)
RANGE_LR = 1e-3  # the scales' learning rate: Adam moves each log-scale by about this much per step (0.1%)


def qdq_qat(*, ptq_model: str | os.PathLike, source_onnx: str | os.PathLike, cfg: QatConfig, train_feeds: dict,
            labels: np.ndarray | None, out_path: str | os.PathLike) -> tuple[Path, QatResult, dict]:
    """Fine-tune ``ptq_model`` towards ``source_onnx`` (FP32) on ``train_feeds`` and write it to ``out_path``
    (atomically). Returns the path, the training record, and the fine-tuning report."""
    ptq = load(ptq_model)
    if not any(n.op_type == "QuantizeLinear" for n in ptq.graph.node):
        raise QopsError(f"QAT engine qdq fine-tunes a static QDQ model, and {ptq_model} has no QuantizeLinear node.",
                        "quantize the target in static mode first (mode: static), or choose QAT engine pt2e.")
    rows = len(next(iter(train_feeds.values())))
    steps = cfg.total_steps(int(rows * (1 - cfg.holdout)))
    lr = cfg.lr
    frozen = None if cfg.freeze_after is None else int(round(steps * cfg.freeze_after))
    t0 = time.perf_counter()
    report = finetune(ptq, load(source_onnx), train_feeds, steps=steps, lr=lr, batch_size=cfg.batch_size,
                      holdout=cfg.holdout, eval_every=cfg.checkpoint_every, patience=cfg.patience or 10 ** 9,
                      time_budget_s=cfg.time_budget_s or float("inf"), seed=cfg.seed, mse_weight=cfg.logit_mse,
                      learn_ranges=True, range_lr=RANGE_LR, freeze_ranges_at=frozen, labels=labels if cfg.loss == "task" else None,
                      temperature=cfg.temperature,
                      on_progress=lambda step, r: log.info("QAT (qdq) step %d/%d: held-out agreement %.3f, cosine "
                                                           "%.4f", step, steps, r["agreement"], r["cosine"]))
    if "skipped" in report:
        raise QopsError(f"QAT engine qdq cannot train {ptq_model}: {report['skipped']}.",
                        "give more training rows (qat.data, qat.max_rows), or choose QAT engine pt2e.")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        save_model(ptq, tmp)
    res = QatResult(steps=report["steps"], resumed_from=None, losses=report["losses"], checkpoints=len(report["evals"]),
                    config=asdict(cfg), planned_steps=steps, stopped_by_budget=report["stopped"].startswith("time"),
                    seconds=round(time.perf_counter() - t0, 1), rows=report["train_rows"],
                    holdout_rows=report["held_out_rows"], evals=report["evals"], best_step=report["kept_step"],
                    stopped_early=report["stopped"].startswith("no held-out"),
                    frozen_at=frozen if frozen is not None and frozen < report["steps"] else None, bn_frozen_at=0)
    detail = {k: report[k] for k in ("held_out_before", "held_out_after", "learned_ranges", "stopped", "kept_step")}
    detail["ptq_model"], detail["ptq_sha256"] = str(ptq_model), sha256_file(ptq_model)
    return out_path, res, detail
