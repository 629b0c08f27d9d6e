"""``text``: one text column (or two, for pairs) tokenized by a local tokenizer directory (never downloaded)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from qops.data.kinds.base import ColumnCheck, DataKind, check_feed
from qops.data.tables import require_columns
from qops.errors import DataError

_HUB_HINT = ("qops never downloads: save the tokenizer once with tokenizer.save_pretrained(DIR) (or copy its "
             "tokenizer.json) and point data.text.tokenizer at DIR")


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """A Hugging Face ``tokenizers`` tokenizer from a local directory (``tokenizer.json``) or file; a hub name
    is an error, never a download."""
    p = Path(path).expanduser()
    if not p.exists():
        looks_hub = not str(path).startswith((".", "/", "~")) and str(path).count("/") <= 1
        raise DataError(
            f"The tokenizer {path!r} is not a local directory or file"
            + (" (it looks like a Hugging Face hub name)" if looks_hub else "") + ".", _HUB_HINT + ".")
    from tokenizers import Tokenizer

    f = p / "tokenizer.json" if p.is_dir() else p
    if f.is_file():
        try:
            return Tokenizer.from_file(str(f))
        except Exception as e:
            raise DataError(f"The tokenizer file {f} cannot be read: {e}", "save it again with "
                            "tokenizer.save_pretrained(DIR).") from None
    try:  # slow (vocab.txt / sentencepiece) tokenizers: transformers converts them, from the path only
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        return tok.backend_tokenizer
    except Exception as e:
        raise DataError(f"The tokenizer directory {p} has no tokenizer.json and transformers could not load it "
                        f"locally: {str(e)[:300]}", _HUB_HINT + ".") from None


class Text(DataKind):
    """Text column(s) tokenized by a local tokenizer; outputs (``input_ids``, ``attention_mask``,
    ``token_type_ids``) matched to the model's inputs by name."""

    kind = "text"
    _PRODUCED = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, columns: list[str], tokenizer: str, max_length: int = 128, truncation: bool = True,
                 padding: str = "longest", latency_length: int | None = None):
        if not 1 <= len(columns) <= 2:
            raise DataError(f"data.text.columns has {len(columns)} columns.", "give one text column, or two for "
                            "sentence pairs.")
        if padding not in ("longest", "max_length"):
            raise DataError(f"data.text.padding {padding!r} is not longest or max_length.",
                            "use padding: longest (per batch) or max_length.")
        self.text_columns, self.tokenizer_path = list(columns), str(tokenizer)
        self.max_length, self.truncation, self.padding = int(max_length), bool(truncation), padding
        self.latency_length = latency_length
        self.tok = load_tokenizer(self.tokenizer_path)
        self.pad_id = self._pad_id()
        self.unk_id = self._special("unk_token", ("[UNK]", "<unk>"))

    def _special(self, key: str, candidates) -> int | None:
        cfg = Path(self.tokenizer_path) / "tokenizer_config.json"
        names = list(candidates)
        if cfg.is_file():
            try:
                v = json.loads(cfg.read_text()).get(key)
                v = v.get("content") if isinstance(v, dict) else v
                if v:
                    names.insert(0, v)
            except ValueError:
                pass
        for n in names:
            i = self.tok.token_to_id(n)
            if i is not None:
                return int(i)
        return None

    def _pad_id(self) -> int:
        pad = self.tok.padding
        if pad and pad.get("pad_id") is not None:
            return int(pad["pad_id"])
        found = self._special("pad_token", ("[PAD]", "<pad>"))
        return 0 if found is None else found

    def columns(self):
        return list(self.text_columns)

    def _texts(self, df, what):
        require_columns(df, self.text_columns, what)
        cols = [df[c] for c in self.text_columns]
        for c, s in zip(self.text_columns, cols):
            if s.isna().any():
                raise DataError(f"The {what}'s text column {c!r} has {int(s.isna().sum())} missing value(s).",
                                "drop those rows or fill them with an empty string.")
        if len(cols) == 1:
            return [str(t) for t in cols[0]]
        return [(str(a), str(b)) for a, b in zip(*cols)]

    def encode(self, texts, truncate: bool = True):
        tok = self.tok
        if truncate and self.truncation:
            tok.enable_truncation(self.max_length)
        else:
            tok.no_truncation()
        tok.no_padding()
        return tok.encode_batch(texts)

    def _arrays(self, encodings, length: int | None = None) -> dict[str, np.ndarray]:
        n = length or (self.max_length if self.padding == "max_length" else max((len(e.ids) for e in encodings),
                                                                                default=1))
        ids = np.full((len(encodings), n), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for j, e in enumerate(encodings):
            k = min(len(e.ids), n)
            ids[j, :k], mask[j, :k], types[j, :k] = e.ids[:k], e.attention_mask[:k], e.type_ids[:k]
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def _map(self, arrays, inputs, what):
        unknown = [i.name for i in inputs if i.name not in arrays]
        if unknown:
            raise DataError(
                f"Model input(s) {unknown} are not produced by a tokenizer (it gives {list(self._PRODUCED)}); "
                f"the model takes {[i.describe() for i in inputs]}.",
                "export the model with the tokenizer's input names, or use data kind 'tensors' with arrays "
                "named after every input.")
        return check_feed({i.name: arrays[i.name] for i in inputs}, inputs, what, f"tokenized by {self.tokenizer_path}")

    def encode_arrays(self, texts) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` and ``token_type_ids`` for a list of texts (or pairs), padded."""
        return self._arrays(self.encode(list(texts)))

    def feeds(self, df, inputs, what):
        return self._map(self.encode_arrays(self._texts(df, what)), inputs, what)

    def lengths(self, df, what="data") -> np.ndarray:
        """Tokens per row, before truncation."""
        return np.array([len(e.ids) for e in self.encode(self._texts(df, what), truncate=False)], dtype=float)

    def drift_features(self, df):
        enc = self.encode(self._texts(df, "drift sample"), truncate=False)
        lengths = np.array([len(e.ids) for e in enc], dtype=float)
        unk = np.array([(np.asarray(e.ids) == self.unk_id).mean() if (self.unk_id is not None and e.ids) else 0.0
                        for e in enc])
        return pd.DataFrame({"text.token_length": lengths, "text.unknown_token_rate": unk}, index=df.index)

    def token_counts(self, df) -> dict[int, int]:
        counts: dict[int, int] = {}
        for e in self.encode(self._texts(df, "drift sample")):
            for t in e.ids:
                counts[t] = counts.get(t, 0) + 1
        return counts

    def drift_extra(self, sample, reference, max_psi):
        """Token-frequency PSI: the reference's 50 most frequent tokens plus 'other', sample vs reference.
        Tokens within a row are not independent, so the noise bound counts rows, not tokens."""
        from scipy.stats import chi2

        ref, smp = self.token_counts(reference), self.token_counts(sample)
        top = [t for t, _ in sorted(ref.items(), key=lambda kv: -kv[1])[:50]]
        def dist(c):
            v = np.array([c.get(t, 0) for t in top] + [sum(c.values()) - sum(c.get(t, 0) for t in top)], float)
            return (v + 0.5) / (v.sum() + 0.5 * len(v))
        r, s = dist(ref), dist(smp)
        p = float(np.sum((s - r) * np.log(s / r)))
        bound = max(max_psi, float(chi2.ppf(0.999, len(top))) * (1 / max(len(reference), 1) + 1 / max(len(sample), 1)))
        return [ColumnCheck("text.token_frequency", "numeric", "token_frequency_psi (top 50 tokens + other)",
                            p <= bound, round(p, 5), {"max": round(bound, 5)})]

    def latency_feed(self, df, inputs):
        """The row of median token length (truncated as in serving); with ``latency_length`` that row is cut or
        padded to exactly that many tokens."""
        texts = self._texts(df, "validation set")
        enc = self.encode(texts)
        lengths = np.array([len(e.ids) for e in enc])
        i = int(np.argsort(lengths, kind="stable")[len(lengths) // 2])
        if self.latency_length:
            full = self.encode([texts[i]], truncate=False)[0]
            arrays = self._arrays([full], self.latency_length)
            if len(full.ids) < self.latency_length:
                arrays["attention_mask"][0, len(full.ids):] = 1  # a row of that length, not padding
                arrays["input_ids"][0, len(full.ids):] = full.ids[-1] if full.ids else self.pad_id
            desc = f"sequence length {self.latency_length} (data.text.latency_length)"
        else:
            arrays = self._arrays([enc[i]])
            desc = f"sequence length {len(enc[i].ids)} (the validation rows' median)"
        return self._map(arrays, inputs, "latency row"), desc

    def describe(self):
        return {"kind": self.kind, "columns": self.text_columns, "tokenizer": self.tokenizer_path,
                "max_length": self.max_length, "truncation": self.truncation, "padding": self.padding,
                "latency_length": self.latency_length}
