"""Hardware targets: ``recipe`` (the :class:`Recipe` dataclass and its validation), ``registry`` (register, list,
get; the ``qops.targets`` entry-point group), and one module per family of built-in targets: ``cpu`` (ONNX Runtime
on x86-64 and ARM64), ``gpu_torch`` (NVIDIA through ONNX Runtime and torchao; torchao's ``.pt2`` targets) and
``llm`` (decoder LLMs). A new target is a function returning a Recipe, decorated with :func:`register_target`."""

from qops.targets import cpu, gpu_torch, llm  # noqa: F401 - importing them registers the built-in targets
from qops.targets.recipe import Mode, Precision, QType, Recipe, coerce_option, field_types
from qops.targets.registry import get_target, list_targets, register_target, unregister_target

__all__ = ["Mode", "Precision", "QType", "Recipe", "coerce_option", "field_types", "get_target", "list_targets",
           "register_target", "unregister_target"]
