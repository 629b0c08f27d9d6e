"""QAT training settings (:class:`QatConfig`) and the schemes each engine trains: torchao's configs (``SCHEMES``)
and PT2E's (``PT2E_SCHEMES``); ``CUDA_SCHEMES`` need a CUDA worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qops.errors import QopsError

# learning rate per engine when none is given: qdq trains the PTQ model's own weights, which start one rounding
# step from their targets (Adam moves a weight by about lr per step; an INT8 step is ~1e-3 of a weight's range)
DEFAULT_LR = {"torchao": 1e-4, "pt2e": 1e-4, "qdq": 1e-5}
# rows per step per engine when none is given (qdq: measured on MobileNetV2 and Lite0, 224x224 on 2 cores: more,
# smaller steps in the same time), and the training length when neither steps nor epochs is given
DEFAULT_BATCH = {"torchao": 32, "pt2e": 32, "qdq": 8}
DEFAULT_LENGTH = {"qdq": {"steps": 300}}  # others: 3 epochs


@dataclass
class QatConfig:
    scheme: str = "int8_dynamic_int4_weight"  # see SCHEMES (engine torchao) and PT2E_SCHEMES (engine pt2e)
    engine: str = "torchao"  # torchao (QATConfig on nn.Linear) | pt2e (prepare_qat_pt2e) | qdq (the PTQ graph itself)
    group_size: int = 32
    steps: int | None = 100  # optimizer steps; or epochs (one of the two)
    epochs: float | None = None
    batch_size: int | None = None  # None: the engine's default (DEFAULT_BATCH)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float | None = None  # None: the engine's default (DEFAULT_LR)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 25
    loss: str = "task"  # task (cross-entropy with labels) | distill (KL to the FP32 teacher)
    temperature: float = 1.0
    time_budget_s: float | None = None  # stop (with a checkpoint) once training took this long, across retries
    holdout: float = 0.2  # fraction of the rows held out, scored at each checkpoint; the best weights are kept
    patience: int | None = 8  # checkpoints without a better held-out loss before training stops (None: never)
    bn_freeze_after: float | None = 0.0  # fraction of the planned steps after which BN uses its running stats
    freeze_after: float | None = 0.5  # fraction of the planned steps after which the observers (ranges) freeze
    logit_mse: float = 1.0  # distill: weight of the logits' relative MSE beside the KL

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.engine, 1e-4)
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH.get(self.engine, 32)
        known = {"torchao": SCHEMES, "pt2e": PT2E_SCHEMES, "qdq": QDQ_SCHEMES}.get(self.engine)
        if known is None:
            raise QopsError(f"QAT engine {self.engine!r} is not qdq, pt2e or torchao.", "use engine: qdq, pt2e or torchao.")
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
        if not 0 <= self.holdout < 1 or (self.patience is not None and self.patience < 1) or self.logit_mse < 0 \
                or (self.freeze_after is not None and not 0 < self.freeze_after <= 1) \
                or (self.bn_freeze_after is not None and not 0 <= self.bn_freeze_after <= 1):
            raise QopsError(f"QAT holdout {self.holdout}, patience {self.patience}, freeze_after "
                            f"{self.freeze_after}, bn_freeze_after {self.bn_freeze_after} or logit_mse "
                            f"{self.logit_mse} is out of range.",
                            "use 0 <= holdout < 1, patience >= 1 (or null), 0 < freeze_after <= 1 (or null), "
                            "0 <= bn_freeze_after <= 1 (or null), "
                            "logit_mse >= 0.")

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
# qdq: fine-tuning of the target's static QDQ PTQ model itself (qops.qat.qdq): its scales and zero points as
# calibrated, then learned (LSQ) with the weights; the graph is the PTQ model's.
QDQ_SCHEMES: dict[str, dict] = {"int8_static": {}}
