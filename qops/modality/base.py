"""The protocol every model family implements. Each method gets the spec and the run's :class:`RunLayout`; results
are the JSON-able dicts (or the :class:`~qops.quantize.QuantizeResult`) the stage writes to the run folder."""

from __future__ import annotations

from typing import Protocol

from qops.errors import QopsError
from qops.registry import configure_mlflow
from qops.run_folder import ModelFolder, RunLayout


class Modality(Protocol):
    name: str

    def source(self, spec, layout: RunLayout, uri: str) -> dict:
        """Resolve ``uri`` to the FP32 model the later stages read; returns (and writes) ``source.json``."""

    def finetune(self, spec, layout: RunLayout) -> dict:
        """Fine-tune the source before calibration (the spec's ``qlora`` block)."""

    def calibration_kind(self, spec, source: dict):
        """The data kind (or tabular feature list) the calibration set is selected and checked with, and the
        model inputs its feeds must fit (None: not materialised)."""

    def quantize(self, spec, layout: RunLayout, target: str, calibration: dict | None):
        """Quantize the source for ``target``; returns a :class:`~qops.quantize.QuantizeResult`."""

    def evaluate(self, spec, layout: RunLayout, folder: ModelFolder, quantized: dict) -> dict:
        """FP32 vs quantized on the validation slices; returns the evaluation written to ``folder``."""

    def qat(self, spec, layout: RunLayout, target: str, folder: ModelFolder, why: str) -> dict:
        """Quantization-aware training of ``target`` into ``folder``."""

    def register_extras(self, spec, layout, source: dict, quantized: dict) -> tuple[dict | None, list[str]]:
        """The registered model's example feed (real rows, by input name; the signature is inferred from it) and
        the extra files logged beside it."""

    def serves(self, spec):
        """``model_uri -> {"passed": ...}``: load a registered version in its serving runtime before its aliases
        move (None: no such check for this family)."""


def unsupported(modality: str, what: str, fix: str):
    raise QopsError(f"{what} does not apply to {modality} models.", fix)


def registry_for(spec, uri: str) -> None:
    """A ``models:/`` source is read from the spec's MLflow registry: point the client at it first."""
    if uri.startswith("models:/"):
        configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)
