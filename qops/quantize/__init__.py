"""Quantization: one verb, :func:`quantize`, dispatching on the recipe's engine, and one result type,
:class:`QuantizeResult`. Engines: ONNX Runtime (:mod:`~qops.quantize.ort`: INT8 static/dynamic, FP16, INT4
MatMulNBits, codebooks) and torchao (:mod:`~qops.quantize.torch_engine`); techniques (SmoothQuant, AWQ,
equalization, bias correction, rounding, precision maps) are modules beside them; accuracy-aware tuning is
:mod:`qops.quantize.tune`."""

from qops.quantize.api import quantize, resolve_recipe
from qops.quantize.result import QuantizeResult

__all__ = ["QuantizeResult", "quantize", "resolve_recipe"]
