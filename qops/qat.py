"""Quantization-aware training, resumable from safe checkpoints: the training core of the ``qat`` stage
(docs/qat.md; the job around it is :mod:`qops.qat_job`).

Two engines insert the fake quantization: torchao (``quantize_(model, QATConfig(base, step="prepare"))`` swaps
``nn.Linear`` for fake-quantized versions; ``step="convert"`` produces torchao's quantized tensors) and PT2E
(``prepare_qat_pt2e`` with ``X86InductorQuantizer`` in QAT mode on an exported graph; ``convert_pt2e`` gives a
graph with quantize/dequantize ops). The loop trains with the task loss (labels) or by distillation (the FP32
teacher's outputs). Every ``checkpoint_every`` steps the state is written under ``work_dir``:

- ``qat_state.safetensors``: model parameters and buffers, optimizer tensors (``opt.<param>.<name>``) and the
  torch RNG state, as tensors: nothing is pickled, and loading runs no code;
- ``qat_state.json``: the step, the loss history, the optimizer's scalar settings, the config.

Both are written to temporary names and renamed (the JSON last, naming the step the tensors hold), so a task
killed mid-write leaves the previous checkpoint intact. ``train_qat`` on a ``work_dir`` that holds a
checkpoint of the same config resumes from it: an Airflow retry continues where the killed attempt stopped,
and with the same seed ends with the same weights as an uninterrupted run. Batches are drawn from a
permutation seeded by (seed, epoch), so the data order does not depend on process state.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qops.artifacts import atomic_path, write_json_atomic
from qops.errors import QopsError

log = logging.getLogger(__name__)

STATE = "qat_state.safetensors"
META = "qat_state.json"


@dataclass
class QatConfig:
    scheme: str = "int8_dynamic_int4_weight"  # see SCHEMES (engine torchao) and PT2E_SCHEMES (engine pt2e)
    engine: str = "torchao"  # torchao (QATConfig on nn.Linear) | pt2e (prepare_qat_pt2e, X86InductorQuantizer)
    group_size: int = 32
    steps: int | None = 100  # optimizer steps; or epochs (one of the two)
    epochs: float | None = None
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-4
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 25
    loss: str = "task"  # task (cross-entropy with labels) | distill (KL to the FP32 teacher)
    temperature: float = 1.0
    time_budget_s: float | None = None  # stop (with a checkpoint) once training took this long, across retries

    def __post_init__(self) -> None:
        known = SCHEMES if self.engine == "torchao" else PT2E_SCHEMES if self.engine == "pt2e" else None
        if known is None:
            raise QopsError(f"QAT engine {self.engine!r} is not torchao or pt2e.", "use engine: torchao or pt2e.")
        if self.scheme not in known:
            raise QopsError(f"QAT scheme {self.scheme!r} is not one the {self.engine} engine trains.",
                            f"use one of {sorted(known)} (engine {self.engine}).")
        if self.loss not in ("task", "distill"):
            raise QopsError(f"QAT loss {self.loss!r} is not task or distill.", "use loss: task or distill.")
        if self.optimizer not in ("adamw", "sgd"):
            raise QopsError(f"QAT optimizer {self.optimizer!r} is not adamw or sgd.", "use adamw or sgd.")
        if (self.steps is None) == (self.epochs is None):
            raise QopsError("QAT needs either steps or epochs (not both).", "set one of qat steps / epochs.")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0) \
                or self.batch_size < 1 or self.checkpoint_every < 1:
            raise QopsError("QAT steps/epochs, batch_size and checkpoint_every must be positive.", "set them >= 1.")

    def total_steps(self, rows: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, int(round(self.epochs * max(1, rows // self.batch_size))))

    @property
    def needs_cuda(self) -> bool:
        return self.scheme in CUDA_SCHEMES


def _int8_dyn_int4(cfg: QatConfig):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(cfg.group_size))


def _int8_dyn_int8(cfg: QatConfig):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def _int4_weight_only(cfg: QatConfig):
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size))


def _int4_weight_only_cuda(cfg: QatConfig):
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=cfg.group_size)


def _float8_dynamic(cfg: QatConfig):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


SCHEMES: dict[str, Callable] = {
    "int8_dynamic_int4_weight": _int8_dyn_int4,  # int8 dynamic activations, int4 grouped weights (CPU)
    "int8_dynamic_int8_weight": _int8_dyn_int8,  # int8 dynamic activations, int8 per-channel weights (CPU)
    "int4_weight_only": _int4_weight_only,       # int4 grouped weights, float activations (Intx: CPU)
    "int4_weight_only_cuda": _int4_weight_only_cuda,  # Int4WeightOnlyConfig: tinygemm/CUDA kernels
    "float8_dynamic": _float8_dynamic,           # FP8 e4m3 activations and weights, per row (Hopper/Ada)
}
CUDA_SCHEMES = frozenset({"int4_weight_only_cuda", "float8_dynamic"})
# PT2E QAT: torchao's X86InductorQuantizer in QAT mode, uint8 per-tensor activations (static: ranges observed
# during training; dynamic: computed per batch at run time) and int8 per-channel symmetric weights. The
# converted graph carries quantize/dequantize ops that torch.onnx (dynamo) writes as ONNX QDQ.
PT2E_SCHEMES: dict[str, dict] = {"int8_static": {"is_dynamic": False}, "int8_dynamic": {"is_dynamic": True}}


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
    rows: int = 0


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


def _save(model, opt, step: int, losses: list[float], cfg: QatConfig, work: Path, seconds: float) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor)}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = v.detach().cpu().contiguous().clone().reshape(v.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    work.mkdir(parents=True, exist_ok=True)
    with atomic_path(work / STATE) as tmp:
        save_file(tensors, str(tmp))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
    write_json_atomic(work / META, {"step": step, "losses": losses, "config": asdict(cfg), "seconds": seconds,
                                    "param_groups": groups, "state_ids": sorted(sd["state"])})


def _load(model, opt, cfg: QatConfig, work: Path) -> tuple[int, list[float], float] | None:
    import torch
    from safetensors.torch import load_file

    meta_path, state_path = work / META, work / STATE
    if not (meta_path.is_file() and state_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("config") != asdict(cfg):
        raise QopsError(f"{work} holds a QAT checkpoint of another configuration ({meta.get('config')}).",
                        "use a fresh work folder for a new QAT configuration, or remove the old checkpoint.")
    tensors = load_file(str(state_path))  # safetensors: plain tensors, nothing executed
    from collections import OrderedDict

    sd = OrderedDict((k[len("model."):], v) for k, v in tensors.items() if k.startswith("model."))
    # module versions (observers read them: without one, an observer's eps is reset to its old default)
    sd._metadata = getattr(model.state_dict(), "_metadata", None)
    model.load_state_dict(sd)
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), list(meta["losses"]), float(meta.get("seconds", 0.0))


def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _distill_loss(outs: list, teacher_outs: list, tau: float):
    """KL divergence of the first output's softened distribution to the teacher's, plus, for each further float
    output of the same shape (an embedding), its mean squared error relative to the teacher's mean square: the
    student is held to everything the FP32 model serves, not only its top class."""
    import torch

    s, t = outs[0], teacher_outs[0]
    loss = torch.nn.functional.kl_div(torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1),
                                      log_target=True, reduction="batchmean") * tau * tau
    for s, t in zip(outs[1:], teacher_outs[1:]):
        if torch.is_floating_point(t) and s.shape == t.shape:
            loss = loss + ((s - t) ** 2).mean() / (t.pow(2).mean() + 1e-12)
    return loss


def train_qat(model, data: dict[str, np.ndarray], cfg: QatConfig, work_dir: str | os.PathLike, *,
              labels: np.ndarray | None = None, teacher=None, on_step: Callable[[int, float], None] | None = None):
    """Prepare ``model`` for QAT (unless it already is), train it on ``data`` (model inputs by name, rows on
    axis 0), checkpointing under ``work_dir`` and resuming from a checkpoint found there. Returns
    ``(prepared, result)``: the trained fake-quantized model (call :func:`convert` on it) and a :class:`QatResult`.

    ``cfg.loss``: ``task`` needs ``labels`` (classification, cross-entropy); ``distill`` needs ``teacher``
    (the FP32 module; KL divergence of the student's to the teacher's softened outputs, no labels needed).
    ``on_step(step, loss)`` is called after every step (progress; a test uses it to kill the run).
    ``cfg.time_budget_s`` ends training early, after a checkpoint, once the time spent (over all attempts) passes
    it; the result says so.
    """
    import time

    import torch

    work = Path(work_dir)
    names = list(data)
    n = len(data[names[0]])
    if cfg.loss == "task" and labels is None:
        raise QopsError("QAT with loss: task needs labels.", "give the training split's label column, or use "
                        "loss: distill (KL to the FP32 teacher, label-free).")
    if cfg.loss == "distill" and teacher is None:
        raise QopsError("QAT with loss: distill needs the FP32 teacher.", "pass the FP32 model as teacher.")
    if n < cfg.batch_size:
        raise QopsError(f"QAT has {n} training rows, fewer than batch_size {cfg.batch_size}.",
                        "give more rows or a smaller batch_size.")
    total = cfg.total_steps(n)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.needs_cuda else "cpu")  # CUDA schemes train on the GPU worker
    if device.type == "cuda":
        from qops.quantize.torch_engine import retarget_devices

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
    resumed = _load(model, opt, cfg, work)
    start, losses, spent = resumed if resumed else (0, [], 0.0)
    if resumed:
        log.info("QAT: resuming from step %d of %d (%s)", start, total, work / STATE)
    tensors = {k: torch.from_numpy(np.array(v)).to(device) for k, v in data.items()}
    y = torch.from_numpy(np.array(labels)).long().to(device) if labels is not None else None
    checkpoints, stopped, t0 = 0, False, time.perf_counter()
    if cfg.time_budget_s is not None and spent >= cfg.time_budget_s and start < total:
        stopped = True  # an earlier attempt used the budget up: no more steps
        log.warning("QAT: time budget of %.0f s already used (%.1f s); keeping step %d of %d", cfg.time_budget_s,
                    spent, start, total)
    for step in range(start, total if not stopped else start):
        idx = torch.from_numpy(_batch_indices(n, step, cfg.batch_size, cfg.seed)).to(device)
        batch = [tensors[k][idx] for k in names]
        opt.zero_grad()
        outs = _as_list(model(*batch))
        if cfg.loss == "task":
            loss = torch.nn.functional.cross_entropy(outs[0], y[idx])
        else:
            with torch.no_grad():
                ts = _as_list(teacher(*batch))
            loss = _distill_loss(outs, ts, cfg.temperature)
        loss.backward()
        opt.step()
        losses.append(round(float(loss.item()), 6))
        elapsed = spent + time.perf_counter() - t0
        stopped = cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s and step + 1 < total
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total or stopped:
            _save(model, opt, step + 1, losses, cfg, work, elapsed)
            checkpoints += 1
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if (step + 1) % max(1, total // 10) == 0:
            log.info("QAT step %d/%d loss %.5f", step + 1, total, losses[-1])
        if stopped:
            log.warning("QAT: time budget of %.0f s used up after step %d of %d", cfg.time_budget_s, step + 1, total)
            break
    _set_mode(model, False)
    return model, QatResult(steps=len(losses), planned_steps=total, resumed_from=start if resumed else None,
                            losses=losses, checkpoints=checkpoints, config=asdict(cfg), stopped_by_budget=stopped,
                            seconds=round(spent + time.perf_counter() - t0, 2), rows=n)
