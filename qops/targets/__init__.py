"""Hardware targets: ``recipe`` (the :class:`Recipe`: a ``placement`` and one typed engine config), ``configs`` /
``llm_configs`` (the engine configs, registered by engine and model kind), ``registry`` (register, list, get; the
``qops.targets`` entry-point group), and one module per family of built-in targets: ``cpu`` (ONNX Runtime on
x86-64 and ARM64), ``gpu_torch`` (NVIDIA through ONNX Runtime and torchao; torchao's ``.pt2`` targets) and ``llm``
(decoder LLMs). A new target is a function returning a Recipe, decorated with :func:`register_target`."""

from qops.targets import cpu, gpu_torch, llm  # noqa: F401,E402 - importing them registers the built-in targets
from qops.targets.configs import (
    CONFIGS,
    EngineConfig,
    Mode,
    OrtConfig,
    Precision,
    QType,
    TorchaoConfig,
    config_class,
    register_config,
)
from qops.targets.llm_configs import (
    BitsAndBytesConfig,
    CompressedTensorsConfig,
    GgufConfig,
    OrtDecoderConfig,
    TorchaoDecoderConfig,
)
from qops.targets.placement import Placement
from qops.targets.recipe import Recipe, coerce_option
from qops.targets.registry import get_target, list_targets, register_target, unregister_target

__all__ = ["CONFIGS", "BitsAndBytesConfig", "CompressedTensorsConfig", "EngineConfig", "GgufConfig", "Mode",
           "OrtConfig", "OrtDecoderConfig", "Placement", "Precision", "QType", "Recipe", "TorchaoConfig",
           "TorchaoDecoderConfig", "coerce_option", "config_class", "get_target", "list_targets", "register_config",
           "register_target", "unregister_target"]
