"""What a model takes: its graph inputs (name, shape, dtype) and its metadata, for ONNX files and ``.pt2``
programs. Below both the data kinds and the quantization engines, so neither imports the other for this."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qops.errors import ModelError


@dataclass(frozen=True)
class ModelInput:
    name: str
    width: int | None  # size of the last dimension, None if dynamic
    dtype: str
    shape: tuple = ()  # every dimension, None where dynamic (batch included); () if unknown

    @property
    def rank(self) -> int | None:
        return len(self.shape) if self.shape else None

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape) if self.shape else "?"
        return f"{self.name} {self.dtype}[{dims}]"


def onnx_io(model_path: str | os.PathLike) -> tuple[list[ModelInput], dict[str, str]]:
    """The model's graph inputs (excluding initializers) and its metadata_props (``.pt2``: program inputs and
    the qops metadata saved beside the program)."""
    if str(model_path).lower().endswith(".pt2"):
        from qops.quantize.torch_engine import load_program, program_inputs

        ep, meta = load_program(model_path)
        return [ModelInput(n, shape[-1] if shape else None, dt, tuple(shape) if shape else ())
                for n, shape, dt in program_inputs(ep)], meta
    import onnx

    p = Path(model_path)
    if not p.is_file():
        raise ModelError(f"Model file {p} does not exist.", "pass the path of an .onnx model.")
    if p.stat().st_size == 0:
        raise ModelError(f"Model file {p} is empty (0 bytes).", "export the model again; an interrupted copy or "
                         "download leaves an empty file.")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"{model_path} is not a readable ONNX model: {e}", "pass an .onnx file.") from None
    if not model.graph.node and not model.graph.input:
        raise ModelError(f"{p} holds no ONNX graph (no nodes, no inputs): it is not an exported model.",
                         "export the model again (torch.onnx.export or your framework's exporter).")
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        inputs.append(ModelInput(inp.name, dims[-1] if dims else None,
                                 onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
    meta = {p.key: p.value for p in model.metadata_props}
    return inputs, meta


def onnx_outputs(model_path: str | os.PathLike) -> list[str]:
    """Output names of an ONNX model (``.pt2``: ``output_0`` ...)."""
    if str(model_path).lower().endswith(".pt2"):
        return ["output_0"]
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [o.name for o in model.graph.output]
