"""The ``causal_lm`` data kind: a text column tokenized by a local tokenizer and cut into fixed-length windows.

Windows follow the sliding-window perplexity of the Hugging Face guide: windows of ``seq_len`` tokens start every
``stride`` tokens, and each window scores only the tokens no earlier window scored, so every scored token sees at
least ``seq_len - stride`` tokens of context (except at the start of a row). Rows are documents; slices and
intervals count rows, never tokens (tokens of one document are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from qops.data.kinds import Text
from qops.errors import DataError


@dataclass
class Window:
    row: int
    ids: np.ndarray  # the window's tokens
    first_scored: int  # positions >= first_scored are targets (predicted from position - 1)


class CausalLM(Text):
    """Text of one column for a decoder: drift features and calibration selection as for ``text``; feeds are
    windows of token ids (the KV-cache inputs start empty)."""

    kind = "causal_lm"

    def __init__(self, column: str, tokenizer: str, seq_len: int = 128, stride: int = 64,
                 max_windows_per_row: int = 2, bos_token_id: int | None = None):
        super().__init__([column], tokenizer, max_length=seq_len)
        self.seq_len, self.stride, self.max_windows = int(seq_len), int(stride), int(max_windows_per_row)
        self.column = column
        probe = self.tok.encode("a").ids
        # prepend BOS unless the tokenizer's post-processor already does
        self.bos = bos_token_id if bos_token_id is not None and (not probe or probe[0] != bos_token_id) else None

    def tokens(self, df: pd.DataFrame, what: str) -> list[np.ndarray]:
        texts = self._texts(df, what)
        enc = self.encode(texts, truncate=False)
        out = []
        for e in enc:
            ids = ([self.bos] if self.bos is not None else []) + list(e.ids)
            out.append(np.asarray(ids, np.int64))
        return out

    def windows(self, df: pd.DataFrame, what: str, max_windows: int | None = None) -> list[Window]:
        limit = max_windows or self.max_windows
        out = []
        short = 0
        for r, ids in enumerate(self.tokens(df, what)):
            n = len(ids)
            if n < 2:
                short += 1
                continue
            prev_end, k = 0, 0
            for begin in range(0, n, self.stride):
                end = min(begin + self.seq_len, n)
                if end - begin < 2:
                    break
                out.append(Window(r, ids[begin:end], max(prev_end - begin, 1)))
                prev_end, k = end, k + 1
                if end == n or k >= limit:
                    break
        if short == len(df):
            raise DataError(f"No row of the {what} has two tokens or more: nothing to score.",
                            f"check the text column {self.column!r}.")
        return out

    def describe(self):
        return {"kind": self.kind, "column": self.column, "tokenizer": self.tokenizer_path, "seq_len": self.seq_len,
                "stride": self.stride, "max_windows_per_row": self.max_windows, "bos_prepended": self.bos is not None}


def kind_for(spec_data, hf_dir: str, info) -> CausalLM:
    return causal_lm_kind(spec_data.causal_lm, hf_dir, info)


def causal_lm_kind(c, hf_dir: str, info) -> CausalLM:
    """The data kind of a ``data.causal_lm`` section (:class:`qops.spec.data.CausalLMSpec`) for a checkpoint."""
    return CausalLM(c.column, c.tokenizer or hf_dir, c.seq_len, c.stride, c.max_windows_per_row, info.bos_token_id)


class WindowReader:
    """ONNX Runtime's calibration-reader protocol over windows: ``input_ids``, ``attention_mask`` and empty
    ``past_key_values.N.key/value`` (the graph's KV-cache inputs), batch 1."""

    def __init__(self, windows: list[Window], info):
        self.windows, self.info = windows, info
        self.rewind()

    def feed(self, w: Window) -> dict:
        ids = w.ids[None]
        f = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        empty = np.zeros((1, self.info.num_kv_heads, 0, self.info.head_dim), np.float32)
        for n in range(self.info.num_layers):
            f[f"past_key_values.{n}.key"] = empty
            f[f"past_key_values.{n}.value"] = empty
        return f

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = (self.feed(w) for w in self.windows)

    def __iter__(self):
        return (self.feed(w) for w in self.windows)

    def __len__(self):
        return len(self.windows)

    def __deepcopy__(self, memo):  # the quantizer copies its reader: the copy starts from the beginning
        return WindowReader(self.windows, self.info)
