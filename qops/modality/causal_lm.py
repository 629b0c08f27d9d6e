"""Decoder LLMs (``data.kind: causal_lm``): a Hugging Face folder as the source (exported to ONNX with its KV
cache, or fine-tuned by QLoRA first), calibration windows of token ids, INT4/NF4 ONNX or torchao targets, perplexity
and generation speed as the evaluation, ONNX Runtime GenAI files registered beside the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qops.artifacts import read_json, to_jsonable, write_json_atomic
from qops.engines import LlmInputs, engine_for, engine_of_result
from qops.engines.llm_tune import tune_llm
from qops.errors import QopsError
from qops.llm.arch import arch_for
from qops.llm.data import Window, WindowReader, kind_for
from qops.llm.evaluate import evaluate_llm
from qops.llm.qlora import run_qlora
from qops.llm.serves import serves_in_fresh_process
from qops.llm.source import GENAI_FILES, LlmInfo, export_onnx, resolve_hf_dir
from qops.modality.base import registry_for, unsupported
from qops.run_folder import ModelFolder, RunLayout


def info(source: dict) -> LlmInfo:
    return LlmInfo(**source["info"])


def needs_onnx(spec) -> bool:
    """Whether a target of the spec quantizes the FP32 ONNX export (the ONNX Runtime GenAI engine)."""
    return any(engine_for(spec.recipe(t)).name == "ort_genai" for t in spec.targets)


def kind(spec, source: dict):
    return kind_for(spec.data, source["hf_dir"], info(source))


class CausalLmModality:
    name = "causal_lm"

    def source(self, spec, layout: RunLayout, uri: str) -> dict:
        """The checkpoint folder (a GGUF dequantized into one), its architecture row, and the FP32 ONNX export,
        made only when an ONNX Runtime target needs it (GGUF, compressed-tensors and bitsandbytes targets read the
        folder, and their reference is the PyTorch model itself)."""
        registry_for(spec, uri)
        src = resolve_hf_dir(uri, layout.root)
        arch = self.check_arch(spec, src["hf_dir"])
        src.update(info=LlmInfo.from_hf(src["hf_dir"]).__dict__, pt2_path=None, path=None,
                   base_hf_dir=src["hf_dir"], arch=arch.model_type)
        if spec.qlora is None and needs_onnx(spec):  # with QLoRA the merged model is exported by the finetune stage
            ex = export_onnx(src["hf_dir"], layout.fp32_export)
            src.update(path=ex["path"], export=ex)
        write_json_atomic(layout.source, src)
        return src

    @staticmethod
    def check_arch(spec, hf_dir):
        """The architecture's row (an unknown one is refused, naming those qops knows); ONNX targets on an
        architecture the exporter cannot take are refused before any work."""
        arch = arch_for(hf_dir)
        if needs_onnx(spec) and not arch.onnx_export:
            onnx_targets = [t for t in spec.targets if engine_for(spec.recipe(t)).name == "ort_genai"]
            raise QopsError(f"Targets {onnx_targets} need the model as ONNX, and {arch.model_type} cannot be "
                            f"exported: {arch.why_no_export}.", "use GGUF, compressed-tensors or bitsandbytes "
                            "targets for this model (gguf_*, ct_*, hf_bnb_*).")
        return arch

    def finetune(self, spec, layout: RunLayout) -> dict:
        """QLoRA on the base (NF4, double quantization), adapters merged into a full-precision copy, which then
        replaces the source for every later stage (exported to ONNX here when an ONNX target needs it)."""
        src = read_json(layout.source)
        q = spec.qlora
        res = run_qlora(src["base_hf_dir"], q.data or spec.data.reference, q.column or spec.data.causal_lm.column,
                        layout.qlora, q)
        src.update(hf_dir=res["merged_dir"], finetune=res)
        if needs_onnx(spec):
            ex = export_onnx(res["merged_dir"], layout.fp32_export)
            src.update(path=ex["path"], export=ex)
        write_json_atomic(layout.source, src)
        return {k: res[k] for k in ("merged_dir", "steps", "final_loss", "resumed_from", "seconds")}

    def calibration_kind(self, spec, source: dict):
        if spec.qlora is not None and not source.get("finetune"):
            raise QopsError("The source model has not been fine-tuned yet: the spec fine-tunes it first (qlora).",
                            "run the finetune stage first (same spec and run id).")
        return kind(spec, source), None

    def quantize(self, spec, layout: RunLayout, target: str, calibration: dict | None):
        """The target's engine (qops.engines) on the run's checkpoint: the same verb as ``qops quantize``, with the
        run's FP32 ONNX export and FP32 GGUF shared by its targets."""
        src = read_json(layout.source)
        recipe = spec.recipe(target)
        engine = engine_for(recipe)
        inputs = LlmInputs(hf_dir=Path(src["hf_dir"]), info=info(src), work_dir=layout.root, export=src.get("export"))
        t = spec.tuning
        tuned = t.enabled and (t.targets is None or target in t.targets)
        if calibration is not None and (engine.needs_calibration(recipe) or tuned):
            inputs.windows = kind(spec, src).windows(pd.read_parquet(calibration["path"]), "calibration set",
                                                     spec.data.causal_lm.calibration_windows)
            inputs.calibration_path, inputs.calibration_rows = calibration["path"], int(calibration["rows"])
        output = layout.target(target).llm_model(engine.artifact == "file")
        if tuned:
            return tune_llm(engine, Path(src["hf_dir"]), recipe, output, inputs, t, spec.gates, seed=spec.gates.seed)
        return engine.quantize(Path(src["hf_dir"]), recipe, output, inputs=inputs)

    def evaluate(self, spec, layout: RunLayout, folder: ModelFolder, quantized: dict) -> dict:
        src = read_json(layout.source)
        g, c = spec.gates, spec.data.causal_lm
        res = evaluate_llm(quantized["source_path"], quantized["model_path"], spec.data.validation, kind(spec, src),
                           info(src), slice_columns=spec.data.slice_columns, intersections=spec.data.intersections,
                           bootstrap=g.bootstrap, confidence=g.confidence, seed=g.seed, target=quantized["recipe"],
                           prompt_length=c.prompt_length, new_tokens=c.new_tokens, speed_prompts=c.speed_prompts,
                           # resident memory says nothing about a CUDA model's footprint: measured for CPU targets
                           measure_memory=quantized["recipe"].get("device") != "cuda")
        return to_jsonable(res)

    def qat(self, spec, layout: RunLayout, target: str, folder: ModelFolder, why: str) -> dict:
        unsupported("decoder-LLM", "QAT", "fine-tune causal LMs with the qlora block (docs/llm.md#qlora).")

    def register_extras(self, spec, layout, source: dict, quantized: dict) -> tuple[dict | None, list[str]]:
        """ONNX targets: the signature's example (a short prompt with the empty KV cache) and the files that make
        the registered model an ONNX Runtime GenAI folder (genai_config.json, tokenizer). torchao targets: their
        ``qops_torchao.json`` (the config serving applies at load); bitsandbytes targets: nothing (their
        ``quantization_config`` is in the logged model's config)."""
        engine = engine_of_result(quantized)
        if engine.artifact == "file":  # GGUF: one file holds weights, tokenizer and metadata
            return None, []
        if engine.flavor == "transformers":  # the transformers flavor logs the folder's model and tokenizer
            conf = Path(quantized["model_path"]) / "qops_torchao.json"
            return None, [str(conf)] if conf.is_file() else []
        llm = info(source)
        window = Window(0, np.arange(1, 9, dtype=np.int64) % llm.vocab_size, 1)
        example = WindowReader([window], llm).feed(window)
        folder = Path(quantized["model_path"]).parent
        return example, [str(folder / f) for f in GENAI_FILES if (folder / f).is_file()]

    def serves(self, spec):
        return serves_in_fresh_process if spec.gates.serves else None
