"""QAT checkpoints without pickle (docs/qat.md#resume): what :func:`qops.qat.train_qat` writes every
``checkpoint_every`` steps under its work folder, and reads back on a retry.

- ``qat_state.safetensors``: model parameters and buffers (``model.*``), the best held-out state so far
  (``best.*``), optimizer tensors (``opt.<param>.<name>``) and the torch RNG state, as tensors: nothing is
  pickled, and loading runs no code;
- ``qat_state.json``: the step, the loss history, the held-out evaluations, the optimizer's scalar settings,
  the config.

Both are written to temporary names and renamed (the JSON last, naming the step the tensors hold), so a task
killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from qops.artifacts import atomic_path, write_json_atomic
from qops.errors import QopsError

STATE = "qat_state.safetensors"
META = "qat_state.json"


@dataclass
class Progress:
    """Where training stands: what a checkpoint records besides the tensors."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training time over all attempts
    evals: list[list[float]] = field(default_factory=list)  # [step, held-out loss] at each checkpoint
    best_step: int | None = None  # the step whose weights scored the lowest held-out loss
    best_loss: float | None = None


def tensors_of(state: dict, prefix: str) -> dict:
    """``state`` (a state dict) as detached CPU copies under ``prefix`` (the safetensors keys)."""
    import torch

    return {f"{prefix}{k}": v.detach().cpu().contiguous().clone() for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def save_state(model, opt, progress: Progress, config: dict, work: Path, best: dict | None) -> None:
    """Write the checkpoint of ``model``/``opt`` at ``progress.step``; ``best``: the best held-out state dict."""
    import torch
    from safetensors.torch import save_file

    tensors = tensors_of(model.state_dict(), "model.")
    if best is not None:
        tensors.update(tensors_of(best, "best."))
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
    write_json_atomic(work / META, {"step": progress.step, "losses": progress.losses, "config": config,
                                    "seconds": progress.seconds, "evals": progress.evals,
                                    "best_step": progress.best_step, "best_loss": progress.best_loss,
                                    "param_groups": groups, "state_ids": sorted(sd["state"])})


def state_dict_from(tensors: dict, prefix: str, model) -> OrderedDict:
    """The ``prefix`` tensors as a state dict ``model`` loads (with its module versions: observers read them;
    without one, an observer's eps is reset to its old default)."""
    sd = OrderedDict((k[len(prefix):], v) for k, v in tensors.items() if k.startswith(prefix))
    sd._metadata = getattr(model.state_dict(), "_metadata", None)
    return sd


def load_state(model, opt, config: dict, work: Path) -> tuple[Progress, dict | None] | None:
    """Restore ``model``/``opt``/the RNG from the checkpoint in ``work``; returns its progress and the best
    held-out state dict (or None), or None when there is no checkpoint. A checkpoint of another config is refused."""
    import torch
    from safetensors.torch import load_file

    meta_path, state_path = work / META, work / STATE
    if not (meta_path.is_file() and state_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("config") != config:
        raise QopsError(f"{work} holds a QAT checkpoint of another configuration ({meta.get('config')}).",
                        "use a fresh work folder for a new QAT configuration, or remove the old checkpoint.")
    tensors = load_file(str(state_path))  # safetensors: plain tensors, nothing executed
    model.load_state_dict(state_dict_from(tensors, "model.", model))
    best = state_dict_from(tensors, "best.", model) if any(k.startswith("best.") for k in tensors) else None
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return Progress(step=int(meta["step"]), losses=list(meta["losses"]), seconds=float(meta.get("seconds", 0.0)),
                    evals=[list(e) for e in meta.get("evals", [])], best_step=meta.get("best_step"),
                    best_loss=meta.get("best_loss")), best
