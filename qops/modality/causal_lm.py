"""Decoder LLMs (``data.kind: causal_lm``): a Hugging Face folder as the source (exported to ONNX with its KV
cache, or fine-tuned by QLoRA first), calibration windows of token ids, INT4/NF4 ONNX or torchao targets, perplexity
and generation speed as the evaluation, ONNX Runtime GenAI files registered beside the model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from qops.artifacts import read_json, sha256_file, to_jsonable, write_json_atomic
from qops.errors import QopsError
from qops.llm.bnb import quantize_bnb_llm
from qops.llm.ct import quantize_ct_llm
from qops.llm.data import Window, WindowReader, kind_for
from qops.llm.evaluate import artifact_size, evaluate_llm
from qops.llm.gguf import F32_NAME, quantize_gguf_llm
from qops.llm.qlora import run_qlora
from qops.llm.quantize import model_digest, quantize_onnx_llm, quantize_torch_llm
from qops.llm.serves import serves_in_fresh_process
from qops.llm.source import GENAI_FILES, LlmInfo, export_onnx, resolve_hf_dir
from qops.modality.base import registry_for, unsupported
from qops.quantize import QuantizeResult
from qops.run_folder import RunLayout


def info(source: dict) -> LlmInfo:
    return LlmInfo(**source["info"])


def kind(spec, source: dict):
    return kind_for(spec.data, source["hf_dir"], info(source))


def notes(recipe, technique: dict) -> list[str]:
    out = [f"lm_head: {technique.get('lm_head')}; embeddings: {technique.get('embeddings')}"]
    if recipe.engine == "compressed-tensors":
        out.append(f"compressed-tensors {technique.get('compressed_tensors')} checkpoint ({technique.get('scheme')}, "
                   f"format {technique.get('format')}) for vLLM / SGLang: serve with `vllm serve FOLDER` (the "
                   "registered model's `model/` folder) on a vLLM whose compressed-tensors reads this version; "
                   "evaluated here through Transformers' compressed-tensors integration on "
                   "CPU (weights decompressed" + (", activation quantization emulated)" if recipe.mode == "dynamic"
                                                  else ")"))
    if recipe.engine == "llama.cpp":
        kv = recipe.kv_cache_type
        out.append(f"GGUF {recipe.gguf_type} written for llama.cpp by llama-cpp-python "
                   f"{technique.get('llama_cpp_python')}; tensor types: "
                   + ", ".join(f"{k} x{v}" for k, v in (technique.get("tensor_types") or {}).items()))
        im = technique.get("imatrix")
        out.append(f"importance matrix: {im['entries']} weight matrices from {im['windows']} calibration windows "
                   f"({im['tokens']} tokens)" if im else "no importance matrix")
        out.append("serve: `llama-server -m model.gguf" + (f" -fa on --cache-type-k {kv} --cache-type-v {kv}"
                                                          if kv != "f16" else "") + "` (the registered model's "
                   "`gguf` artifact), or `mlflow.pyfunc.load_model(uri).predict([...])`")
    if recipe.precision == "nf4" and recipe.engine == "onnxruntime":
        out.append("NF4 as ONNX MatMulBnb4 keeps one FP32 absmax per block of 64 (0.5 bit per weight); "
                   "bitsandbytes' double quantization (8-bit absmax, 0.127 bit) has no ONNX form")
    return out


class CausalLmModality:
    name = "causal_lm"

    def source(self, spec, layout: RunLayout, uri: str) -> dict:
        registry_for(spec, uri)
        src = resolve_hf_dir(uri, layout.root)
        src.update(info=LlmInfo.from_hf(src["hf_dir"]).__dict__, pt2_path=None, path=None,
                   base_hf_dir=src["hf_dir"])
        if spec.qlora is None:  # with QLoRA the merged model is exported by the finetune stage
            ex = export_onnx(src["hf_dir"], layout.root / "fp32")
            src.update(path=ex["path"], export=ex)
        write_json_atomic(layout.source, src)
        return src

    def finetune(self, spec, layout: RunLayout) -> dict:
        """QLoRA on the base (NF4, double quantization), adapters merged into a full-precision copy, which then
        replaces the source for every later stage (exported to ONNX here)."""
        src = read_json(layout.source)
        q = spec.qlora
        res = run_qlora(src["base_hf_dir"], q.data or spec.data.reference, q.column or spec.data.causal_lm.column,
                        layout.root / "qlora", q)
        ex = export_onnx(res["merged_dir"], layout.root / "fp32")
        src.update(hf_dir=res["merged_dir"], path=ex["path"], export=ex, finetune=res)
        write_json_atomic(layout.source, src)
        return {k: res[k] for k in ("merged_dir", "steps", "final_loss", "resumed_from", "seconds")}

    def calibration_kind(self, spec, source: dict):
        if not source.get("path"):
            raise QopsError("The source model has not been exported yet: the spec fine-tunes it first (qlora).",
                            "run the finetune stage first (same spec and run id).")
        return kind(spec, source), None

    def quantize(self, spec, layout: RunLayout, target: str, calibration: dict | None):
        src = read_json(layout.source)
        recipe = spec.recipe(target)
        tdir = layout.target(target)
        t0 = time.perf_counter()
        cal_path, rows = None, 0
        windows = None
        if recipe.needs_calibration:
            windows = kind(spec, src).windows(pd.read_parquet(calibration["path"]), "calibration set",
                                              spec.data.causal_lm.calibration_windows)
            cal_path, rows = calibration["path"], int(calibration["rows"])
        if recipe.engine in ("torchao", "bitsandbytes", "compressed-tensors"):  # Transformers checkpoint folders
            out = tdir / "model"
            if recipe.engine == "compressed-tensors":
                technique = quantize_ct_llm(src["hf_dir"], recipe, out, windows)
            else:
                quantize_folder = quantize_torch_llm if recipe.engine == "torchao" else quantize_bnb_llm
                technique = quantize_folder(src["hf_dir"], recipe, out)
            ref = src["hf_dir"]
        else:
            if recipe.engine == "llama.cpp":  # GGUF from the checkpoint; FP32 ONNX stays the reference
                out = tdir / "model" / "model.gguf"
                technique = quantize_gguf_llm(src["hf_dir"], recipe, out, layout.root / "gguf" / F32_NAME,
                                              info(src).num_layers, windows)
            else:
                out = tdir / "model" / "model.onnx"
                reader = WindowReader(windows, info(src)) if windows is not None else None
                technique = quantize_onnx_llm(src["path"], recipe, out, reader)
            ref = src["path"]
        size, fp32_size = artifact_size(out), artifact_size(ref)
        return QuantizeResult(
            target=target, model_path=str(out), model_sha256=model_digest(out), recipe_path="", source_path=str(ref),
            source_sha256=model_digest(ref) if Path(ref).is_dir() else sha256_file(ref), size_bytes=size,
            source_size_bytes=fp32_size, size_ratio=round(size / fp32_size, 4), calibration_path=cal_path,
            calibration_rows=rows, seconds=round(time.perf_counter() - t0, 3), recipe=recipe.to_dict(),
            mode=recipe.mode, graph_kind="decoder (KV cache)", engine=recipe.engine,
            model_report={"exporter": (src.get("export") or {}).get("exporter")}, technique=technique,
            notes=notes(recipe, technique))

    def evaluate(self, spec, layout: RunLayout, folder: Path, quantized: dict) -> dict:
        src = read_json(layout.source)
        g, c = spec.gates, spec.data.causal_lm
        res = evaluate_llm(quantized["source_path"], quantized["model_path"], spec.data.validation, kind(spec, src),
                           info(src), slice_columns=spec.data.slice_columns, intersections=spec.data.intersections,
                           bootstrap=g.bootstrap, confidence=g.confidence, seed=g.seed, target=quantized["recipe"],
                           prompt_length=c.prompt_length, new_tokens=c.new_tokens, speed_prompts=c.speed_prompts,
                           # resident memory says nothing about a CUDA model's footprint: measured for CPU targets
                           measure_memory=quantized["recipe"].get("device") != "cuda")
        return to_jsonable(res)

    def qat(self, spec, layout: RunLayout, target: str, folder: Path, why: str) -> dict:
        unsupported("decoder-LLM", "QAT", "fine-tune causal LMs with the qlora block (docs/llm.md#qlora).")

    def register_extras(self, spec, source: dict, quantized: dict) -> tuple[dict | None, list[str]]:
        """ONNX targets: the signature's example (a short prompt with the empty KV cache) and the files that make
        the registered model an ONNX Runtime GenAI folder (genai_config.json, tokenizer). torchao targets: their
        ``qops_torchao.json`` (the config serving applies at load); bitsandbytes targets: nothing (their
        ``quantization_config`` is in the logged model's config)."""
        if Path(quantized["model_path"]).suffix == ".gguf":  # one file: weights, tokenizer and metadata
            return None, []
        if Path(quantized["model_path"]).is_dir():  # the transformers flavor logs the folder's model and tokenizer
            conf = Path(quantized["model_path"]) / "qops_torchao.json"
            return None, [str(conf)] if conf.is_file() else []
        llm = info(source)
        window = Window(0, np.arange(1, 9, dtype=np.int64) % llm.vocab_size, 1)
        example = WindowReader([window], llm).feed(window)
        folder = Path(quantized["model_path"]).parent
        return example, [str(folder / f) for f in GENAI_FILES if (folder / f).is_file()]

    def serves(self, spec):
        return serves_in_fresh_process if spec.gates.serves else None
