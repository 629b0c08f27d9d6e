"""llama.cpp as a runtime: a GGUF file behind the ``prefill``/``step`` interface of :mod:`qops.llm.runner` (the
logits of every position, the KV cache kept between steps), and greedy generation from text as ``llama-server``
does it (llama.cpp's own tokenizer). Runs through ``llama-cpp-python`` (the llama.cpp library); imported inside."""

from __future__ import annotations

import atexit
import os
import weakref
from pathlib import Path

import numpy as np

from qops.llm.gguf import KV_TYPES, require_llama_cpp

_OPEN: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # llama-cpp-python's finalizers fail once the interpreter tears its modules down
    for llm in list(_OPEN):
        llm.close()


def open_llama(path: str | os.PathLike, threads: int | None = None, n_ctx: int = 512, kv_cache_type: str = "f16",
               logits_all: bool = True):
    """A ``llama_cpp.Llama`` on ``path``: ``threads`` (default: every core, as ONNX Runtime uses), a context of
    ``n_ctx`` tokens, the KV cache in ``kv_cache_type`` (a quantized V cache needs flash attention, so it is on
    for q8_0)."""
    llama_cpp = require_llama_cpp()
    threads = threads or os.cpu_count() or 1
    kv = KV_TYPES[kv_cache_type]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=logits_all, type_k=kv, type_v=kv,
                          flash_attn=kv_cache_type != "f16", seed=0, verbose=False)
    _OPEN.add(llm)
    return llm


class LlamaCppDecoder:
    """A GGUF model run by llama.cpp at batch 1 with its KV cache."""

    kind = "llama.cpp"

    def __init__(self, path: str | os.PathLike, info, threads: int | None = None, recipe: dict | None = None,
                 all_logits: bool = True):
        kv = (recipe or {}).get("kv_cache_type") or "f16"
        n_ctx = int(min(info.max_positions, 4096))
        self.all_logits = all_logits
        self.llm = open_llama(path, threads, n_ctx, kv, logits_all=all_logits)
        self.describe = f"llama.cpp (llama-cpp-python {_version()}), {self.llm.n_threads} thread(s), KV cache {kv}"

    def _last(self) -> np.ndarray:
        if self.all_logits:
            return np.array(self.llm.scores[self.llm.n_tokens - 1], np.float32)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()

    def prefill(self, ids) -> np.ndarray:
        """The logits of every position (of the last one only when opened with ``all_logits=False``, as a server
        computes them)."""
        ids = [int(t) for t in ids]
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], np.float32) if self.all_logits else self._last()[None]

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([int(token)])
        return self._last()


def generate_text(path: str | os.PathLike, prompt: str, new_tokens: int, kv_cache_type: str = "f16"):
    """Greedy generation of exactly ``new_tokens`` tokens from ``prompt`` (tokenized by llama.cpp, BOS as the
    file's metadata says): the decoded text and the token count."""
    llm = open_llama(path, n_ctx=512, kv_cache_type=kv_cache_type, logits_all=False)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    out: list[int] = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) >= new_tokens:
            break
    return llm.detokenize(out).decode("utf-8", errors="replace"), len(out)


def gguf_file(folder: Path) -> Path | None:
    """The one GGUF model file under ``folder`` (a downloaded MLflow model), or None."""
    files = sorted(folder.rglob("*.gguf"))
    return files[0] if len(files) == 1 else None


def _version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")
