"""Quantization-aware fine-tuning of a static QDQ model, on the graph that will be served.

PT2E QAT trains a PyTorch program and exports a *different* quantized graph from the one qops' PTQ writes (other
op coverage, ranges observed during training, no bias correction). This module instead trains the PTQ model itself
— the ONNX QDQ graph, after integer-graph quantization, bias correction and the rest — run as a PyTorch function
(:class:`~qops.quantize.qdq_sim.QdqModule`): weights and biases, and with ``learn_ranges`` the quantization
scales as learned step sizes (LSQ).

It trains by distillation from the FP32 model's outputs (KL divergence of the softened outputs plus a relative
squared error that keeps the logits calibrated, not only their ranking), on the calibration rows less a held-out
share, evaluates the held-out rows every ``eval_every`` steps, keeps the state with the lowest held-out loss
(smoother than top-1 agreement on a few rows), stops early when it no longer improves, and writes the best
weights, biases (and scales) back as initializers. The graph and the zero points are unchanged: the model runs
exactly as fast as the PTQ model it started from. BatchNorm statistics are frozen: BN was folded into the
convolutions on export, as the literature freezes and folds it for the end of QAT (Krishnamoorthi 2018, 3.2).
With ``labels``, a cross-entropy term on them joins the distillation loss.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from qops.calibration.collect import run_batched
from qops.quantize.qdq_sim import QdqModule, UnsupportedGraph, range_change, write_initializers

log = logging.getLogger(__name__)


def _fidelity(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    cos = np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return agree, float(cos.mean())


def finetune(qmodel, fmodel, feeds: dict[str, np.ndarray], *, steps: int = 300, lr: float = 1e-5,
             batch_size: int = 8, holdout: float = 0.2, eval_every: int = 25, patience: int = 4,
             time_budget_s: float = 1200.0, seed: int = 0, mse_weight: float = 1.0, learn_ranges: bool = False,
             range_lr: float = 1e-3, freeze_ranges_at: int | None = None, labels: np.ndarray | None = None, temperature: float = 1.0,
             on_progress=None) -> dict:
    """Fine-tune ``qmodel`` (a static QDQ ModelProto, changed in place) to reproduce ``fmodel``'s first output on
    ``feeds`` (model inputs by name, rows on axis 0). Returns a report: steps, rows trained and held out, the held-out
    top-1 agreement and cosine before and after, the step kept, why it stopped, seconds. ``learn_ranges``: train
    the scales too (``range_lr``: their learning rate, per step a relative change; from step ``freeze_ranges_at`` on
    they stay where they are while the weights settle); ``labels``: class indices per
    row for a cross-entropy term; ``on_progress(step, report)`` after every evaluation."""
    import onnxruntime as ort
    import torch

    t0 = time.perf_counter()
    names = list(feeds)
    n = len(feeds[names[0]])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = max(1, int(round(n * holdout))) if n >= 10 else 0
    hold, train = order[:n_hold], order[n_hold:]
    if len(train) < batch_size:
        return {"skipped": f"{len(train)} training rows, fewer than the batch size {batch_size}"}
    fsess = ort.InferenceSession(fmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    t_all = run_batched(fsess, feeds, 32)[0]  # the FP32 model's outputs, once
    try:
        sim = QdqModule(qmodel, torch, learn_ranges=learn_ranges)
    except UnsupportedGraph as e:
        return {"skipped": f"the QDQ graph has {e}, which the fine-tuning simulator does not run"}
    params = list(sim.params.values()) + list(sim.ranges.values())
    groups = [{"params": list(sim.params.values()), "lr": lr}]
    if len(sim.ranges):
        groups.append({"params": list(sim.ranges.values()), "lr": range_lr})
    opt = torch.optim.Adam(groups)
    y_all = None if labels is None else torch.from_numpy(np.asarray(labels).astype(np.int64))
    torch.manual_seed(seed)

    def predict(idx):
        with torch.no_grad():
            return np.concatenate([sim.forward({k: torch.from_numpy(feeds[k][idx[i:i + 16]]) for k in names})[0].numpy()
                                   for i in range(0, len(idx), 16)])

    def loss_fn(s, t, y=None):
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                                        log_target=True, reduction="batchmean") * temperature ** 2
        loss = kl + mse_weight * ((s - t) ** 2).mean() / (t.pow(2).mean() + 1e-12)
        return loss if y is None else loss + torch.nn.functional.cross_entropy(s, y)

    def score(idx):
        """Held-out loss (what selects the step: smoother than agreement on a few rows), agreement, cosine."""
        out = predict(idx)
        with torch.no_grad():
            held = float(loss_fn(torch.from_numpy(out), torch.from_numpy(t_all[idx])))
        return (held, *_fidelity(out, t_all[idx]))

    start = score(hold) if n_hold else (None, None, None)
    best = {"step": 0, "loss": start[0], "agreement": start[1], "cosine": start[2],
            "state": [p.detach().clone() for p in params]}
    stopped, bad, step, losses, evals = "steps done", 0, 0, [], []
    log.info("fine-tuning: %d training rows, %d held out (agreement %.3f, cosine %.4f before)", len(train), n_hold,
             start[1] or 0, start[2] or 0)
    for step in range(1, steps + 1):
        if freeze_ranges_at is not None and step > freeze_ranges_at and len(opt.param_groups) > 1:
            opt.param_groups[1]["lr"] = 0.0
        idx = train[rng.choice(len(train), batch_size, replace=False)]
        x = {k: torch.from_numpy(feeds[k][idx]) for k in names}
        t = torch.from_numpy(t_all[idx])
        loss = loss_fn(sim.forward(x)[0], t, None if y_all is None else y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(float(loss.detach()), 6))
        if n_hold and (step % eval_every == 0 or step == steps):
            held, agree, cos = score(hold)
            log.info("fine-tuning step %d/%d: loss %.4f, held-out loss %.4f, agreement %.3f, cosine %.4f", step,
                     steps, float(loss.detach()), held, agree, cos)
            evals.append([step, round(held, 6)])
            if on_progress is not None:
                on_progress(step, {"loss": held, "agreement": agree, "cosine": cos})
            if held < best["loss"]:
                best = {"step": step, "loss": held, "agreement": agree, "cosine": cos,
                        "state": [p.detach().clone() for p in params]}
                bad = 0
            else:
                bad += 1
                if bad >= patience:
                    stopped = f"no held-out improvement in {patience} evaluations"
                    break
        if time.perf_counter() - t0 > time_budget_s:
            stopped = f"time budget ({time_budget_s:.0f} s)"
            break
    with torch.no_grad():
        for p, v in zip(params, best["state"]):
            p.copy_(v)
    write_initializers(qmodel, sim.export())
    moved = range_change(sim, torch)
    return {"steps": step, "kept_step": best["step"], "train_rows": int(len(train)), "held_out_rows": int(n_hold),
            "held_out_before": {"loss": start[0], "agreement": start[1], "cosine": start[2]},
            "held_out_after": {"loss": best["loss"], "agreement": best["agreement"], "cosine": best["cosine"]},
            "stopped": stopped, "lr": lr, "batch_size": batch_size, "learned_ranges": moved,
            "losses": losses, "evals": evals, "seconds": round(time.perf_counter() - t0, 1)}
