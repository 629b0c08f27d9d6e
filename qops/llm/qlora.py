"""QLoRA, as in the guide (Dettmers et al. 2023): the base model loaded in 4-bit NF4 with double quantization
(bitsandbytes), LoRA adapters (peft) trained on the spec's training text, then merged into a full-precision copy
of the base, which the pipeline quantizes, gates, cards and registers like any source.

Resumable like the QAT stage: the adapters, the optimizer state and the step are checkpointed as safetensors +
JSON every ``checkpoint_every`` steps (never pickled); a retried task continues from the last checkpoint, and
batches are drawn from a generator seeded per step, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from qops.artifacts import atomic_dir, write_json_atomic
from qops.data.tables import read_table, require_columns
from qops.errors import DataError
from qops.llm.data import CausalLM
from qops.llm.source import LlmInfo
from qops.spec import QloraSpec

log = logging.getLogger(__name__)

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _token_stream(base_dir: Path, data, column: str, max_rows: int | None, seed: int) -> np.ndarray:
    df = read_table(data, "QLoRA training data")
    require_columns(df, [column], "QLoRA training data", data)
    if max_rows and len(df) > max_rows:
        df = df.sample(max_rows, random_state=seed)
    kind = CausalLM(column, str(base_dir), bos_token_id=LlmInfo.from_hf(base_dir).bos_token_id)
    ids = np.concatenate(kind.tokens(df, "QLoRA training data"))
    return ids


def _batch(stream: np.ndarray, step: int, cfg: QloraSpec):
    import torch

    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(stream) - cfg.seq_len - 1, size=cfg.batch_size)
    return torch.from_numpy(np.stack([stream[s:s + cfg.seq_len] for s in starts]))


def load_nf4(base_dir: Path, double_quant: bool = True):
    """The base model in NF4 (bitsandbytes; double quantization of the absmax constants), compute in FP32 on CPU
    or BF16 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=cfg, dtype=dtype,
                                                    device_map="cuda" if cuda else "cpu", local_files_only=True)
    except (ImportError, RuntimeError) as e:
        raise DataError(f"Loading {base_dir} in NF4 with bitsandbytes failed: {str(e).splitlines()[0][:200]}",
                        "install bitsandbytes (make install); on CPU its 4-bit kernels need every linear layer's "
                        "input size to be a multiple of 64.") from None


def run_qlora(base_dir: str | os.PathLike, data, column: str, out_dir: str | os.PathLike, cfg: QloraSpec) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    base_dir, out = Path(base_dir), Path(out_dir)
    merged = out / "merged"
    if (out / "result.json").is_file() and merged.is_dir():
        return json.loads((out / "result.json").read_text())  # a retried task after a finished run
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    stream = _token_stream(base_dir, data, column, cfg.max_rows, cfg.seed)
    if len(stream) < cfg.seq_len + 2:
        raise DataError(f"The QLoRA training text has {len(stream)} tokens, fewer than one window of {cfg.seq_len}.",
                        "give more training text (qlora.data) or a smaller qlora.seq_len.")
    model = prepare_model_for_kbit_training(load_nf4(base_dir, cfg.double_quant), use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=list(cfg.target_modules or LINEAR_MODULES))
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.steps // 10, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    ck = out / "checkpoint"
    start, history, spent = 0, [], 0.0
    if (ck / "state.json").is_file():
        state = json.loads((ck / "state.json").read_text())
        set_peft_model_state_dict(model, load_file(str(ck / "adapter.safetensors")))
        opt_t = load_file(str(ck / "optimizer.safetensors"))
        for i, p in enumerate(params):
            if f"{i}.exp_avg" in opt_t:
                opt.state[p] = {"step": opt_t[f"{i}.step"], "exp_avg": opt_t[f"{i}.exp_avg"],
                                "exp_avg_sq": opt_t[f"{i}.exp_avg_sq"]}
        start, history, spent = state["step"], state["history"], state["seconds"]
        import warnings

        sched.last_epoch = start - 1
        with warnings.catch_warnings():  # "scheduler stepped before optimizer": intended when resuming
            warnings.simplefilter("ignore", UserWarning)
            sched.step()  # the learning rate of step `start`, as an uninterrupted run has it
        log.info("QLoRA resumes from step %d (checkpoint %s)", start, ck)
    resumed_from = start

    def checkpoint(step: int) -> None:
        tmp = out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
                  str(tmp / "adapter.safetensors"))
        tensors = {}
        for i, p in enumerate(params):
            st = opt.state.get(p)
            if st:
                tensors.update({f"{i}.step": torch.as_tensor(st["step"]).reshape(1).float(),
                                f"{i}.exp_avg": st["exp_avg"].contiguous(), f"{i}.exp_avg_sq": st["exp_avg_sq"].contiguous()})
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json_atomic(tmp / "state.json", {"step": step, "history": history,
                                               "seconds": spent + time.perf_counter() - t0})
        shutil.rmtree(ck, ignore_errors=True)
        tmp.rename(ck)

    model.train()
    step = start
    bar = tqdm(range(start, cfg.steps), desc="qlora", unit="step", disable=None)
    for step in bar:
        x = _batch(stream, step, cfg).to(next(model.parameters()).device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append(round(float(loss.item()), 4))
        if (step + 1) % 10 == 0:
            log.info("QLoRA step %d/%d loss %.4f", step + 1, cfg.steps, float(np.mean(history[-10:])))
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
        if cfg.time_budget_s and spent + time.perf_counter() - t0 > cfg.time_budget_s:
            log.warning("QLoRA stops at step %d: time budget %.0f s spent", step + 1, cfg.time_budget_s)
            break
    steps_done = step + 1 if cfg.steps > start else start
    adapter = out / "adapter"
    with atomic_dir(adapter) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    # merge into a full-precision copy of the base (not into the NF4 weights: their rounding would be baked in)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    full = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    with atomic_dir(merged) as tmp:
        full.save_pretrained(str(tmp), safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (base_dir / f).is_file():
                shutil.copy2(base_dir / f, tmp / f)
    first = float(np.mean(history[:10])) if history else None
    last = float(np.mean(history[-10:])) if history else None
    result = {"merged_dir": str(merged), "adapter_dir": str(adapter), "base_dir": str(base_dir),
              "steps": steps_done, "resumed_from": resumed_from, "initial_loss": first, "final_loss": last,
              "trainable_parameters": int(trainable), "seconds": round(spent + time.perf_counter() - t0, 2),
              "nf4": {"quant_type": "nf4", "double_quant": cfg.double_quant, "library": "bitsandbytes"},
              "config": cfg.model_dump(exclude={"data", "column", "queue"}), "tokens": int(len(stream))}
    write_json_atomic(out / "result.json", result)
    shutil.rmtree(ck, ignore_errors=True)
    return result
