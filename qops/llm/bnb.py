"""The guide's own workflow as a target: a Hugging Face causal LM loaded with ``BitsAndBytesConfig`` — NF4 with
double quantization (QLoRA's format) or LLM.int8() — and saved as a Transformers folder whose ``config.json``
carries the ``quantization_config``, so ``AutoModelForCausalLM.from_pretrained(folder)`` (and MLflow's transformers
flavor) reload the quantized model. Compute dtype: FP32 on CPU workers (bitsandbytes' CPU backend), BF16 with
``device: cuda``. bitsandbytes keeps ``lm_head`` and the embeddings in the compute dtype. torch, transformers and
bitsandbytes are imported inside the functions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qops.artifacts import atomic_dir
from qops.llm.torch_target import load_torch_target, require_cuda

# files of a checkpoint folder besides the weights that a reload and a tokenizer need
KEEP = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
        "merges.txt", "chat_template.jinja")


def bnb_config(recipe):
    """The ``BitsAndBytesConfig`` of a recipe: NF4 + double quantization (blocks of 64), or LLM.int8()."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if recipe.device == "cuda" else torch.float32
    if recipe.precision == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute), compute
    return BitsAndBytesConfig(load_in_8bit=True), compute


def quantize_bnb_llm(hf_dir: str | os.PathLike, recipe, out_dir: str | os.PathLike) -> dict:
    """Load ``hf_dir`` quantized by bitsandbytes and save it to ``out_dir`` (atomically, tokenizer included); the
    folder is reloaded once, so a configuration the runtime cannot load fails here, not in evaluation."""
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM

    if recipe.device == "cuda":
        require_cuda(recipe)
    config, compute = bnb_config(recipe)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), quantization_config=config, dtype=compute,
                                                     device_map=recipe.device, local_files_only=True)
        model.save_pretrained(str(tmp))
        for name in KEEP:
            if (Path(hf_dir) / name).is_file():
                shutil.copy(Path(hf_dir) / name, Path(tmp) / name)
    load_torch_target(out, recipe.to_dict())
    fmt = "NF4, double quantization, blocks of 64" if recipe.precision == "nf4" else "LLM.int8() (threshold 6.0)"
    return {"algorithm": f"bitsandbytes {fmt}", "bitsandbytes": version("bitsandbytes"),
            "serving_format": f"Transformers folder, bitsandbytes {version('bitsandbytes')} {recipe.precision} "
            f"(transformers {version('transformers')})",
            "transformers": version("transformers"), "compute_dtype": str(compute).replace("torch.", ""),
            "lm_head": f"{str(compute).replace('torch.', '')} (bitsandbytes keeps it)",
            "embeddings": str(compute).replace("torch.", ""),
            "load": "AutoModelForCausalLM.from_pretrained(folder) (quantization_config in config.json)"}
