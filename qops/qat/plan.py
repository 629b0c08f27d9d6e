"""QAT planning, in one place for the pipeline, `qops qat` and spec validation: which engine and scheme serve a
target, in which format the trained model is written, on which queue, and the training config.

Targets and what QAT produces for them (:func:`plan_for`):

- ONNX Runtime static INT8 targets: engine ``qdq`` (default): the target's PTQ model itself — the QDQ graph the
  tuner chose, with its integer graph and bias correction — is fine-tuned, weights and scales (LSQ), and written
  with the same nodes (:mod:`qops.qat.qdq`); no PyTorch program is needed. Or engine ``pt2e``: PT2E QAT of the
  model's ``.pt2`` program (``prepare_qat_pt2e`` with torchao's ``X86InductorQuantizer`` in QAT mode),
  ``convert_pt2e``, then ``torch.onnx`` (dynamo) writes ONNX QDQ, which ONNX Runtime fuses into integer kernels.
- ONNX Runtime dynamic INT8 (an ``auto`` target whose PTQ chose dynamic): PT2E, which ``torch.onnx`` cannot write
  in this release (an error says so).
- ONNX Runtime INT4 weight-only (``MatMulNBits``): torchao ``IntxWeightOnlyConfig`` (int4, groups of the target's
  block size) through ``QATConfig``; the converted layers' own integers and scales are written as ``MatMulNBits``
  into the FP32 ONNX graph, each layer checked against torchao's dequantized weight
  (:mod:`qops.qat.export`). Re-quantizing the trained weights with ONNX Runtime's RTN would use another
  scale grid and lose part of what training bought.
- torchao targets (``torch_*``, ``nvidia_hopper_fp8``): the matching torchao or PT2E scheme, saved as a ``.pt2``
  program like the PTQ path's.

CUDA schemes (``int4_weight_only_cuda``, ``float8_dynamic``) run on the ``gpu`` queue; on a worker without CUDA
they fail with an error naming the queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from qops.errors import QopsError
from qops.qat.config import CUDA_SCHEMES, DEFAULT_LENGTH, PT2E_SCHEMES, QDQ_SCHEMES, SCHEMES, QatConfig
from qops.targets import list_targets


@dataclass(frozen=True)
class QatPlan:
    target: str
    engine: str  # qdq | pt2e | torchao
    scheme: str
    output: str  # onnx_qdq | onnx_matmulnbits | pt2
    queue: str
    group_size: int | None = None


_TORCH_METHOD = {"pt2e_x86_inductor": ("pt2e", "int8_static"), "int8_dynamic": ("torchao", "int8_dynamic_int8_weight"),
                 "int4_weight_only": ("torchao", "int4_weight_only_cuda"), "float8_dynamic": ("torchao", "float8_dynamic")}


# a static ONNX QDQ target is also written by PT2E QAT of the model's torch program (engine: pt2e)
_ALSO = {"qdq": {"qdq": QDQ_SCHEMES, "pt2e": PT2E_SCHEMES}}


def supported_targets() -> dict[str, str]:
    """Target name -> default QAT scheme, for every registered target QAT can serve."""
    out = {}
    for name, recipe in list_targets().items():
        if recipe.model_kind == "causal_lm":  # decoder LLMs fine-tune with the qlora stage (docs/llm.md)
            continue
        d = _defaults(recipe, None)
        if d is not None and not (d[3] == "onnx_qdq" and d[0] == "int8_dynamic"):
            out[name] = f"{d[1]}:{d[0]}"
    return out


def _defaults(recipe, mode: str | None):
    """(default scheme, engine, allowed schemes, output format, group size), or None if QAT does not serve it."""
    if recipe.engine == "onnxruntime" and recipe.precision == "int8" and recipe.mode in ("static", "dynamic", "auto"):
        m = mode if recipe.mode == "auto" else recipe.mode
        if m == "dynamic":
            return "int8_dynamic", "pt2e", PT2E_SCHEMES, "onnx_qdq", None
        return "int8_static", "qdq", QDQ_SCHEMES, "onnx_qdq", None
    if recipe.engine == "onnxruntime" and recipe.precision == "int4" and recipe.mode == "weight_only":
        return "int4_weight_only", "torchao", {"int4_weight_only"}, "onnx_matmulnbits", recipe.block_size
    if recipe.engine == "torchao" and recipe.torch_method in _TORCH_METHOD:
        eng, default = _TORCH_METHOD[recipe.torch_method]
        return default, eng, (PT2E_SCHEMES if eng == "pt2e" else SCHEMES), "pt2", None
    return None


def plan_for(recipe, engine: str | None = None, scheme: str | None = None, mode: str | None = None) -> QatPlan:
    """How QAT serves ``recipe``'s target; ``engine``/``scheme`` override the default where the target's format
    allows it. ``mode`` resolves an ``auto`` INT8 recipe (static or dynamic, as the PTQ path decided)."""
    d = _defaults(recipe, mode)
    if d is None:
        raise QopsError(f"QAT does not serve target {recipe.target!r} ({recipe.precision} {recipe.mode}, "
                        f"{recipe.engine}).", f"QAT serves {sorted(supported_targets())}; remove the target from "
                        "qat.targets.")
    default, eng, allowed, out, group = d
    engines = _ALSO.get(eng, {eng: allowed})
    if engine and engine not in engines:
        raise QopsError(f"Target {recipe.target!r} takes QAT engine {' or '.join(engines)} (its format: {out}); "
                        f"{engine!r} was asked.", f"set qat engine {' or '.join(engines)} for this target, or leave it "
                        "unset.")
    if engine and engine != eng:
        eng, allowed = engine, engines[engine]
        default = "int8_static" if default not in allowed else default
    chosen = scheme or default
    if chosen not in allowed:
        raise QopsError(f"QAT scheme {chosen!r} does not produce target {recipe.target!r}'s format ({out}).",
                        f"use one of {sorted(allowed)}, or leave scheme unset (default {default}).")
    if out == "onnx_qdq" and chosen == "int8_dynamic":
        raise QopsError(f"QAT with dynamic INT8 activations cannot be written as ONNX for target {recipe.target!r}: "
                        "torch.onnx does not export PT2E's dynamic quantization (choose_qparams) in this release.",
                        "use QAT with static activations (a static target, e.g. x86_64_vnni_int8 with mode static), "
                        "or torch_int8_dynamic (a .pt2 program) for dynamic INT8.")
    queue = "gpu" if chosen in CUDA_SCHEMES else recipe.queue
    return QatPlan(target=recipe.target, engine=eng, scheme=chosen, output=out, queue=queue, group_size=group)


def require_cuda_for(plan: QatPlan) -> None:
    if plan.scheme not in CUDA_SCHEMES:
        return
    import torch

    if not torch.cuda.is_available():
        raise QopsError(f"QAT scheme {plan.scheme} for target {plan.target!r} trains with CUDA kernels, and this "
                        "worker has no CUDA device.",
                        "run the target's tasks on the 'gpu' queue (a Celery worker started with --queues gpu on a "
                        "machine with an NVIDIA GPU), or choose a CPU scheme (int8_dynamic_int4_weight, "
                        "int4_weight_only).")


def config_for(qat, target: str, plan: QatPlan, has_label: bool, **overrides) -> QatConfig:
    """The training config of ``target``: the spec's ``qat`` block (:class:`~qops.spec.QatSpec`), then the
    target's own overrides (``qat.targets.<target>``), then ``overrides`` (``qops qat`` flags)."""
    t = qat.targets[target]
    steps = t.steps if t.steps is not None else (None if t.epochs is not None else qat.steps)
    epochs = t.epochs if t.epochs is not None else (None if t.steps is not None else qat.epochs)
    if steps is None and epochs is None:
        steps, epochs = DEFAULT_LENGTH.get(plan.engine, {}).get("steps"), None
        epochs = 3.0 if steps is None else None
    group = t.group_size or plan.group_size or qat.group_size
    return QatConfig(scheme=plan.scheme, engine=plan.engine, group_size=group, steps=steps, epochs=epochs,
                     batch_size=t.batch_size or qat.batch_size, optimizer=qat.optimizer, lr=t.lr or qat.lr,
                     momentum=qat.momentum, weight_decay=qat.weight_decay, seed=qat.seed,
                     checkpoint_every=qat.checkpoint_every, loss=qat.resolved_loss(has_label),
                     temperature=qat.temperature, time_budget_s=t.time_budget_s or qat.time_budget_s,
                     holdout=qat.holdout, patience=qat.patience, freeze_after=qat.freeze_after,
                     bn_freeze_after=qat.bn_freeze_after, logit_mse=qat.logit_mse)
