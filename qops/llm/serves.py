"""Serve before promote: load a registered decoder LLM the way its serving stack will — ONNX Runtime GenAI for the
ONNX targets (the ``model/`` and ``files/`` artifacts assembled into a GenAI folder), Transformers (with
bitsandbytes or compressed-tensors when the checkpoint says so) for the folder targets, llama.cpp for GGUF files
— and generate a fixed prompt greedily, in a fresh
Python process (what a server does on start), so a checkpoint the runtime refuses never gets an alias.

``python -m qops.llm.serves MODEL_URI`` prints one JSON line; :func:`serves_in_fresh_process` runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qops.llm.llamacpp import generate_text, gguf_file
from qops.registry import MODELS_URI, prequantized

PROMPT = "The government said on Monday that"
NEW_TOKENS = 8


def generate_genai(folder: Path, prompt: str, new_tokens: int) -> tuple[str, int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    ids = tok.encode(prompt)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done() and len(out) < new_tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return tok.decode(out), len(out)


def generate_transformers(model_uri: str, prompt: str, new_tokens: int) -> tuple[str, int]:
    import mlflow
    import torch

    c = mlflow.transformers.load_model(model_uri, return_type="components")
    model, tok = c["model"], c["tokenizer"]
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(len(new))


def run_files(model_uri: str) -> Path | None:
    """The ``files/`` artifacts of the run that registered ``models:/NAME/VERSION`` (None if it has none)."""
    import mlflow
    from mlflow import MlflowClient

    m = MODELS_URI.match(model_uri)
    if not m or not m.group("version"):
        return None
    mv = MlflowClient().get_model_version(m.group("name"), m.group("version"))
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="files"))
    except Exception:  # noqa: BLE001 - no files logged: the GenAI folder is incomplete and loading says so
        return None


def serve_check(model_uri: str, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS) -> dict:
    """Load ``model_uri`` with its serving runtime and generate ``new_tokens`` tokens greedily."""
    import mlflow
    import yaml

    t0 = time.perf_counter()
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    flavors = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    gguf = gguf_file(local) if "onnx" not in flavors and "transformers" not in flavors else None
    if "transformers" in flavors:
        quant = prequantized(local / "model")
        runtime = f"transformers+{quant}" if quant else "transformers"
        text, n = generate_transformers(model_uri, prompt, new_tokens)
    elif gguf is not None:  # what llama-server does with the file: load it, tokenize, decode greedily
        kv = (flavors.get("python_function", {}).get("config") or {}).get("kv_cache_type", "f16")
        runtime = f"llama.cpp (KV cache {kv})"
        text, n = generate_text(gguf, prompt, new_tokens, kv_cache_type=kv)
    else:
        runtime = "onnxruntime-genai"
        with tempfile.TemporaryDirectory(prefix="qops-serves-") as td:
            folder = Path(td)
            for f in local.rglob("*"):  # the ONNX graph and its external data
                if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")):
                    shutil.copy(f, folder / f.name)
            files = run_files(model_uri)  # genai_config.json and the tokenizer, logged beside the model
            for f in (files.iterdir() if files else []):
                shutil.copy(f, folder / f.name)
            text, n = generate_genai(folder, prompt, new_tokens)
    return {"passed": n == new_tokens, "runtime": runtime, "prompt": prompt, "new_tokens": n, "text": text,
            "seconds": round(time.perf_counter() - t0, 2)}


def serves_in_fresh_process(model_uri: str, timeout_s: float = 600.0) -> dict:
    """:func:`serve_check` in a new Python process; a crash, a refusal to load or a timeout is a failed check
    whose ``error`` is the process's last lines."""
    cmd = [sys.executable, "-m", "qops.llm.serves", model_uri]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"passed": False, "error": f"no answer within {timeout_s:.0f} s"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    lines = [x.strip() for x in (r.stderr or r.stdout).replace("\r", "\n").splitlines()
             if x.strip() and "it/s]" not in x and "%|" not in x]  # no progress bars
    return {"passed": False, "error": (lines[-1] if lines else f"exit code {r.returncode}")[-600:]}


if __name__ == "__main__":
    try:
        print(json.dumps(serve_check(sys.argv[1])))
    except Exception as e:  # noqa: BLE001 - the parent reads the failure from stderr
        print(f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}", file=sys.stderr)
        sys.exit(1)
