"""Decoders of torchao targets, run by PyTorch: a ``transformers`` causal LM (BF16 on CUDA, quantized in place by
torchao's ``quantize_``) with its ``DynamicCache``, behind the same ``prefill``/``step`` interface as
:class:`qops.llm.runner.OrtDecoder`. torch, transformers and torchao are imported where used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from qops.errors import QopsError
from qops.quantize.torch_engine import torchao_config
from qops.registry import quantization_config
from qops.targets import Recipe, get_target


class TorchDecoder:
    """A ``transformers`` causal LM (optionally quantized in place by torchao) with its ``DynamicCache``."""

    kind = "torch"

    def __init__(self, model, device: str = "cpu", describe: str = "torch"):
        self.model, self.device, self.describe = model.eval(), device, describe
        self.cache = None

    def _run(self, ids) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(ids, np.int64)[None], device=self.device)
            out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True)
            self.cache = out.past_key_values
            logits = out.logits[0].float()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            return logits.cpu().numpy()

    def prefill(self, ids) -> np.ndarray:
        self.cache = None
        return self._run(ids)

    def step(self, token: int) -> np.ndarray:
        return self._run([token])[-1]


def require_cuda(recipe) -> None:
    import torch

    if not torch.cuda.is_available():
        what = f"{recipe.engine} {recipe.torch_method}" if recipe.torch_method else f"{recipe.engine}, device cuda"
        raise QopsError(f"Target {recipe.target!r} runs on NVIDIA GPUs ({what}) but this worker "
                        "has no CUDA device.", "run its tasks on the 'gpu' queue (a Celery worker with a GPU: "
                        "airflow celery worker -q gpu), or drop the target from the spec.")
    if recipe.min_compute_capability:
        cap = torch.cuda.get_device_capability()
        if tuple(cap) < tuple(recipe.min_compute_capability):
            raise QopsError(f"Target {recipe.target!r} needs CUDA compute capability "
                            f"{'.'.join(map(str, recipe.min_compute_capability))}+; this GPU has {cap[0]}.{cap[1]}.",
                            "run it on an H100/H200 (sm_90) or Ada (sm_89) worker.")


def load_torch_target(folder: str | os.PathLike, recipe: dict | None):
    """The decoder of a checkpoint folder: a torchao target's (BF16 weights on CUDA, quantized in place by
    ``quantize_``), a bitsandbytes target's (reloaded by transformers from its ``quantization_config``), or the FP32
    checkpoint itself (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    quant = quantization_config(folder)
    if quant is not None and quant["quant_method"] == "compressed-tensors":  # decompressed at load on CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(str(folder), device_map=device, local_files_only=True)
        acts = any((g or {}).get("input_activations") for g in (quant.get("config_groups") or {}).values())
        return TorchDecoder(model, device, f"transformers+compressed-tensors {quant.get('format')} on {device} "
                            + ("(weights decompressed, activation quantization emulated)" if acts and device == "cpu"
                               else "(weights decompressed)" if device == "cpu" else ""))
    if quant is not None:  # a bitsandbytes folder: transformers applies its quantization_config at load
        r = Recipe.from_dict(recipe) if recipe else None
        device = r.device if r else ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(str(folder), device_map=device, local_files_only=True)
        what = "nf4" if quant.get("load_in_4bit") else "int8"
        return TorchDecoder(model, device, f"transformers+bitsandbytes {what} on {device}")
    conf_path = folder / "qops_torchao.json"
    if not conf_path.is_file():  # the FP32 checkpoint itself (the reference for a torch target)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).to(device)
        return TorchDecoder(model, device, f"torch fp32 on {device}")
    r = Recipe.from_dict(recipe) if recipe else None
    conf = json.loads(conf_path.read_text())
    if r is None:
        r = get_target(conf["target"])
    require_cuda(r)
    from torchao.quantization import quantize_

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, local_files_only=True).to("cuda")
    quantize_(model, torchao_config(r.torch_method, r.block_size))
    return TorchDecoder(model, "cuda", f"torch+torchao {r.torch_method} on {torch.cuda.get_device_name()}")
