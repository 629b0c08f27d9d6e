"""The one quantize verb: :func:`quantize` resolves the target's recipe and dispatches on its engine (as
torchao's ``quantize_`` dispatches on its config type): ONNX Runtime (:mod:`qops.quantize.ort`) or torchao
(:mod:`qops.quantize.torch_engine`). Every engine returns a :class:`~qops.quantize.result.QuantizeResult`."""

from __future__ import annotations

import os
from pathlib import Path

from qops.errors import TargetError
from qops.quantize.ort import quantize_onnx
from qops.quantize.result import QuantizeResult, check_output_path
from qops.quantize.torch_engine import quantize_torch
from qops.targets import Recipe, get_target


def resolve_recipe(target: str | Recipe, options: dict | None = None) -> Recipe:
    recipe = target if isinstance(target, Recipe) else get_target(target)
    return recipe.with_options(**options) if options else recipe


def quantize(
    model: str | os.PathLike,
    target: str | Recipe,
    output: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
    features: list[str] | None = None,
    batch_size: int = 64,
    options: dict | None = None,
) -> QuantizeResult:
    """Quantize an FP32 model for a hardware target; writes ``output`` and ``<output>.recipe.json``.

    ``options`` override recipe fields (validated), e.g. ``{"calibration_method": "percentile"}``.
    """
    recipe = resolve_recipe(target, options)
    if recipe.model_kind == "causal_lm":  # formerly sent to ONNX Runtime's graph path and written as ONNX
        raise TargetError(f"Target {recipe.target!r} is a decoder-LLM target; qops.quantize.quantize serves the graph "
                          "engines (ONNX Runtime, torchao) only.",
                          "call qops.engines.quantize (what `qops quantize` uses) with the checkpoint folder.")
    check_output_path(model, output)
    if recipe.engine == "torchao":
        return quantize_torch(model, recipe, output, calibration=calibration, features=features,
                              batch_size=batch_size)
    return quantize_onnx(Path(model), recipe, Path(output), calibration, features, batch_size)
