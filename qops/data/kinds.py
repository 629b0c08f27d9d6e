"""Data kinds: how rows of a table become model feeds keyed by input name.

Every kind answers the same small protocol (the shape of ONNX Runtime's calibration reader, Optimum and
Olive): ``columns()`` — the table columns it reads; ``feeds(df, inputs, what)`` — ``{input name: array}``
for those rows, checked against the graph's inputs (names, dtypes, ranks, fixed dimensions);
``drift_features(df)`` — numeric per-row features that fit the kind, for the drift check;
``latency_feed(df, inputs)`` — one representative row for batch-1 timing; ``describe()`` — for manifests
and cards. Labels and slice columns stay in the table beside the kind's columns.

- ``tabular``: numeric feature columns → one ``[batch, n_features]`` input;
- ``tensors``: columns named like the model inputs holding per-row arrays (an ``.npz`` of named arrays,
  or parquet list columns); rows of different lengths are right-padded;
- ``text``: one text column (or two, for pairs) tokenized by a local tokenizer directory;
- ``image``: image paths preprocessed with Pillow (resize, centre crop, mean/std, NCHW or NHWC).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from qops.data.model_io import ModelInput
from qops.data.tables import require_columns
from qops.errors import DataError


def _is_int(dtype: str) -> bool:
    return np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_


def check_feed(feed: dict[str, np.ndarray], inputs: list[ModelInput], what: str, source: str = "") -> dict:
    """Check a feed against the graph: every input present and nothing else, dtype family, rank, and fixed
    dimensions. Casts to the input's dtype. Errors name the input, what the data gives and the fix."""
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    src = f" ({source})" if source else ""
    if missing:
        raise DataError(
            f"The {what}{src} gives no data for model input(s) {missing}; it gives {sorted(feed)}. The model "
            f"takes {[i.describe() for i in inputs]}.",
            "name the arrays/columns after the model's inputs, or use the data kind that produces them "
            "(text: a tokenizer that returns them).")
    if extra:
        raise DataError(
            f"The {what}{src} gives array(s) {extra} that are not inputs of the model "
            f"{[i.describe() for i in inputs]}.",
            "drop them or rename them after the model's inputs (inputs are matched by name, never by position).")
    out = {}
    for inp in inputs:
        a = np.asarray(feed[inp.name])
        if a.dtype.kind in "OUS":
            raise DataError(f"The {what}{src} gives {a.dtype} values for model input {inp.name!r}, which takes "
                            f"{inp.dtype}.", "convert the data to numbers (text needs data kind 'text').")
        if _is_int(inp.dtype) and a.dtype.kind == "f":
            if a.size and (not np.all(np.isfinite(a)) or np.any(a != np.round(a))):
                raise DataError(
                    f"Model input {inp.name!r} takes {inp.dtype} but the {what}{src} gives non-integer "
                    f"{a.dtype} values.", f"give integer values for {inp.name} (e.g. token ids).")
        if inp.shape:
            if a.ndim != len(inp.shape):
                raise DataError(
                    f"Model input {inp.name!r} takes rank {len(inp.shape)} ({inp.describe()}) but the {what}{src} "
                    f"gives shape {list(a.shape)} (rank {a.ndim}).",
                    f"give {inp.name} as [rows, {', '.join('?' if d is None else str(d) for d in inp.shape[1:])}]"
                    " per batch.")
            bad = [(k, d, a.shape[k]) for k, d in enumerate(inp.shape) if d is not None and k > 0 and a.shape[k] != d]
            if bad:
                k, d, got = bad[0]
                raise DataError(
                    f"Model input {inp.name!r} ({inp.describe()}) has dimension {k} fixed at {d} but the "
                    f"{what}{src} gives {got} (shape {list(a.shape)}).",
                    "resize/pad the data to the model's fixed dimensions, or export the model with that "
                    "dimension dynamic.")
        if a.dtype.kind == "f" and a.size and not np.all(np.isfinite(a)):
            rows = int((~np.isfinite(a.reshape(len(a), -1))).any(axis=1).sum())
            raise DataError(f"The {what}{src} has NaN/inf in model input {inp.name!r} ({rows} row(s)).",
                            "impute or drop those rows before quantizing/evaluating.")
        out[inp.name] = np.ascontiguousarray(a.astype(np.dtype(inp.dtype), copy=False))
    return out


