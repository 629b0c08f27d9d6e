"""Decoder-LLM sources: a Hugging Face causal-LM folder (local, or an MLflow ``transformers``-flavor model) and its
ONNX export with a KV cache.

The export uses ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``) on the local folder:
it needs no network, writes the graph ONNX Runtime serves LLMs with (``GroupQueryAttention`` with rotary
embeddings, ``SkipSimplifiedLayerNormalization``, inputs ``input_ids``, ``attention_mask`` and
``past_key_values.N.key/value``, outputs ``logits`` and ``present.N.key/value``) and a ``genai_config.json``, so
the exported and quantized models also run under ``onnxruntime_genai``. A ``torch.onnx`` (dynamo) export of a
``transformers`` 5 model with a ``DynamicCache`` needs a hand-written wrapper per architecture and yields plain
MatMul/Softmax attention that ONNX Runtime's LLM kernels do not fuse; the builder was chosen for that reason.
The export is checked against the PyTorch model's logits before it is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qops.artifacts import atomic_dir, write_json_atomic
from qops.errors import ModelError
from qops.llm.gguf_source import dequantize_gguf
from qops.llm.runner import OrtDecoder
from qops.registry import MODELS_URI, download_model_version, single_file_onnx

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
GENAI_FILES = ("genai_config.json",) + TOKENIZER_FILES


@dataclass
class LlmInfo:
    """What the evaluators need to know about the decoder: KV-cache layout and special tokens."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    bos_token_id: int | None
    eos_token_id: int | None
    parameters: int | None = None

    @classmethod
    def from_hf(cls, hf_dir: str | os.PathLike) -> "LlmInfo":
        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
        heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        return cls(architecture=(cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
                   num_layers=int(cfg["num_hidden_layers"]), num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads), hidden_size=int(cfg["hidden_size"]),
                   vocab_size=int(cfg["vocab_size"]), max_positions=int(cfg.get("max_position_embeddings") or 2048),
                   bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos)


