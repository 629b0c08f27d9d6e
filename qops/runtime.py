"""Model runners: one small interface over ONNX Runtime sessions and ``torch.export`` programs.

``open_session(path, threads, recipe)`` returns an object with ``run(None, feed) -> [outputs]`` (the ONNX Runtime
call shape), so evaluation and latency timing treat both alike. The execution provider or device comes from the
target's recipe; one this worker lacks is an error that names what to install or which queue to use.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from qops.errors import ModelError, TargetError
from qops.programs import load_program, retarget_devices

_EP_INSTALL = {
    "CUDAExecutionProvider": "onnxruntime-gpu (CUDA 12/13) on a GPU worker",
    "TensorrtExecutionProvider": "onnxruntime-gpu built with TensorRT, and TensorRT itself, on a GPU worker",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "DmlExecutionProvider": "onnxruntime-directml (Windows)",
    "QNNExecutionProvider": "onnxruntime-qnn (Qualcomm)",
}


def provider_chain(ep: str | None) -> list[str]:
    """The execution providers a target's model runs on, best first, ending on the CPU: TensorRT falls back to
    CUDA, CUDA to the CPU (the one fallback rule of evaluation and of the registered model's serving)."""
    ep = ep or "CPUExecutionProvider"
    chain = {"TensorrtExecutionProvider": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
             "CUDAExecutionProvider": ["CUDAExecutionProvider"]}.get(ep, [ep] if ep != "CPUExecutionProvider" else [])
    return chain + ["CPUExecutionProvider"]


def check_provider(recipe: dict | None) -> list[str]:
    """ONNX Runtime providers to run a recipe's model with; raises TargetError if this worker lacks them."""
    import onnxruntime as ort

    ep = (recipe or {}).get("execution_provider") or "CPUExecutionProvider"
    if (recipe or {}).get("engine") == "torchao":
        return ["CPUExecutionProvider"]  # the FP32 ONNX side of a torch target, if any
    have = ort.get_available_providers()
    if ep not in have:
        target = (recipe or {}).get("target", "?")
        raise TargetError(
            f"Target {target!r} runs on ONNX Runtime's {ep}, which this worker's onnxruntime "
            f"{ort.__version__} lacks (it has {', '.join(have)}).",
            f"install {_EP_INSTALL.get(ep, 'an onnxruntime build with ' + ep)} and route the task to the "
            f"'{(recipe or {}).get('queue', 'gpu')}' queue.")
    return [p for p in provider_chain(ep) if p in have]


class OrtSession:
    def __init__(self, path, threads: int | None, providers: list[str]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load {path}: {str(e)[:400]}",
                             "check the model file and opset.") from None
        self.describe = f"ONNX Runtime {providers[0]}"
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, _names, feed):
        return self.sess.run(None, feed)


@functools.lru_cache(maxsize=4)
def _torch_module(path: str, stamp: tuple, compile: bool | None, device: str | None):
    """Load (and compile) a ``.pt2`` program once per file version, device and compile flag: evaluation runs the
    same model for predictions and again for timing, and ``torch.compile`` is the expensive part."""
    import torch

    ep, meta = load_program(path)
    dev = torch.device(device or meta.get("qops.device", "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TargetError(f"{Path(path).name} was quantized for a CUDA GPU but this worker has none.",
                          "route the task to the 'gpu' queue.")
    module = ep.module()
    if dev.type != "cpu":
        module = module.to(dev)
        retarget_devices(module, dev)
    first = next((p for p in list(module.parameters()) + list(module.buffers()) if p.is_floating_point()), None)
    dtype = first.dtype if first is not None and first.dtype in (torch.bfloat16, torch.float16) else None
    compile = meta.get("qops.torch_compile", False) if compile is None else compile
    if compile:
        import torch._inductor.config as iconf

        iconf.freezing = True  # constant-fold weights: lets Inductor lower Q/DQ patterns to INT8 kernels
        module = torch.compile(module, dynamic=True)
    return module, dtype, dev, compile


class TorchSession:
    """Runs a ``.pt2`` program (optionally through ``torch.compile``) on numpy feeds."""

    def __init__(self, path, threads: int | None = None, compile: bool | None = None, device: str | None = None):
        import torch

        p = Path(path)
        stamp = (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None  # missing: load_program says so
        self.module, self.dtype, self.device, compiled = _torch_module(str(p), stamp, compile, device)
        self.threads = threads
        self.output_names = ["output_0"]
        self.describe = f"torch {torch.__version__} {'compiled (Inductor)' if compiled else 'eager'} on {self.device}"

    def run(self, _names, feed):
        import torch

        old = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                args = []
                for x in feed.values():  # feeds are built in the program's input order
                    t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
                    if self.dtype is not None and t.is_floating_point():
                        t = t.to(self.dtype)
                    args.append(t)
                y = self.module(*args)
                y = y[0] if isinstance(y, (tuple, list)) else y
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                return [y.float().cpu().numpy()]
        finally:
            if self.threads:
                torch.set_num_threads(old)


def open_session(path: str | os.PathLike, threads: int | None = None, recipe: dict | None = None):
    """A runner for ``path``. For a torch target both sides (FP32 and quantized) run on the recipe's device and
    are compiled alike when the recipe serves through ``torch.compile``."""
    if str(path).lower().endswith(".pt2"):
        torch_recipe = recipe if (recipe or {}).get("engine") == "torchao" else None
        return TorchSession(path, threads, compile=torch_recipe.get("torch_compile") if torch_recipe else None,
                            device=torch_recipe.get("device") if torch_recipe else None)
    return OrtSession(path, threads, check_provider(recipe))