class DataKind:
    kind = "?"

    def columns(self) -> list[str]:
        raise NotImplementedError

    def feeds(self, df: pd.DataFrame, inputs: list[ModelInput], what: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def drift_features(self, df: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError

    def drift_extra(self, sample: pd.DataFrame, reference: pd.DataFrame, max_psi: float) -> list:
        """Further drift checks over the whole set (not per row); ``ColumnCheck`` objects."""
        return []

    def latency_feed(self, df: pd.DataFrame, inputs: list[ModelInput]) -> tuple[dict, str]:
        """One representative row for batch-1 timing, and a description of its shape."""
        feed = self.feeds(df.iloc[:1], inputs, "latency row")
        return feed, ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())

    def describe(self) -> dict:
        return {"kind": self.kind}


class Tabular(DataKind):
    """Numeric feature columns, in model order, onto the model's one ``[batch, n_features]`` input."""

    kind = "tabular"

    def __init__(self, features: list[str]):
        self.features = list(features)

    def columns(self) -> list[str]:
        return list(self.features)

    def feeds(self, df, inputs, what):
        if len(inputs) != 1:
            raise DataError(
                f"The model has {len(inputs)} inputs ({[i.describe() for i in inputs]}); tabular data maps to a "
                "model with exactly one 2-D input.",
                "declare the data set's kind as 'tensors' (arrays named after the inputs) or 'text' (a tokenizer), "
                "or export the model with one [batch, n_features] input.")
        inp = inputs[0]
        features = self.features
        require_columns(df, features, what)
        if inp.width is not None and inp.width != len(features):
            raise DataError(
                f"The model input {inp.name!r} expects {inp.width} features but {len(features)} feature "
                f"columns were given for the {what}.",
                "pass the feature columns the model was trained on (data.features), in training order.")
        block = df[features]
        non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(block[c])]
        if non_numeric:
            raise DataError(f"Feature column(s) {non_numeric} of the {what} are not numeric.",
                            "encode them as numbers (the model's input is a numeric tensor).")
        x = block.to_numpy(dtype=np.dtype(inp.dtype), copy=True)
        bad = ~np.isfinite(x) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
        if bad.any():
            cols = sorted({features[j] for j in np.where(bad)[1]})
            rows = int(bad.any(axis=1).sum())
            raise DataError(f"The {what} has NaN/inf in feature column(s) {cols} ({rows} row(s)).",
                            "impute or drop those rows before quantizing/evaluating.")
        return {inp.name: x}

    def drift_features(self, df):
        return df[self.features]

    def describe(self):
        return {"kind": self.kind, "features": self.features}


