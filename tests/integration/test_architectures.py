"""Every architecture of the table (qops/llm/arch.py) on a model built from its config with random weights and a
byte-level BPE tokenizer trained here: llama.cpp's converter writes a GGUF whose logits are the PyTorch model's,
the ONNX export matches PyTorch where the table says the builder exports it (and is refused before any work where it
does not), and a compressed-tensors target runs through the same verb. Architectures whose llama.cpp converter
needs a SentencePiece tokenizer.model (Phi-3, Gemma 2) are converted by their real checkpoints only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_arch import ARCH_CONFIGS  # noqa: E402  (one set of per-architecture configs for both test files)

pytestmark = pytest.mark.integration

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i * 3}, and the model counts" for i in range(60)]
SENTENCEPIECE_VOCAB = {"phi3", "gemma2"}  # their converter classes read tokenizer.model


@pytest.fixture(scope="module")
def tokenizer():
    from qops.examples.tiny_llama import train_tokenizer

    return train_tokenizer(TEXTS, 300)


def _checkpoint(model_type, tokenizer, folder: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {**ARCH_CONFIGS[model_type], "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id}
    layers = 2
    if extra.get("sliding_window"):  # wider than the prompts: llama.cpp and Transformers count the window's edge
        extra["sliding_window"] = 64  # differently (seen with a window of 4); real windows are 512-4096 tokens
    if model_type == "gemma3_text":  # llama.cpp fixes Gemma 3's pattern (5 sliding layers, then a global one):
        extra.pop("layer_types")  # a real checkpoint's; 6 layers have both kinds
        layers = 6
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=128, **extra)
    cfg.architectures = [AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
def test_gguf_export_and_targets_per_architecture(model_type, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qops.engines import quantize
    from qops.errors import QopsError
    from qops.llm.arch import ARCHS
    from qops.llm.gguf import convert_hf
    from qops.llm.llamacpp import LlamaCppDecoder
    from qops.llm.runner import OrtDecoder
    from qops.llm.source import LlmInfo, export_onnx
    from qops.spec.data import CausalLMSpec

    arch = ARCHS[model_type]
    hf = _checkpoint(model_type, tokenizer, tmp_path / "hf")
    info = LlmInfo.from_hf(hf)
    ids = [tokenizer.bos_token_id] + tokenizer(TEXTS[5])["input_ids"][:20]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)(
            input_ids=torch.as_tensor(ids)[None]).logits[0].numpy()
    scale = float(np.abs(ref).max())
    if model_type not in SENTENCEPIECE_VOCAB:
        convert_hf(hf, tmp_path / "f32.gguf")
        got = LlamaCppDecoder(tmp_path / "f32.gguf", info).prefill(ids)
        assert float(np.abs(got - ref).max()) / scale < 3e-3  # llama.cpp keeps its KV cache in f16
    if arch.onnx_export:
        ex = export_onnx(hf, tmp_path / "onnx")  # checked against PyTorch inside (prefill + one decode step)
        got = OrtDecoder(ex["path"], info).prefill(ids)
        assert float(np.abs(got - ref).max()) / scale < 1e-3
    cal = tmp_path / "cal.parquet"
    pd.DataFrame({"text": TEXTS}).to_parquet(cal)
    res = quantize(hf, "ct_w8a8_int8", tmp_path / "ct", calibration=cal, causal_lm=CausalLMSpec(seq_len=32, stride=16))
    assert res.engine_name == "compressed_tensors" and res.size_ratio < 1
    if not arch.onnx_export:  # a pipeline with an ONNX target on this architecture stops before any work
        from qops.modality.causal_lm import CausalLmModality

        class Spec:  # the two spec fields check_arch reads
            targets = ["llm_int4_rtn"]

            @staticmethod
            def recipe(t):
                from qops.targets import get_target

                return get_target(t)

        with pytest.raises(QopsError, match="cannot be exported"):
            CausalLmModality.check_arch(Spec, hf)
