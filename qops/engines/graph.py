"""Engines for graph models (tabular, tensor, text-encoder and image models): ONNX Runtime on ONNX graphs, torchao on
``.pt2`` programs. Both write one file beside its ``<output>.recipe.json``."""

from __future__ import annotations

from pathlib import Path

from qops.engines.base import ONNX, PT2, Engine, register_engine
from qops.quantize.ort import quantize_onnx
from qops.quantize.torch_engine import quantize_torch


@register_engine
class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    library = "ONNX Runtime"
    inputs = (ONNX,)
    artifact = "file"
    suffix = ".onnx"
    flavor = "onnx"

    @classmethod
    def accepts(cls, recipe) -> bool:
        return recipe.engine == "onnxruntime" and recipe.model_kind != "causal_lm"

    def quantize(self, model: Path, recipe, output: Path, calibration=None, features=None, batch_size: int = 64,
                 **_):
        return quantize_onnx(model, recipe, output, calibration, features, batch_size)


@register_engine
class TorchaoGraphEngine(Engine):
    name = "torchao"
    library = "torchao"
    inputs = (PT2,)
    artifact = "file"
    suffix = ".pt2"
    flavor = "pytorch"

    @classmethod
    def accepts(cls, recipe) -> bool:
        return recipe.engine == "torchao" and recipe.model_kind != "causal_lm"

    def quantize(self, model: Path, recipe, output: Path, calibration=None, features=None, batch_size: int = 64,
                 **_):
        return quantize_torch(model, recipe, output, calibration=calibration, features=features,
                              batch_size=batch_size)