def _stack(values, name: str, what: str, pad_value: float) -> np.ndarray:
    """Per-row arrays (or scalars) of one column into one array; 1-D rows of different lengths right-padded."""
    rows = [np.asarray(v) for v in values]
    if not rows:
        return np.zeros((0,))
    shapes = {r.shape for r in rows}
    if len(shapes) == 1:
        return np.stack(rows)
    if all(r.ndim == 1 for r in rows):
        n = max(len(r) for r in rows)
        dtype = np.result_type(*[r.dtype for r in rows])
        out = np.full((len(rows), n), pad_value, dtype=dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out
    raise DataError(f"The rows of {name!r} in the {what} have different shapes {sorted(shapes)[:4]}.",
                    "give every row the same shape (only 1-D rows of different lengths are padded).")


class Tensors(DataKind):
    """Columns named like the model inputs, one array (or list) per row; ``.npz`` archives read as such."""

    kind = "tensors"

    def __init__(self, inputs: list[str] | None = None, pad_value: float = 0):
        self.inputs = list(inputs or [])
        self.pad_value = pad_value

    def bind(self, inputs: list[ModelInput]) -> "Tensors":
        return Tensors([i.name for i in inputs], self.pad_value) if not self.inputs else self

    def columns(self):
        return list(self.inputs)

    def feeds(self, df, inputs, what):
        names = [i.name for i in inputs]
        missing = [n for n in names if n not in df.columns]
        if missing:
            raise DataError(
                f"The {what} has no column/array for model input(s) {missing}; it has {list(df.columns)[:30]}. "
                f"The model takes {[i.describe() for i in inputs]}.",
                "name the arrays (npz) or list columns (parquet) after the model's inputs.")
        feed = {}
        for inp in inputs:
            a = _stack(df[inp.name].to_numpy(), inp.name, what, self.pad_value)
            # flattened rows (parquet list columns) take the model's fixed trailing dimensions back
            if inp.shape and a.ndim == 2 and len(inp.shape) > 2 and all(d is not None for d in inp.shape[1:]):
                need = int(np.prod(inp.shape[1:]))
                if a.shape[1] == need:
                    a = a.reshape(len(a), *inp.shape[1:])
            feed[inp.name] = a
        return check_feed(feed, inputs, what)

    def drift_features(self, df):
        """Per input: each row's mean and spread (integer inputs such as token ids: also the non-padding
        length), so the quantile, PSI and KS checks compare the inputs' per-row distributions."""
        out = {}
        for name in self.inputs:
            if name not in df.columns:
                continue
            rows = [np.asarray(v, dtype=float).ravel() for v in df[name].to_numpy()]
            out[f"{name}.mean"] = [r.mean() if r.size else 0.0 for r in rows]
            out[f"{name}.std"] = [r.std() if r.size else 0.0 for r in rows]
            if rows and all(np.all(r == np.round(r)) for r in rows[:50]):
                out[f"{name}.nonzero"] = [float(np.count_nonzero(r != self.pad_value)) for r in rows]
        return pd.DataFrame(out, index=df.index)

    def describe(self):
        return {"kind": self.kind, "inputs": self.inputs, "pad_value": self.pad_value}


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

        from qops.calibration.drift import ColumnCheck

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


class Image(DataKind):
    """Image files (a path column, relative to ``root``) preprocessed like torchvision's eval transform."""

    kind = "image"

    def __init__(self, path_column: str = "path", root: str | None = None, resize: int | None = 256,
                 crop: int | None = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 layout: str = "NCHW", input: str | None = None, scale: float = 1 / 255):
        if layout not in ("NCHW", "NHWC"):
            raise DataError(f"data.image.layout {layout!r} is not NCHW or NHWC.", "use NCHW (PyTorch) or NHWC.")
        self.path_column, self.root = path_column, root
        self.resize, self.crop, self.layout, self.input, self.scale = resize, crop, layout, input, scale
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def columns(self):
        return [self.path_column]

    def _path(self, p) -> Path:
        path = Path(str(p))
        return path if path.is_absolute() or not self.root else Path(self.root) / path

    def _load(self, p):
        from PIL import Image as PILImage, UnidentifiedImageError

        path = self._path(p)
        try:
            with PILImage.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"Image {path} does not exist.", f"fix the paths in column {self.path_column!r} "
                            "(relative paths are read from data.image.root).") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"Image {path} cannot be read: {e}", "remove or replace the file.") from None

    def _pixels(self, im) -> np.ndarray:
        from PIL import Image as PILImage

        if self.resize:
            w, h = im.size
            s = self.resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), PILImage.BILINEAR)
        if self.crop:
            w, h = im.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            im = im.crop((left, top, left + self.crop, top + self.crop))
        x = (np.asarray(im, dtype=np.float32) * self.scale - self.mean) / self.std  # HWC
        return x if self.layout == "NHWC" else x.transpose(2, 0, 1)

    def feeds(self, df, inputs, what):
        require_columns(df, [self.path_column], what)
        name = self.input or (inputs[0].name if len(inputs) == 1 else None)
        if name is None:
            raise DataError(f"The model has {len(inputs)} inputs {[i.describe() for i in inputs]}; image data fills "
                            "one.", "name it with data.image.input, or use kind 'tensors'.")
        x = np.stack([self._pixels(self._load(p)) for p in df[self.path_column]]) if len(df) else np.zeros((0,))
        return check_feed({name: x}, inputs, what, f"images from column {self.path_column!r}")

    def drift_features(self, df):
        rows = []
        for p in df[self.path_column]:
            im = self._load(p)
            a = np.asarray(im, dtype=np.float32) / 255.0
            m, s = a.reshape(-1, 3).mean(0), a.reshape(-1, 3).std(0)
            rows.append({"image.mean_r": m[0], "image.mean_g": m[1], "image.mean_b": m[2], "image.std_r": s[0],
                         "image.std_g": s[1], "image.std_b": s[2],
                         "image.brightness": float(0.299 * m[0] + 0.587 * m[1] + 0.114 * m[2]),
                         "image.width": float(im.size[0]), "image.height": float(im.size[1])})
        return pd.DataFrame(rows, index=df.index)

    def describe(self):
        return {"kind": self.kind, "path_column": self.path_column, "root": self.root, "resize": self.resize,
                "crop": self.crop, "mean": self.mean.tolist(), "std": self.std.tolist(), "layout": self.layout,
                "input": self.input}


