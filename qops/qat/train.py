"""Quantization-aware training, resumable from safe checkpoints: the training core of the ``qat`` stage
(docs/qat.md; the job around it is :mod:`qops.qat_job`).

Two engines insert the fake quantization: torchao (``quantize_(model, QATConfig(base, step="prepare"))`` swaps
``nn.Linear`` for fake-quantized versions; ``step="convert"`` produces torchao's quantized tensors) and PT2E
(``prepare_qat_pt2e`` with ``X86InductorQuantizer`` in QAT mode on an exported graph; ``convert_pt2e`` gives a
graph with quantize/dequantize ops). The loop trains with the task loss (labels) or by distillation (the FP32
teacher's outputs: KL on the softened logits plus their relative MSE, so the logits stay calibrated).

A seeded ``holdout`` fraction of the rows never trains: at every checkpoint it is scored (the same loss, model in
eval mode, observers paused), the best-scoring weights are kept and restored at the end, and ``patience``
checkpoints without improvement stop training early. Batch norm runs on its running statistics from
``bn_freeze_after`` of the planned steps (default 0: the pretrained statistics are kept, as fine-tuning on a few
hundred rows needs; their batches would overwrite ImageNet-scale statistics), and after ``freeze_after`` the
observers stop (activation ranges and weight scales fixed) while the weights keep training, as Krishnamoorthi
(2018) and the PyTorch QAT recipe do.

Every ``checkpoint_every`` steps the state is written under ``work_dir`` (:mod:`qops.qat_state`: safetensors and
JSON, nothing pickled, renamed into place). ``train_qat`` on a ``work_dir`` that holds a checkpoint of the same
config resumes from it: an Airflow retry continues where the killed attempt stopped, and with the same seed ends
with the same weights as an uninterrupted run. Batches are drawn from a permutation seeded by (seed, epoch), so
the data order does not depend on process state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qops.errors import QopsError
from qops.programs import retarget_devices
from qops.qat.config import PT2E_SCHEMES, SCHEMES, QatConfig
from qops.qat.loss import as_list, distill_loss, training_loss
from qops.qat.state import META, STATE, Progress, load_state, save_state

log = logging.getLogger(__name__)

__all__ = ["META", "STATE", "QatConfig", "QatResult", "convert", "distill_loss", "holdout_split", "prepare", "train_qat"]

@dataclass
class QatResult:
    steps: int  # steps trained (fewer than planned_steps when the time budget stopped training)
    resumed_from: int | None
    losses: list[float] = field(default_factory=list)
    checkpoints: int = 0
    config: dict = field(default_factory=dict)
    planned_steps: int = 0
    stopped_by_budget: bool = False
    seconds: float = 0.0  # training time over all attempts
    rows: int = 0  # training rows (held-out rows excluded)
    holdout_rows: int = 0
    evals: list[list[float]] = field(default_factory=list)  # [step, held-out loss] at each checkpoint
    best_step: int | None = None  # the step whose weights the result holds (lowest held-out loss)
    stopped_early: bool = False  # patience ran out
    frozen_at: int | None = None  # the step the activation ranges (observers) froze at
    bn_frozen_at: int | None = None  # the step batch norm switched to its running statistics


def prepare(model, cfg: QatConfig):
    """Insert fake quantization: torchao swaps Linear/Embedding layers for fake-quantized ones (in place);
    PT2E annotates the exported graph with X86InductorQuantizer's QAT config and returns the prepared graph."""
    if cfg.engine == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        if getattr(model, "_qops_qat_prepared", False):
            return model
        q = X86InductorQuantizer().set_global(
            get_default_x86_inductor_quantization_config(is_qat=True, **PT2E_SCHEMES[cfg.scheme]))
        try:
            prepared = prepare_qat_pt2e(model, q)
        except Exception as e:
            raise QopsError(f"PT2E cannot prepare this program for QAT: {str(e).splitlines()[0][:300]}",
                            "give a torch.export program (the .pt2 the FP32 model was exported from).") from None
        prepared._qops_qat_prepared = True
        return prepared
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    try:
        quantize_(model, QATConfig(SCHEMES[cfg.scheme](cfg), step="prepare"))
    except ValueError as e:  # e.g. a layer width the group size does not divide
        raise QopsError(f"torchao cannot prepare this model for QAT with scheme {cfg.scheme!r} "
                        f"(group_size {cfg.group_size}): {e}",
                        "set qat group_size to a divisor of every linear layer's input width (e.g. 32 or 16), "
                        "or use scheme int8_dynamic_int8_weight (per channel).") from None
    return model


def _set_mode(model, training: bool) -> None:
    """train()/eval(): PT2E graphs through torchao's helpers (dropout, batch norm); a torch.export module refuses
    train(), and its linear layers behave the same in both modes."""
    if getattr(model, "_qops_qat_prepared", False):
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        (move_exported_model_to_train if training else move_exported_model_to_eval)(model)
        return
    try:
        model.train(training)
    except NotImplementedError:
        pass


