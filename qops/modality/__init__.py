"""Model families. A :class:`~qops.modality.base.Modality` provides what differs between them in the pipeline's
stages (source resolution, calibration features, quantize, evaluate, registry extras); the stages themselves
(:mod:`qops.pipeline`) are the same for every family. Chosen once from the spec: :func:`modality_for`."""

from __future__ import annotations

from qops.modality.base import Modality
from qops.modality.causal_lm import CausalLmModality
from qops.modality.graph import GraphModality

MODALITIES: dict[str, Modality] = {"graph": GraphModality(), "causal_lm": CausalLmModality()}


def modality_for(spec) -> Modality:
    """``data.kind: causal_lm``: decoder LLMs; every other kind (tabular, tensors, text, image): ONNX graphs fed by
    input name."""
    return MODALITIES["causal_lm" if spec.data.kind == "causal_lm" else "graph"]


__all__ = ["MODALITIES", "Modality", "modality_for"]