def kind_from_spec(data, inputs: list[ModelInput] | None = None, meta: dict | None = None) -> DataKind:
    """The data kind a spec's ``data`` block declares (``data.kind``), bound to the model's inputs."""
    k = getattr(data, "kind", "tabular")
    if k == "text":
        t = data.text
        return Text(t.columns, t.tokenizer, t.max_length, t.truncation, t.padding, t.latency_length)
    if k == "image":
        i = data.image
        return Image(i.path_column, i.root, i.resize, i.crop, i.mean, i.std, i.layout, i.input)
    if k == "tensors":
        return Tensors(pad_value=data.tensors.pad_value if data.tensors else 0).bind(inputs or [])
    return Tabular(features_for(data.features, meta, inputs))


def features_for(features: list[str] | None, meta: dict | None, inputs=None) -> list[str]:
    if features:
        return list(features)
    cols = (meta or {}).get("qops.feature_columns")
    if not cols:
        hint = ""
        if inputs and (len(inputs) > 1 or any(_is_int(i.dtype) for i in inputs)):
            hint = (f" The model takes {[i.describe() for i in inputs]}: named inputs need data.kind tensors, "
                    "text or image.")
        raise DataError(
            "No feature columns given and the model carries no 'qops.feature_columns' metadata." + hint,
            "list the model's feature columns under data.features in the spec (or --features), or declare "
            "data.kind.")
    return [c for c in cols.split(",") if c]


def infer_kind(path_or_df, inputs: list[ModelInput], meta: dict) -> DataKind:
    """The kind of a bare table given on the command line (``.npz`` files are handled by
    :func:`qops.data.data_kind`): columns named after every model input → tensors; otherwise tabular from the
    model's metadata."""
    cols = None
    if isinstance(path_or_df, pd.DataFrame):
        cols = set(path_or_df.columns)
    elif isinstance(path_or_df, (str, os.PathLike)) and str(path_or_df).lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            cols = set(pq.read_schema(str(path_or_df)).names)
        except Exception:
            cols = None
    if cols is not None and inputs and all(i.name in cols for i in inputs) and not meta.get("qops.feature_columns"):
        return Tensors([i.name for i in inputs])
    return Tabular(features_for(None, meta, inputs))