def convert(model, cfg: QatConfig):
    """Turn the trained fake-quantized model into the quantized model: torchao's quantized tensors (in place), or
    PT2E's converted graph with quantize/dequantize ops (returned)."""
    if cfg.engine == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        _set_mode(model, False)
        return convert_pt2e(model)
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(SCHEMES[cfg.scheme](cfg), step="convert"))
    return model


def _batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of batch ``step``: epoch e visits a permutation seeded by (seed, e); no process state involved."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * batch_size:(k + 1) * batch_size]


def holdout_split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of ``n``: a seeded ``holdout`` fraction held out (none when it is < 1 row).
    ``qops qat`` reports FP32/PTQ/QAT fidelity on the same held-out rows."""
    k = int(n * holdout)
    if k < 1:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng([seed, 104729]).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def _at(fraction: float | None, total: int) -> int | None:
    return None if fraction is None else int(round(total * fraction))


def _batched(tensors: list, batch_size: int):
    n = len(tensors[0])
    for i in range(0, n, batch_size):
        yield [t[i:i + batch_size] for t in tensors]


def _heldout_loss(model, held: list, held_y, teacher_held: list | None, cfg: QatConfig, train_mode: bool,
                  observing: bool) -> float:
    """The training loss on the held-out rows, the model in eval mode with its observers paused (scoring must
    not move the activation ranges); afterwards training mode and the observers are back as they were."""
    import torch
    from torchao.quantization.pt2e.fake_quantize import disable_observer, enable_observer

    _set_mode(model, False)
    model.apply(disable_observer)
    total, n = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(_batched(held, cfg.batch_size)):
            rows = slice(i * cfg.batch_size, i * cfg.batch_size + len(batch[0]))
            outs = as_list(model(*batch))
            ts = [t[rows] for t in teacher_held] if teacher_held is not None else None
            total += float(training_loss(outs, cfg, held_y[rows] if held_y is not None else None, ts)) * len(batch[0])
            n += len(batch[0])
    if train_mode:
        _set_mode(model, True)
    if observing:
        model.apply(enable_observer)
    return total / max(n, 1)


def _teacher_outputs(teacher, held: list, batch_size: int) -> list | None:
    import torch

    if teacher is None or not len(held[0]):
        return None
    with torch.no_grad():
        parts = [as_list(teacher(*b)) for b in _batched(held, batch_size)]
    return [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]


def train_qat(model, data: dict[str, np.ndarray], cfg: QatConfig, work_dir: str | os.PathLike, *,
              labels: np.ndarray | None = None, teacher=None, on_step: Callable[[int, float], None] | None = None):
    """Prepare ``model`` for QAT (unless it already is), train it on ``data`` (model inputs by name, rows on
    axis 0), checkpointing under ``work_dir`` and resuming from a checkpoint found there. Returns
    ``(prepared, result)``: the trained fake-quantized model (call :func:`convert` on it) with the weights of the
    best held-out checkpoint, and a :class:`QatResult`.

    ``cfg.loss``: ``task`` needs ``labels`` (classification, cross-entropy); ``distill`` needs ``teacher``
    (the FP32 module; KL of the student's to the teacher's softened outputs plus the logits' relative MSE).
    ``cfg.holdout`` of the rows (seeded, :func:`holdout_split`) are scored at each checkpoint instead of trained on.
    ``on_step(step, loss)`` is called after every step (progress; a test uses it to kill the run).
    ``cfg.time_budget_s`` ends training early, after a checkpoint, once the time spent (over all attempts) passes
    it; ``cfg.patience`` checkpoints without a better held-out loss do too; the result says which.
    """
    import time

    import torch

    work = Path(work_dir)
    names = list(data)
    n_all = len(data[names[0]])
    if cfg.loss == "task" and labels is None:
        raise QopsError("QAT with loss: task needs labels.", "give the training split's label column, or use "
                        "loss: distill (KL to the FP32 teacher, label-free).")
    if cfg.loss == "distill" and teacher is None:
        raise QopsError("QAT with loss: distill needs the FP32 teacher.", "pass the FP32 model as teacher.")
    train_rows, held_rows = holdout_split(n_all, cfg.holdout, cfg.seed)
    n = len(train_rows)
    if n < cfg.batch_size:
        raise QopsError(f"QAT has {n} training rows ({len(held_rows)} more held out), fewer than batch_size "
                        f"{cfg.batch_size}.", "give more rows, a smaller batch_size or a smaller holdout.")
    total = cfg.total_steps(n)
    freeze_at, bn_at = _at(cfg.freeze_after, total), _at(cfg.bn_freeze_after, total)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.needs_cuda else "cpu")  # CUDA schemes train on the GPU worker
    if device.type == "cuda":
        for m in (model, teacher):
            if m is not None:
                m.to(device)
                retarget_devices(m, device)
    model = prepare(model, cfg)
    _set_mode(model, True)
    params = [p for p in model.parameters() if p.requires_grad]  # frozen parameters stay as they are
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    config = asdict(cfg)
    resumed = load_state(model, opt, config, work)
    prog, best = resumed if resumed else (Progress(), None)
    start = prog.step
    if resumed:
        log.info("QAT: resuming from step %d of %d (%s)", start, total, work / STATE)

    def rows_of(idx):
        return [torch.from_numpy(np.ascontiguousarray(np.asarray(data[k])[idx])).to(device) for k in names]

    tensors, held = rows_of(train_rows), rows_of(held_rows)
    y_all = torch.from_numpy(np.array(labels)).long().to(device) if labels is not None else None
    y = y_all[torch.from_numpy(train_rows).to(device)] if y_all is not None else None
    held_y = y_all[torch.from_numpy(held_rows).to(device)] if y_all is not None else None
    teacher_held = _teacher_outputs(teacher, held, cfg.batch_size) if cfg.loss == "distill" else None
    checkpoints, stopped, early, frozen, bn_frozen, t0 = 0, False, False, False, False, time.perf_counter()
    since_best = sum(1 for s, _ in prog.evals if prog.best_step is not None and s > prog.best_step)
    if cfg.time_budget_s is not None and prog.seconds >= cfg.time_budget_s and start < total:
        stopped = True  # an earlier attempt used the budget up: no more steps
        log.warning("QAT: time budget of %.0f s already used (%.1f s); keeping step %d of %d", cfg.time_budget_s,
                    prog.seconds, start, total)
    if cfg.patience is not None and since_best >= cfg.patience and start < total:
        stopped = early = True  # an earlier attempt ran out of patience
    spent = prog.seconds
    for step in range(start, total if not stopped else start):
        if bn_at is not None and step >= bn_at and not bn_frozen:
            _set_mode(model, False)  # batch norm on its running statistics (and dropout off)
            bn_frozen = True
        if freeze_at is not None and step >= max(freeze_at, 1) and not frozen:
            from torchao.quantization.pt2e.fake_quantize import disable_observer

            model.apply(disable_observer)
            frozen = True
            log.info("QAT: activation ranges and weight scales frozen at step %d of %d", step, total)
        idx = torch.from_numpy(_batch_indices(n, step, cfg.batch_size, cfg.seed)).to(device)
        batch = [t[idx] for t in tensors]
        opt.zero_grad()
        outs = as_list(model(*batch))
        ts = None
        if cfg.loss == "distill":
            with torch.no_grad():
                ts = as_list(teacher(*batch))
        loss = training_loss(outs, cfg, y[idx] if y is not None else None, ts)
        loss.backward()
        opt.step()
        prog.losses.append(round(float(loss.item()), 6))
        prog.step = step + 1
        prog.seconds = spent + time.perf_counter() - t0
        stopped = cfg.time_budget_s is not None and prog.seconds >= cfg.time_budget_s and step + 1 < total
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total or stopped:
            if len(held_rows):
                h = round(_heldout_loss(model, held, held_y, teacher_held, cfg, not bn_frozen, not frozen), 6)
                prog.evals.append([step + 1, h])
                if prog.best_loss is None or h < prog.best_loss:
                    prog.best_step, prog.best_loss, since_best = step + 1, h, 0
                    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    since_best += 1
                early = cfg.patience is not None and since_best >= cfg.patience and step + 1 < total
                stopped = stopped or early
                log.info("QAT step %d/%d: held-out loss %.5f (best %.5f at step %d)", step + 1, total, h,
                         prog.best_loss, prog.best_step)
            save_state(model, opt, prog, config, work, best)
            checkpoints += 1
        if on_step is not None:
            on_step(step + 1, prog.losses[-1])
        if (step + 1) % max(1, total // 10) == 0:
            log.info("QAT step %d/%d loss %.5f", step + 1, total, prog.losses[-1])
        if stopped:
            log.warning("QAT: %s after step %d of %d", f"no better held-out loss in {cfg.patience} checkpoints"
                        if early else f"time budget of {cfg.time_budget_s:.0f} s used up", step + 1, total)
            break
    if best is not None and prog.best_step != prog.step:
        model.load_state_dict(best)
        log.info("QAT: keeping the weights of step %d (lowest held-out loss %.5f)", prog.best_step, prog.best_loss)
    _set_mode(model, False)
    return model, QatResult(steps=len(prog.losses), planned_steps=total, resumed_from=start if resumed else None,
                            losses=prog.losses, checkpoints=checkpoints, config=config,
                            stopped_by_budget=stopped and not early, seconds=round(spent + time.perf_counter() - t0, 2),
                            rows=n, holdout_rows=len(held_rows), evals=prog.evals, best_step=prog.best_step,
                            stopped_early=early,
                            frozen_at=freeze_at if freeze_at is not None and prog.step > freeze_at else None,
                            bn_frozen_at=bn_at if bn_at is not None and prog.step > bn_at else None)
