"""Engines for decoder LLMs (recipes with ``model_kind: causal_lm``), all reading a Hugging Face checkpoint folder:

- ``ort_genai``: ONNX Runtime INT4 / NF4 / W8A8 on the FP32 ONNX export (ONNX Runtime GenAI's builder, made only
  when such a target needs it); artifact: a folder with ``model.onnx`` and the GenAI files;
- ``llama_cpp``: GGUF by llama.cpp's converter and quantizer; artifact: one ``.gguf`` file;
- ``compressed_tensors``: checkpoints for vLLM / SGLang; ``bitsandbytes``: the guide's NF4 / LLM.int8() folders;
  ``torchao_hf``: torchao's GPU configs applied at load; artifact: a Transformers folder each.

Each returns a :class:`~qops.quantize.result.QuantizeResult` built the same way (:func:`llm_result`)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qops.artifacts import atomic_dir
from qops.engines.base import HF_FOLDER, Engine, register_engine
from qops.errors import QopsError
from qops.llm.bnb import quantize_bnb_llm
from qops.llm.ct import quantize_ct_llm
from qops.llm.data import WindowReader
from qops.llm.gguf import F32_NAME, quantize_gguf_llm
from qops.llm.quantize import gptq_checkpoint, quantize_onnx_llm, quantize_torch_llm
from qops.llm.sensitivity import read_overrides
from qops.llm.source import LlmInfo, export_onnx
from qops.quantize.result import QuantizeResult


@dataclass
class LlmInputs:
    """What a decoder engine reads: the checkpoint folder, what it is, a work folder shared by the targets of a run
    (the FP32 ONNX export and FP32 GGUF are made there once), and the calibration windows."""

    hf_dir: Path
    info: LlmInfo
    work_dir: Path
    windows: list | None = None
    calibration_path: str | None = None
    calibration_rows: int = 0
    export: dict | None = None  # the FP32 ONNX export (made on first use)
    reference_is_checkpoint: bool = False  # compare every artifact with the checkpoint (the CLI: no export kept)

    def onnx_export(self) -> dict:
        if self.export is None:
            self.export = export_onnx(self.hf_dir, self.work_dir / "fp32")
        return self.export


class LlmEngine(Engine):
    inputs = (HF_FOLDER,)
    model_kind = "causal_lm"
    engines: tuple[str, ...] = ()

    @classmethod
    def accepts(cls, recipe) -> bool:
        return recipe.model_kind == "causal_lm" and recipe.engine in cls.engines

    def reference(self, inputs: LlmInputs) -> Path:
        """The FP32 model the artifact is compared with: the checkpoint folder (PyTorch evaluates it)."""
        return inputs.hf_dir

    def quantize(self, model: Path, recipe, output: Path, inputs: LlmInputs | None = None, **_) -> QuantizeResult:
        t0 = time.perf_counter()
        if recipe.needs_calibration and not inputs.windows:
            raise QopsError(f"Target {recipe.target!r} needs calibration windows ({recipe.calibration_use}).",
                            "pass --calibration FILE (a parquet/CSV text column), or run the calibrate stage first.")
        technique = self.write(recipe, output, inputs)
        return llm_result(self, recipe, self.model_file(output), self.reference(inputs), inputs, technique,
                          time.perf_counter() - t0)

    def write(self, recipe, output: Path, inputs: LlmInputs) -> dict:
        raise NotImplementedError

    def notes(self, recipe, technique: dict) -> list[str]:
        return [f"lm_head: {technique.get('lm_head')}; embeddings: {technique.get('embeddings')}"]


@register_engine
class OrtGenaiEngine(LlmEngine):
    name = "ort_genai"
    library = "ONNX Runtime (GenAI folder)"
    artifact = "folder"
    primary = "model.onnx"
    flavor = "onnx"
    engines = ("onnxruntime",)

    def reference(self, inputs: LlmInputs) -> Path:
        return inputs.hf_dir if inputs.reference_is_checkpoint else Path(inputs.onnx_export()["path"])

    def write(self, recipe, output: Path, inputs: LlmInputs) -> dict:
        if recipe.algorithm == "gptq" and recipe.precision == "int4":
            return self.write_gptq(recipe, output, inputs)
        src = inputs.onnx_export()["path"]
        reader = WindowReader(inputs.windows, inputs.info) if inputs.windows is not None else None
        with atomic_dir(output) as tmp:  # the folder (model.onnx and the GenAI files) appears whole or not at all
            return quantize_onnx_llm(src, recipe, self.model_file(tmp), reader)

    def write_gptq(self, recipe, output: Path, inputs: LlmInputs) -> dict:
        """INT4 GPTQ: qops' sequential GPTQ on the checkpoint (on ONNX Runtime's grid), exported, then written by
        ONNX Runtime's round-to-nearest, which reproduces GPTQ's integers; the intermediate folders are removed."""
        work = inputs.work_dir / "gptq" / recipe.target
        try:
            ck = gptq_checkpoint(inputs.hf_dir, inputs.windows, recipe.block_size, work / "hf",
                                 symmetric=recipe.symmetric_weights, act_order=recipe.act_order,
                                 clip_search=recipe.clip_search,
                                 overrides=read_overrides(recipe.tensor_overrides) if recipe.tensor_overrides else None)
            ex = export_onnx(ck["hf_dir"], work / "onnx")
            rtn = recipe.with_options(algorithm="rtn", block_size=ck["group"])
            with atomic_dir(output) as tmp:
                technique = quantize_onnx_llm(ex["path"], rtn, self.model_file(tmp), None, on_grid=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {**technique, "algorithm": "gptq", "block_size": ck["group"], "calibration_windows": ck["windows"],
                "gptq": ck}

    def notes(self, recipe, technique: dict) -> list[str]:
        out = super().notes(recipe, technique)
        if technique.get("eight_bit_layers"):
            out.append(f"mixed INT4/INT8: {', '.join(technique['eight_bit_layers'])} kept 8-bit "
                       f"({technique['eight_bit_nodes']} MatMuls) by the tensor-override file "
                       f"{recipe.tensor_overrides} (`qops sensitivity`: the costliest layers by KL)")
        if recipe.precision == "nf4":
            out.append("NF4 as ONNX MatMulBnb4 keeps one FP32 absmax per block of 64 (0.5 bit per weight); "
                       "bitsandbytes' double quantization (8-bit absmax, 0.127 bit) has no ONNX form")
        return out


@register_engine
class LlamaCppEngine(LlmEngine):
    name = "llama_cpp"
    library = "llama.cpp"
    artifact = "file"
    suffix = ".gguf"
    flavor = "gguf"  # an MLflow pyfunc logged as code, the .gguf its artifact
    engines = ("llama.cpp",)

    def reference(self, inputs: LlmInputs) -> Path:
        """The run's FP32 ONNX export where the run made one (decode speed is compared with it), else the
        checkpoint."""
        if inputs.export and not inputs.reference_is_checkpoint:
            return Path(inputs.export["path"])
        return inputs.hf_dir

    def write(self, recipe, output: Path, inputs: LlmInputs) -> dict:
        return quantize_gguf_llm(inputs.hf_dir, recipe, output, inputs.work_dir / "gguf" / F32_NAME,
                                 inputs.info.num_layers, inputs.windows)

    def notes(self, recipe, technique: dict) -> list[str]:
        out = super().notes(recipe, technique)
        kv = recipe.kv_cache_type
        out.append(f"GGUF {recipe.gguf_type} written for llama.cpp by llama-cpp-python "
                   f"{technique.get('llama_cpp_python')}; tensor types: "
                   + ", ".join(f"{k} x{v}" for k, v in (technique.get("tensor_types") or {}).items()))
        if technique.get("fallback"):
            out.append(technique["fallback"])
        if technique.get("bits_per_weight"):
            out.append(f"effective bits per weight: {technique['bits_per_weight']} (scales included)")
        im = technique.get("imatrix")
        out.append(f"importance matrix: {im['entries']} weight matrices from {im['windows']} calibration windows "
                   f"({im['tokens']} tokens)" if im else "no importance matrix")
        out.append("serve: `llama-server -m model.gguf" + (f" -fa on --cache-type-k {kv} --cache-type-v {kv}"
                                                          if kv != "f16" else "") + "` (the registered model's "
                   "`gguf` artifact), or `mlflow.pyfunc.load_model(uri).predict([...])`")
        return out


class FolderEngine(LlmEngine):
    artifact = "folder"
    flavor = "transformers"


@register_engine
class CompressedTensorsEngine(FolderEngine):
    name = "compressed_tensors"
    library = "compressed-tensors"
    engines = ("compressed-tensors",)

    def write(self, recipe, output: Path, inputs: LlmInputs) -> dict:
        return quantize_ct_llm(inputs.hf_dir, recipe, output, inputs.windows)

    def notes(self, recipe, technique: dict) -> list[str]:
        group = [f"group size {technique['group_size']}"] if technique.get("group_size") else []
        fb = technique.get("activation_fallback") or {}
        if fb.get("kept"):
            group.append(f"activation fallback: {len(fb['kept'])} of {fb['sites']} input sites left unquantized "
                         f"({', '.join(fb['kept'])}): their int8 activations per token held {fb['kept_share']:.0%} of "
                         f"the summed KL ({fb['metric']}); {len(technique.get('kept_unquantized') or [])} modules in "
                         "the scheme's ignore list")
        return super().notes(recipe, technique) + group + [
            f"compressed-tensors {technique.get('compressed_tensors')} checkpoint ({technique.get('scheme')}, "
            f"format {technique.get('format')}) for vLLM / SGLang: serve with `vllm serve FOLDER` (the registered "
            "model's `model/` folder) on a vLLM whose compressed-tensors reads this version; evaluated here through "
            "Transformers' compressed-tensors integration on CPU (weights decompressed"
            + (", activation quantization emulated)" if recipe.mode == "dynamic" else ")")]


@register_engine
class BitsandbytesEngine(FolderEngine):
    name = "bitsandbytes"
    library = "bitsandbytes"
    engines = ("bitsandbytes",)

    def write(self, recipe, output: Path, inputs: LlmInputs) -> dict:
        return quantize_bnb_llm(inputs.hf_dir, recipe, output)


@register_engine
class TorchaoHfEngine(FolderEngine):
    name = "torchao_hf"
    library = "torchao (Transformers folder)"
    engines = ("torchao",)

    def write(self, recipe, output: Path, inputs: LlmInputs) -> dict:
        return quantize_torch_llm(inputs.hf_dir, recipe, output)


def llm_result(engine: LlmEngine, recipe, out: Path, ref: Path, inputs: LlmInputs, technique: dict,
               seconds: float) -> QuantizeResult:
    """The one :class:`QuantizeResult` of every decoder engine: sizes and digests from the engine (a manifest of
    file digests for folders), the reference it is compared with, the calibration it read."""
    artifact = out.parent if engine.primary else out
    size, fp32_size = engine.size(out), engine.size(ref)
    manifest = engine.manifest(artifact)
    return QuantizeResult(
        target=recipe.target, model_path=str(out), model_sha256=engine.digest(out), recipe_path="",
        source_path=str(ref), source_sha256=engine.digest(ref), size_bytes=size, source_size_bytes=fp32_size,
        size_ratio=round(size / fp32_size, 4), calibration_path=inputs.calibration_path,
        calibration_rows=inputs.calibration_rows if recipe.needs_calibration else 0, seconds=round(seconds, 3),
        recipe=recipe.to_dict(), mode=recipe.mode, graph_kind="decoder (KV cache)", engine=recipe.engine,
        engine_name=engine.name, manifest=manifest,
        model_report={"exporter": (inputs.export or {}).get("exporter")}, technique=technique,
        notes=engine.notes(recipe, technique))