def check_hf_dir(path: str | os.PathLike, what: str = "source model") -> Path:
    """A local causal-LM folder: config.json naming a *ForCausalLM architecture, safetensors weights, a tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"The {what} {p} is not a folder.", "point source_model at a Hugging Face causal-LM folder "
                         "(config.json, model.safetensors, tokenizer.json), a .gguf file, or a models:/ URI of a "
                         "transformers-flavor or GGUF model.")
    missing = [f for f in ("config.json", "tokenizer.json") if not (p / f).is_file()]
    if missing:
        raise ModelError(f"The {what} {p} has no {', '.join(missing)}.", "save the model and its tokenizer with "
                         "save_pretrained() into one folder.")
    if not list(p.glob("*.safetensors")):
        bins = [f.name for f in p.glob("*.bin")]
        raise ModelError(f"The {what} {p} has no .safetensors weights" + (f" (only pickled {bins})" if bins else "") + ".",
                         "save with save_pretrained(safe_serialization=True); qops never unpickles weight files.")
    cfg = json.loads((p / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise ModelError(f"The {what} {p} is a {archs or cfg.get('model_type')} model, not a causal LM.",
                         "data.kind causal_lm takes decoder models (LlamaForCausalLM, MistralForCausalLM, ...).")
    return p


def resolve_hf_dir(uri: str, dest: Path) -> dict:
    """``uri``: a local folder, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` of a transformers-flavor model.
    Returns the source's JSON (``hf_dir`` is a complete folder: config, weights and tokenizer)."""
    if not MODELS_URI.match(uri):
        if uri.lower().endswith(".gguf"):  # dequantized once per run into the folder every engine reads
            hf = dest / "hf_from_gguf"
            prov = dequantize_gguf(uri, hf)
            check_hf_dir(hf, f"dequantized GGUF {uri}")
            return {"uri": uri, "name": Path(uri).stem, "version": None, "run_id": None, "flavor": "gguf",
                    "hf_dir": str(hf), "provenance": prov}
        p = check_hf_dir(uri)
        return {"uri": uri, "name": p.name, "version": None, "run_id": None, "flavor": "transformers",
                "hf_dir": str(p)}
    name, mv, local, mlmodel = download_model_version(uri, dest / "source")
    flavors = mlmodel.get("flavors", {})
    ggufs = sorted(local.rglob("*.gguf"))
    if "transformers" not in flavors and ggufs:  # a GGUF registered in MLflow (qops' llama.cpp pyfunc)
        hf = dest / "hf_from_gguf"
        prov = dequantize_gguf(ggufs[0], hf)
        check_hf_dir(hf, f"dequantized GGUF of {uri}")
        return {"uri": uri, "name": name, "version": str(mv.version), "run_id": mv.run_id, "flavor": "gguf",
                "hf_dir": str(hf), "provenance": prov}
    if "transformers" not in flavors:
        raise ModelError(f"Source model {uri} (version {mv.version}) has flavors {sorted(flavors)}; data.kind "
                         "causal_lm reads transformers-flavored models and GGUF files.",
                         "log the model with mlflow.transformers.log_model, or point source_model at its folder or "
                         "its .gguf file.")
    # the flavor keeps weights and config under model/ and the tokenizer under components/tokenizer/: one folder
    hf = dest / "hf_model"
    with atomic_dir(hf) as tmp:
        for sub in ("model", "components/tokenizer"):
            if (local / sub).is_dir():
                for f in (local / sub).iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
    check_hf_dir(hf, f"source model {uri}")
    return {"uri": uri, "name": name, "version": str(mv.version), "run_id": mv.run_id, "flavor": "transformers",
            "hf_dir": str(hf)}


def export_onnx(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, check: bool = True) -> dict:
    """FP32 ONNX with a KV cache (ONNX Runtime GenAI's model builder, CPU), folded into one ``model.onnx`` beside
    ``genai_config.json`` and the tokenizer. Checked against the PyTorch model's logits on a short sequence."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_hf_dir(hf_dir)
    if (out / "export.json").is_file():
        done = json.loads((out / "export.json").read_text())
        if done.get("hf_dir") == str(hf_dir) and (out / "model.onnx").is_file():
            return done  # a retried task reuses the export
    work = out.with_name(out.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(work / "raw"),
           "-p", "fp32", "-e", "cpu", "-c", str(work / "cache"), "--extra_options", "hf_remote=false", "hf_token=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log.info("exporting %s to ONNX with a KV cache (onnxruntime-genai model builder)", hf_dir)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    except FileNotFoundError:
        raise ModelError("onnxruntime-genai is not installed.", "make install (pip install -c constraints.txt "
                         "onnxruntime-genai).") from None
    if proc.returncode != 0 or not (work / "raw" / "model.onnx").is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ModelError(f"The ONNX export of {hf_dir} failed (onnxruntime-genai model builder):\n{tail}",
                         "check that the architecture is one the builder supports (Llama, Mistral, Qwen, Phi, Gemma, "
                         "...) and that the folder loads with AutoModelForCausalLM.from_pretrained.")

    single_file_onnx(work / "raw" / "model.onnx", work / "model.onnx")
    for f in GENAI_FILES:
        src = (work / "raw" / f) if (work / "raw" / f).is_file() else hf_dir / f
        if src.is_file():
            shutil.copy2(src, work / f)
    shutil.rmtree(work / "raw")
    shutil.rmtree(work / "cache", ignore_errors=True)
    info = LlmInfo.from_hf(hf_dir)
    result = {"hf_dir": str(hf_dir), "path": str(out / "model.onnx"), "exporter": "onnxruntime-genai model builder "
              f"{_version('onnxruntime-genai')} (fp32, cpu)", "info": info.__dict__}
    if check:
        result["export_check"] = check_export(hf_dir, work / "model.onnx", info)
    write_json_atomic(work / "export.json", result)
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return result


def check_export(hf_dir: Path, onnx_path: Path, info: LlmInfo, tolerance: float = 1e-3) -> dict:
    """The export's logits against ``transformers``' on one fixed sequence (prefill and one cached decode step)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    ids = (np.arange(24, dtype=np.int64) * 37 + 5) % info.vocab_size
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[None])).logits[0].numpy()
    dec = OrtDecoder(onnx_path, info, threads=1)
    pre = dec.prefill(ids[:-1])
    step = dec.step(int(ids[-1]))
    got = np.concatenate([pre, step[None]])
    err = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    if err > tolerance * max(scale, 1.0):
        raise ModelError(f"The ONNX export of {hf_dir} differs from the PyTorch model: largest logit difference "
                         f"{err:.3g} (logits up to {scale:.3g}).", "report the architecture; the export cannot be "
                         "trusted for this model.")
    return {"max_abs_logit_difference": err, "tokens": int(len(ids)), "decode_step_checked": True}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
