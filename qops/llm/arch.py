"""One row per decoder architecture qops quantizes: where its smoothing sites are (the norm feeding q/k/v, the norm
feeding the MLP, fused projections), whether its RMSNorm multiplies by ``1 + weight`` (Gemma), whether embeddings
are tied, its GGUF architecture name, and whether ONNX Runtime GenAI's builder exports it. SmoothQuant and AWQ folds
(:mod:`qops.llm.torch_quant`), the GGUF path and the source stage read this table; an architecture not in it is
refused with the list of those that are, instead of being folded as if it were a Llama.

Gemma 2/3 differ where it matters: their ``post_attention_layernorm`` normalises the attention *output* before the
residual add, and the MLP reads ``pre_feedforward_layernorm``; folding scales into the former changes the model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qops.errors import ModelError


@dataclass(frozen=True)
class Arch:
    model_type: str
    attn_norm: str  # the norm whose output feeds q/k/v
    attn_inputs: tuple[str, ...]  # projections reading it (under self_attn)
    mlp_norm: str  # the norm whose output feeds the MLP's input projections
    mlp_inputs: tuple[str, ...]  # projections reading it (under mlp)
    up_site: bool  # up_proj's rows may be scaled against down_proj's columns (gate and up not fused)
    v_site: bool  # v_proj's rows against o_proj's columns (separate v_proj; only without grouped-query attention)
    norm_offset: float  # RMSNorm computes x * (offset + weight)
    gguf_arch: str  # llama.cpp's architecture name for the converter's output
    # ONNX Runtime GenAI 0.18's builder exports it from a folder and the export runs in ONNX Runtime 1.31 (measured on
    # models built from configs: tests/integration/test_architectures.py)
    onnx_export: bool
    why_no_export: str = ""


_LLAMA_LIKE = dict(attn_norm="input_layernorm", attn_inputs=("q_proj", "k_proj", "v_proj"),
                   mlp_norm="post_attention_layernorm", mlp_inputs=("gate_proj", "up_proj"), up_site=True, v_site=True,
                   norm_offset=0.0, onnx_export=True)
_GEMMA = dict(attn_norm="input_layernorm", attn_inputs=("q_proj", "k_proj", "v_proj"),
              mlp_norm="pre_feedforward_layernorm", mlp_inputs=("gate_proj", "up_proj"), up_site=True, v_site=True,
              norm_offset=1.0)

ARCHS = {a.model_type: a for a in (
    Arch("llama", gguf_arch="llama", **_LLAMA_LIKE),
    Arch("mistral", gguf_arch="llama", **_LLAMA_LIKE),  # llama.cpp's converter writes Mistral as llama
    Arch("qwen2", gguf_arch="qwen2", **_LLAMA_LIKE),
    Arch("qwen3", gguf_arch="qwen3", **_LLAMA_LIKE),  # q_norm/k_norm act on q/k outputs: the input fold is exact
    Arch("phi3", attn_norm="input_layernorm", attn_inputs=("qkv_proj",), mlp_norm="post_attention_layernorm",
         mlp_inputs=("gate_up_proj",), up_site=False, v_site=False, norm_offset=0.0, gguf_arch="phi3",
         onnx_export=False, why_no_export="ONNX Runtime GenAI 0.18's builder fails on Transformers 5's Phi-3 config "
         "without long-context rope scaling (KeyError 'multi_cache')"),
    Arch("gemma2", gguf_arch="gemma2", onnx_export=False,
         why_no_export="the builder's sliding-window GroupQueryAttention refuses the empty KV cache of a first "
         "prefill in ONNX Runtime 1.31 (capacity 0 below the local window)", **_GEMMA),
    Arch("gemma3_text", gguf_arch="gemma3", onnx_export=False,
         why_no_export="ONNX Runtime GenAI 0.18's builder reads rope_parameters['rope_type'], which Transformers 5 "
         "nests per layer type for Gemma 3", **_GEMMA),
)}


def arch_of(model_type: str) -> Arch:
    if model_type not in ARCHS:
        raise ModelError(f"Decoder architecture {model_type!r} is not one qops knows how to quantize.",
                         f"use a model of a supported architecture ({', '.join(sorted(ARCHS))}); an architecture is "
                         "added as one row of qops/llm/arch.py.")
    return ARCHS[model_type]


def arch_for(hf_dir: str | os.PathLike) -> Arch:
    """The row of the checkpoint at ``hf_dir`` (its ``config.json``'s ``model_type``)."""
    return arch_of(json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type", "?"))


def arch_of_model(model) -> Arch:
    """The row of a loaded Transformers model."""
    return arch_of(getattr(model.config, "model_type", "?"))
