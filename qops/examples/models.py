"""Benchmark and test models built offline: a BERT-style encoder from a config, and a CNN trained on the
handwritten digits that scikit-learn ships. Nothing is downloaded.

Both take one 2-D input (token ids ``[batch, seq]``; pixels ``[batch, 1024]``) so that the tabular data path
(feature columns ``tok_0..``, ``px_0..``) feeds them like any other model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qops.artifacts import atomic_path


@dataclass(frozen=True)
class BertConfig:
    """The shape of all-MiniLM-L6-v2 (22M parameters) by default."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_position: int = 512
    seq_len: int = 128
    seed: int = 0


def build_bert(cfg: BertConfig = BertConfig()):
    """A BERT-style encoder (post-LN, GELU) with BERT's initialisation; returns mean-pooled embeddings."""
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(cfg.hidden, cfg.hidden) for _ in range(3))
            self.o = nn.Linear(cfg.hidden, cfg.hidden)
            self.ln1 = nn.LayerNorm(cfg.hidden, eps=1e-12)
            self.up = nn.Linear(cfg.hidden, cfg.intermediate)
            self.down = nn.Linear(cfg.intermediate, cfg.hidden)
            self.ln2 = nn.LayerNorm(cfg.hidden, eps=1e-12)

        def forward(self, x):
            b, s, _ = x.shape
            h, d = cfg.heads, cfg.hidden // cfg.heads

            def split(t):
                return t.view(b, s, h, d).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, s, cfg.hidden)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
            self.pos = nn.Embedding(cfg.max_position, cfg.hidden)
            self.ln = nn.LayerNorm(cfg.hidden, eps=1e-12)
            self.layers = nn.ModuleList(Layer() for _ in range(cfg.layers))

        def forward(self, ids):
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.ln(self.word(ids) + self.pos(pos)[None])
            for layer in self.layers:
                x = layer(x)
            return x.mean(dim=1)

    model = Bert()
    for m in model.modules():  # BERT's initialisation: N(0, 0.02) weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model.eval()


def token_table(cfg: BertConfig, rows: int, seed: int) -> "pd.DataFrame":  # noqa: F821
    """Token id sequences as columns ``tok_0..tok_{seq-1}`` (Zipf-like ids, as in natural text)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size=(rows, cfg.seq_len)) + 999, cfg.vocab_size - 1)
    ids[:, 0] = 101  # [CLS]
    return pd.DataFrame(ids.astype(np.int64), columns=[f"tok_{i}" for i in range(cfg.seq_len)])


def export_bert_onnx(model, cfg: BertConfig, path: str | os.PathLike) -> Path:
    import onnx
    import torch

    ids = torch.zeros(1, cfg.seq_len, dtype=torch.long)
    with atomic_path(path) as tmp:
        torch.onnx.export(model, (ids,), str(tmp), input_names=["input_ids"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        m = onnx.load(str(tmp))
        e = m.metadata_props.add()
        e.key, e.value = "qops.feature_columns", ",".join(f"tok_{i}" for i in range(cfg.seq_len))
        onnx.save(m, str(tmp))
    return Path(path)


def digits_tables(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """scikit-learn's 8x8 digits upsampled to 32x32 (pixel columns ``px_0..px_1023``, label ``digit``), split
    into train / calibration pool / validation parquet files."""
    import pandas as pd
    from sklearn.datasets import load_digits

    d = load_digits()
    img = d.images.astype(np.float32) / 16.0
    img = img.repeat(4, axis=1).repeat(4, axis=2).reshape(len(img), -1)
    df = pd.DataFrame(img, columns=[f"px_{i}" for i in range(img.shape[1])])
    df["digit"] = d.target
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(df)
    parts = {"train": df.iloc[: int(0.6 * n)], "pool": df.iloc[int(0.6 * n): int(0.75 * n)],
             "validation": df.iloc[int(0.75 * n):]}
    paths = {}
    for k, part in parts.items():
        paths[k] = out / f"{k}.parquet"
        part.to_parquet(paths[k], index=False)
    paths["features"] = [f"px_{i}" for i in range(img.shape[1])]
    return paths


def train_cnn(train_path: str | os.PathLike, epochs: int = 8, seed: int = 0, width: int = 128):
    """A small VGG-style CNN (3 conv-BN-ReLU blocks) on 32x32 digits; input is the flattened image."""
    import pandas as pd
    import torch
    from torch import nn

    torch.manual_seed(seed)
    df = pd.read_parquet(train_path)
    x = torch.tensor(df[[c for c in df.columns if c.startswith("px_")]].to_numpy(np.float32))
    y = torch.tensor(df["digit"].to_numpy(np.int64))

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.body = nn.Sequential(  # BatchNorm folds into the convolutions at export
                nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(4 * w, 10)

        def forward(self, px):
            return self.head(self.body(px.reshape(-1, 1, 32, 32)).flatten(1))

    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def export_onnx_2d(model, features: list[str], path: str | os.PathLike, input_name: str = "features") -> Path:
    """Export a model with one float ``[batch, n_features]`` input (dynamic batch) and its feature metadata."""
    import onnx
    import torch

    with atomic_path(path) as tmp:
        torch.onnx.export(model, (torch.zeros(1, len(features)),), str(tmp), input_names=[input_name],
                          output_names=["logits"], dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
        m = onnx.load(str(tmp))
        e = m.metadata_props.add()
        e.key, e.value = "qops.feature_columns", ",".join(features)
        onnx.save(m, str(tmp))
    return Path(path)
