"""The pipeline's stages for decoder LLMs (``data.kind: causal_lm``). :mod:`qops.pipeline` dispatches here, so the
CLI, the Airflow DAG factory, cards, gates and the registry treat an LLM pipeline like any other: same stage
names, same JSON files in the run folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qops.artifacts import read_json, sha256_file, to_jsonable, write_json_atomic

log = logging.getLogger(__name__)


def _info(source: dict):
    from qops.llm.source import LlmInfo

    return LlmInfo(**source["info"])


def _kind(spec, source: dict):
    from qops.llm.data import kind_for

    return kind_for(spec.data, source["hf_dir"], _info(source))


def check_targets(spec) -> None:
    """Every target of a causal_lm spec must be an LLM recipe, and LLM recipes only serve causal_lm specs."""
    from qops.errors import SpecError

    llm = spec.data.kind == "causal_lm"
    for t in spec.targets:
        r = spec.recipe(t)
        if llm and r.model_kind != "causal_lm":
            from qops.targets import list_targets

            ok = [n for n, x in list_targets().items() if x.model_kind == "causal_lm"]
            raise SpecError(f"Target {t!r} quantizes ONNX graphs of any kind; data.kind causal_lm takes decoder LLM "
                            "targets (KV-cache aware, lm_head and embedding choices).", f"use one of {ok}.")
        if not llm and r.model_kind == "causal_lm":
            raise SpecError(f"Target {t!r} is a decoder-LLM target but data.kind is {spec.data.kind}.",
                            "set data.kind: causal_lm (docs/llm.md), or pick a target from `qops targets`.")


def source(spec, rdir: Path, uri: str) -> dict:
    from qops.llm.source import LlmInfo, export_onnx, resolve_hf_dir

    if uri.startswith("models:/"):
        from qops.registry import configure_mlflow

        configure_mlflow(spec.mlflow.tracking_uri, spec.mlflow.registry_uri)
    src = resolve_hf_dir(uri, rdir)
    info = LlmInfo.from_hf(src["hf_dir"])
    src.update(info=info.__dict__, pt2_path=None, path=None, base_hf_dir=src["hf_dir"])
    if spec.qlora is None:  # with QLoRA the merged model is exported by the finetune stage
        ex = export_onnx(src["hf_dir"], rdir / "fp32")
        src.update(path=ex["path"], export=ex)
    write_json_atomic(rdir / "source.json", src)
    return src


def finetune(spec, rdir: Path) -> dict:
    """QLoRA on the base (NF4, double quantization), adapters merged into a full-precision copy, which then replaces
    the source for every later stage (exported to ONNX here)."""
    from qops.llm.qlora import QloraConfig, run_qlora
    from qops.llm.source import export_onnx

    src = read_json(rdir / "source.json")
    q = spec.qlora
    cfg = QloraConfig(**{k: v for k, v in q.model_dump().items() if k in QloraConfig.__dataclass_fields__})
    res = run_qlora(src["base_hf_dir"], q.data or spec.data.reference, q.column or spec.data.causal_lm.column,
                    rdir / "qlora", cfg)
    ex = export_onnx(res["merged_dir"], rdir / "fp32")
    src.update(hf_dir=res["merged_dir"], path=ex["path"], export=ex, finetune=res)
    write_json_atomic(rdir / "source.json", src)
    return {k: res[k] for k in ("merged_dir", "steps", "final_loss", "resumed_from", "seconds")}


def calibrate(spec, rdir: Path) -> dict:
    from qops.calibration import select_calibration
    from qops.calibration.select import Diversity, Recency
    from qops.calibration.sources import S3Options

    src = read_json(rdir / "source.json")
    c = spec.calibration
    res = select_calibration(
        pool=spec.data.pool, reference=spec.data.reference, output_dir=rdir / "calibration", size=c.size,
        features=_kind(spec, src), slice_columns=spec.data.slice_columns, strategy=c.strategy, seed=c.seed,
        stratify_by=c.stratify_by, drift_enabled=c.drift.enabled, quantile_tolerance=c.drift.quantile_tolerance,
        max_kl=c.drift.max_kl_divergence, on_drift=c.drift.on_drift, min_per_slice=c.min_per_slice,
        on_small_slice=c.on_small_slice, max_psi=c.drift.max_psi, min_ks_pvalue=c.drift.min_ks_pvalue,
        max_reselect=c.drift.max_reselect, reference_sample=c.reference_sample, validation=spec.data.validation,
        recency=Recency(**c.recency.model_dump()) if c.recency else None,
        diversity=Diversity(**c.diversity.model_dump()) if c.diversity else None,
        model_inputs=None, s3=S3Options(spec.storage.s3_endpoint_url, spec.storage.s3_region))
    return to_jsonable(res)


def quantize(spec, rdir: Path, tdir: Path, target: str) -> dict:
    import pandas as pd

    from qops.llm.data import WindowReader
    from qops.llm.evaluate import artifact_size
    from qops.llm.quantize import model_digest, quantize_onnx_llm, quantize_torch_llm

    src = read_json(rdir / "source.json")
    recipe = spec.recipe(target)
    t0 = time.perf_counter()
    cal_json = rdir / "calibration" / "calibration.json"
    cal_path, rows = None, 0
    if recipe.engine == "torchao":
        out = tdir / "model"
        technique = quantize_torch_llm(src["hf_dir"], recipe, out)
        ref = src["hf_dir"]
    else:
        reader = None
        if recipe.needs_calibration:
            if not cal_json.is_file():
                from qops.errors import QopsError

                raise QopsError(f"Target {target} (GPTQ) needs the calibration set: calibration.json is missing.",
                                "run the calibrate stage first (same spec and run id).")
            cal = read_json(cal_json)
            cal_path = cal["path"]
            kind = _kind(spec, src)
            windows = kind.windows(pd.read_parquet(cal_path), "calibration set", spec.data.causal_lm.calibration_windows)
            reader = WindowReader(windows, _info(src))
            rows = int(cal["rows"])
        out = tdir / "model" / "model.onnx"
        technique = quantize_onnx_llm(src["path"], recipe, out, reader)
        ref = src["path"]
    size = artifact_size(out)
    fp32_size = artifact_size(ref)
    res = {
        "target": target, "model_path": str(out), "model_sha256": model_digest(out), "recipe_path": "",
        "source_path": str(ref), "source_sha256": model_digest(ref) if Path(ref).is_dir() else sha256_file(ref),
        "size_bytes": size, "source_size_bytes": fp32_size, "size_ratio": size / fp32_size,
        "calibration_path": cal_path, "calibration_rows": rows, "seconds": round(time.perf_counter() - t0, 3),
        "recipe": recipe.to_dict(), "mode": recipe.mode, "graph_kind": "decoder (KV cache)", "engine": recipe.engine,
        "model_report": {"exporter": (src.get("export") or {}).get("exporter")}, "technique": technique,
        "notes": _notes(recipe, technique), "trials": [], "tuning": {},
    }
    write_json_atomic(tdir / "quantize.json", res)
    return res


def _notes(recipe, technique: dict) -> list[str]:
    notes = [f"lm_head: {technique.get('lm_head')}; embeddings: {technique.get('embeddings')}"]
    if recipe.precision == "nf4":
        notes.append("NF4 as ONNX MatMulBnb4 keeps one FP32 absmax per block of 64 (0.5 bit per weight); "
                     "bitsandbytes' double quantization (8-bit absmax, 0.127 bit) has no ONNX form")
    return notes


def evaluate(spec, rdir: Path, folder: Path) -> dict:
    from qops.llm.evaluate import evaluate_llm

    src = read_json(rdir / "source.json")
    q = read_json(folder / "quantize.json")
    g, c = spec.gates, spec.data.causal_lm
    res = evaluate_llm(q["source_path"], q["model_path"], spec.data.validation, _kind(spec, src), _info(src),
                       slice_columns=spec.data.slice_columns, intersections=spec.data.intersections,
                       bootstrap=g.bootstrap, confidence=g.confidence, seed=g.seed, target=q["recipe"],
                       prompt_length=c.prompt_length, new_tokens=c.new_tokens, speed_prompts=c.speed_prompts,
                       # resident memory says nothing about a CUDA model's footprint: measured for CPU targets only
                       measure_memory=q["recipe"].get("device") != "cuda")
    out = to_jsonable(res)
    write_json_atomic(folder / "evaluation.json", out)
    return out


def register_extras(spec, source: dict, q: dict) -> tuple[dict | None, list[str]]:
    """ONNX targets: the signature's example (a short prompt with the empty KV cache) and the files that make the
    registered model an ONNX Runtime GenAI folder (genai_config.json, tokenizer). torchao targets: their
    ``qops_torchao.json`` (the config serving applies at load)."""
    import numpy as np

    from qops.llm.data import Window, WindowReader
    from qops.llm.source import GENAI_FILES

    if Path(q["model_path"]).is_dir():
        return None, [str(Path(q["model_path"]) / "qops_torchao.json")]

    info = _info(source)
    window = Window(0, np.arange(1, 9, dtype=np.int64) % info.vocab_size, 1)
    example = WindowReader([window], info).feed(window)
    folder = Path(q["model_path"]).parent
    return example, [str(folder / f) for f in GENAI_FILES if (folder / f).is_file()]
