"""Decoders with a KV cache, one interface for ONNX Runtime and PyTorch: ``prefill(ids)`` returns the logits of
every position and fills the cache; ``step(token)`` feeds one token against the cache and returns its logits.

Batch 1, greedy, as an interactive server decodes. The ONNX graph is the one ONNX Runtime GenAI's model builder
writes (``past_key_values.N.key/value`` in, ``present.N.key/value`` out).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qops.errors import ModelError
from qops.llm.llamacpp import LlamaCppDecoder
from qops.llm.torch_target import load_torch_target
from qops.runtime import check_provider


class OrtDecoder:
    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike, info, threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        self.info = info
        names = {i.name: i for i in self.sess.get_inputs()}
        kv = [(f"past_key_values.{n}.key", f"past_key_values.{n}.value") for n in range(info.num_layers)]
        missing = [k for pair in kv for k in pair if k not in names] + [k for k in ("input_ids", "attention_mask")
                                                                       if k not in names]
        if missing:
            raise ModelError(f"{path} is not a decoder with a KV cache: it lacks inputs {missing[:4]} (it takes "
                             f"{sorted(names)[:6]}...).", "export the model with qops (the onnxruntime-genai "
                             "builder), which adds past_key_values.N.key/value inputs.")
        self.kv_names = kv
        self.position_ids = "position_ids" in names
        dtype = names[kv[0][0]].type
        self.kv_dtype = np.float16 if "float16" in dtype else np.float32
        self.outputs = ["logits"] + [f"present.{n}.{w}" for n in range(info.num_layers) for w in ("key", "value")]
        self.describe = f"onnxruntime {self.sess.get_providers()[0]}" + (f", {threads} thread(s)" if threads else "")
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.info.num_kv_heads, 0, self.info.head_dim), self.kv_dtype)
        self.past = {k: empty for pair in self.kv_names for k in pair}
        self.length = 0

    def _run(self, ids: np.ndarray) -> np.ndarray:
        total = self.length + len(ids)
        feed = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, total), np.int64),
                **self.past}
        if self.position_ids:
            feed["position_ids"] = np.arange(self.length, total, dtype=np.int64)[None]
        out = self.sess.run(self.outputs, feed)
        for n, (k, v) in enumerate(self.kv_names):
            self.past[k], self.past[v] = out[1 + 2 * n], out[2 + 2 * n]
        self.length = total
        return out[0][0].astype(np.float32, copy=False)

    def prefill(self, ids) -> np.ndarray:
        self.reset()
        return self._run(np.asarray(ids, np.int64))

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([token], np.int64))[-1]


def open_decoder(path: str | os.PathLike, info, threads: int | None = None, recipe: dict | None = None,
                 all_logits: bool = True):
    """The decoder of a model file or folder: ``.onnx`` through ONNX Runtime, ``.gguf`` through llama.cpp; a folder
    (a torchao, bitsandbytes or compressed-tensors checkpoint) through PyTorch on the recipe's device."""
    p = Path(path)
    if p.suffix == ".onnx":
        providers = None
        if recipe and recipe.get("execution_provider") not in (None, "CPUExecutionProvider", "CUDA", "Inductor"):
            providers = check_provider(recipe)
        return OrtDecoder(p, info, threads=threads, providers=providers)
    if p.suffix == ".gguf":
        return LlamaCppDecoder(p, info, threads=threads, recipe=recipe, all_logits=all_logits)

    return load_torch_target(p, recipe)


def generation_timing(decoders: list, prompts: list[np.ndarray], new_tokens: int, rounds: int = 2,
                      warmup: int = 1) -> list[dict]:
    """Batch-1 greedy generation with the KV cache, the decoders interleaved prompt by prompt so that clock and
    load changes hit them alike. Per decoder: time to first token (prefill of the prompt) and the per-token time
    of the following ``new_tokens`` cached decode steps (each decoder follows its own greedy tokens)."""
    import time

    ttft: list[list[float]] = [[] for _ in decoders]
    steps: list[list[float]] = [[] for _ in decoders]
    for r in range(warmup + rounds):
        for prompt in prompts:
            for j, d in enumerate(decoders):
                t0 = time.perf_counter()
                logits = d.prefill(prompt)
                t1 = time.perf_counter()
                tok = int(np.argmax(logits[-1]))
                times = []
                for _ in range(new_tokens):
                    t = time.perf_counter()
                    tok = int(np.argmax(d.step(tok)))
                    times.append(time.perf_counter() - t)
                if r >= warmup:
                    ttft[j].append(t1 - t0)
                    steps[j].extend(times)
    out = []
    for j in range(len(decoders)):
        s = np.array(steps[j])
        out.append({"ttft_ms_p50": float(np.median(ttft[j]) * 1e3), "decode_ms_per_token_p50": float(np.median(s) * 1e3),
                    "decode_ms_per_token_p90": float(np.quantile(s, 0.9) * 1e3),
                    "decode_tokens_per_s": float(len(s) / s.sum()), "decode_steps": int(len(s)),
                    "prompts": len(prompts), "rounds": rounds})
    return out
