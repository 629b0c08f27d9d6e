"""Model files, the floor every layer reads: what a model takes (its graph inputs: name, shape, dtype) and its
metadata, for ONNX files and ``.pt2`` programs, and ``.pt2`` file I/O (save, safe load, device retargeting).
Below the data kinds, the quantization engines, the runtime and the registry, so none of them imports another
for this. torch is imported inside the functions that need it."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qops.artifacts import atomic_path
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


META_FILE = "qops.json"
MAX_BATCH = 1 << 16


def save_program(program, path: str | os.PathLike, meta: dict) -> Path:
    """``torch.export.save`` to a temporary name, then rename (never a half-written archive)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.export.save(program, f, extra_files={META_FILE: json.dumps(meta)})
    return Path(path)


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` is ``weights_only=True``: ``torch.export.load`` falls back to full unpickling
    when a safe load fails, which would run code from an untrusted archive. Tensor subclasses of torchao
    (quantized weights) are allowed by name."""
    import torch

    real = torch.load

    def safe(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    allowed = []
    try:
        import torchao.quantization as tq

        allowed = [getattr(tq, n) for n in dir(tq) if n.endswith("Tensor") and isinstance(getattr(tq, n), type)]
    except ImportError:
        pass
    torch.load = safe
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = real


def load_program(path: str | os.PathLike):
    """Load a ``.pt2`` program and its qops metadata (``torch.export.load`` with every tensor load
    ``weights_only=True``: nothing in the archive is unpickled as code)."""
    import torch

    extra = {META_FILE: ""}
    try:
        with weights_only_loads():
            ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:
        raise ModelError(f"{path} is not a readable torch.export program (.pt2): {str(e).splitlines()[0][:200]}",
                         "save the model with torch.export.save (a .pt2 archive).") from None
    try:
        meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    except ValueError:
        meta = {}
    return ep, meta


def program_inputs(ep) -> list[tuple[str, tuple, str]]:
    """(name, shape with None for dynamic dims, dtype name) of the program's user inputs."""
    out = []
    user = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            shape = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else None for d in val.shape)
            out.append((node.name, shape, str(val.dtype).replace("torch.", "")))
    return out


def export_module(module, example, meta: dict, path: str | os.PathLike) -> Path:
    """Export ``module`` with a dynamic batch dimension and save it."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ep = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    return save_program(ep, path, meta)


def retarget_devices(gm, device) -> int:
    """Point ``device=`` arguments baked into an exported graph (``torch.arange(..., device=cpu)`` traced on the
    CPU) at ``device``, so the program runs where its weights now are. Returns how many were changed."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:0, not cuda
    changed = 0
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device")
        if isinstance(dev, torch.device) and dev != device:
            node.kwargs = {**node.kwargs, "device": device}
            changed += 1
    if changed:
        gm.recompile()
    return changed
