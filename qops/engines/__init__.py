"""Engines: one per artifact format, registered once (:mod:`qops.engines.base`), and the one quantize verb for every
target (:func:`qops.engines.api.quantize`). Graph engines (ONNX Runtime, torchao) are in :mod:`.graph`, decoder
engines (ONNX Runtime GenAI, llama.cpp, compressed-tensors, bitsandbytes, torchao folders) in :mod:`.llm`."""

from qops.engines import graph, llm  # noqa: F401 - importing them registers the built-in engines
from qops.engines.api import quantize
from qops.engines.base import Engine, engine_for, engine_named, engine_of_result, engines, input_kind, register_engine
from qops.engines.llm import LlmEngine, LlmInputs

__all__ = ["Engine", "LlmEngine", "LlmInputs", "engine_for", "engine_named", "engine_of_result", "engines",
           "input_kind", "quantize", "register_engine"]
