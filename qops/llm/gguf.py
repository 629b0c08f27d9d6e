"""GGUF for llama.cpp: convert a Hugging Face causal LM with llama.cpp's own converter, compute an importance
matrix on qops' calibration windows, and quantize with llama.cpp's own quantizer (``llama_model_quantize``, what
``llama-quantize`` runs) to Q8_0, Q4_K_M or Q4_0.

- Converter: ``convert_hf_to_gguf.py`` of the llama.cpp tree vendored in the installed ``llama-cpp-python``'s
  sdist (``scripts/llama_cpp_converter.py`` installs it under ``<venv>/share/qops/llama.cpp``), run in a child
  process by :mod:`qops.llm.gguf_convert`. The FP32 GGUF it writes is kept as ``model-f32.gguf`` beside the
  target's quantized file (the imatrix and the checks read it; it is not registered).
- Importance matrix: what ``llama-imatrix`` accumulates — per weight matrix, the mean over calibration tokens of
  each input column's squared activation — collected with forward hooks on the source checkpoint's ``nn.Linear``
  layers over the calibration windows, named by gguf-py's tensor-name map (``model.layers.0.self_attn.q_proj`` →
  ``blk.0.attn_q.weight``). Memory: one running sum per input column per layer, whatever the number of windows.
- Quantizer: ``llama_cpp.llama_model_quantize`` with ``llama_model_quantize_params.imatrix`` (a null-terminated
  array of name/values), so the k-quant scale search and Q4_0 rounding weigh each column by its importance.

torch, transformers and llama_cpp are imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qops.artifacts import atomic_path
from qops.calibration.collect import SquaredMean, hooked
from qops.errors import QopsError
from qops.llm.arch import arch_for

log = logging.getLogger(__name__)

# llama.cpp's file types (enum llama_ftype in llama.h) for the formats qops writes
FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}
# KV-cache element types (enum ggml_type): what llama.cpp's --cache-type-k/-v take
KV_TYPES = {"f16": 1, "q8_0": 8}
F32_NAME = "model-f32.gguf"


def converter_dir() -> Path:
    """Where ``scripts/llama_cpp_converter.py`` installed llama.cpp's converter (``QOPS_LLAMA_CPP_DIR`` overrides)."""
    d = Path(os.environ.get("QOPS_LLAMA_CPP_DIR") or Path(sys.prefix) / "share" / "qops" / "llama.cpp")
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise QopsError(f"llama.cpp's converter (convert_hf_to_gguf.py) is not installed in {d}.",
                        "run `make install` (it runs scripts/llama_cpp_converter.py, which copies the converter "
                        "from the installed llama-cpp-python's sdist), or set QOPS_LLAMA_CPP_DIR to a llama.cpp "
                        "checkout of the same version.")
    return d


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise QopsError(f"GGUF targets need llama-cpp-python (llama.cpp's library): {e}.",
                        "install qops with the llm extra: pip install -c constraints.txt -e '.[llm]' (it builds "
                        "llama.cpp from the sdist; see docs/llm.md#gguf).") from None
    return llama_cpp


def convert_hf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, timeout_s: float = 3600) -> dict:
    """``convert_hf_to_gguf.py HF_DIR --outtype f32`` into ``out_path`` (atomically), in a child process."""
    d = converter_dir()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        cmd = [sys.executable, "-m", "qops.llm.gguf_convert", str(hf_dir), "--outfile", str(tmp), "--outtype", "f32"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           env={**os.environ, "QOPS_LLAMA_CPP_DIR": str(d)})
        if r.returncode != 0 or not Path(tmp).is_file():
            last = [x for x in (r.stderr or r.stdout).splitlines() if x.strip()][-3:]
            raise QopsError(f"llama.cpp's converter could not convert {hf_dir} to GGUF: {' | '.join(last)}",
                            "GGUF targets take the architectures llama.cpp's convert_hf_to_gguf.py supports "
                            "(Llama, Mistral, Qwen, Gemma, Phi, ...); use an ONNX target for others.")
    v = (d / "VERSION").read_text().strip() if (d / "VERSION").is_file() else "version not recorded"
    return {"converter": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {v})",
            "seconds": round(time.perf_counter() - t0, 1)}


def tensor_names(hf_dir: str | os.PathLike, layers: int):
    """A function from a Hugging Face linear layer's name to its GGUF tensor name (gguf-py's map for the
    architecture the converter wrote), or None for layers llama.cpp does not multiply by."""
    gguf = gguf_py()
    arch_name = gguf_architecture(Path(hf_dir))
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    names = gguf.get_tensor_name_map(arch, layers)
    return lambda hf_name: names.get_name(hf_name + ".weight", try_suffixes=(".weight",))


def gguf_architecture(hf_dir: Path) -> str:
    """llama.cpp's architecture name for the checkpoint (the architecture table's row)."""
    return arch_for(hf_dir).gguf_arch


def importance_matrix(hf_dir: str | os.PathLike, windows, layers: int, progress=None) -> dict:
    """Per GGUF weight name, the mean squared input activation of each input column over the calibration windows'
    tokens (llama-imatrix's statistic), from the FP32 checkpoint; plus the token and window counts."""
    import torch
    from transformers import AutoModelForCausalLM

    name_of = tensor_names(hf_dir, layers)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    stats: dict[str, SquaredMean] = {}
    hooks = []
    for hf_name, mod in model.named_modules():
        gg = name_of(hf_name) if isinstance(mod, torch.nn.Linear) else None
        if gg is not None:
            hooks.append((mod, stats.setdefault(gg, SquaredMean())))
    tokens = 0
    with hooked(hooks), torch.inference_mode():
        for i, w in enumerate(windows):
            model(input_ids=torch.as_tensor(np.asarray(w.ids, np.int64))[None])
            tokens += len(w.ids)
            if progress and (i + 1) % 25 == 0:
                progress(i + 1, len(windows))
    values = {k: c.result().float().numpy() for k, c in stats.items() if c.sum is not None}
    return {"values": values, "tokens": tokens, "windows": len(windows), "entries": len(values)}


def quantize_gguf(f32_path: str | os.PathLike, out_path: str | os.PathLike, gguf_type: str,
                  imatrix: dict[str, np.ndarray] | None = None, threads: int | None = None) -> dict:
    """llama.cpp's quantizer (``llama_model_quantize``) from the FP32 GGUF to ``gguf_type`` into ``out_path``
    (atomically), weighing columns by ``imatrix`` when given."""
    import ctypes

    llama_cpp = require_llama_cpp()
    if gguf_type not in FTYPES:
        raise QopsError(f"GGUF type {gguf_type!r} is not one qops writes.", f"use one of {sorted(FTYPES)}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[gguf_type]
    params.nthread = threads or os.cpu_count() or 1
    keep = []  # the ctypes buffers must outlive the call
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(v, np.float32)
            keep.append((name.encode(), buf))
            arr[i].name = keep[-1][0]
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None  # the quantizer reads up to a null name
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)  # llama.cpp's per-tensor lines are INFO
    with atomic_path(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(f32_path).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not Path(tmp).is_file():
            raise QopsError(f"llama.cpp's quantizer failed ({rc}) writing {gguf_type} from {f32_path}.",
                            "check the FP32 GGUF (it is kept beside the target's model) and the llama.cpp log.")
    return {"gguf_type": gguf_type, "imatrix_entries": len(imatrix or {}), "seconds": round(time.perf_counter() - t0, 2)}


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds (e.g. ``{"q4_K": 12, "q6_K": 3, "f32": 9}``)."""
    return type_counts(_reader(path).tensors)


def type_counts(tensors) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        k = t.tensor_type.name.lower().replace("_k", "_K")
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def quantize_gguf_llm(hf_dir: str | os.PathLike, recipe, out_path: str | os.PathLike, f32_path: str | os.PathLike,
                      layers: int, windows=None) -> dict:
    """A GGUF target: the FP32 GGUF (converted once per run: ``f32_path`` is shared by the run's GGUF targets and
    written atomically), the importance matrix on ``windows`` when the recipe uses one, then llama.cpp's quantizer."""
    from importlib.metadata import version

    f32 = Path(f32_path)
    conv = None
    if not f32.is_file():
        log.info("converting %s to GGUF (FP32) with llama.cpp's converter", hf_dir)
        conv = convert_hf(hf_dir, f32)
    imatrix = None
    if recipe.imatrix:
        if not windows:
            raise QopsError(f"Target {recipe.target!r} ({recipe.gguf_type} with an importance matrix) needs "
                            "calibration windows.", "run the calibrate stage first, or set target option "
                            "imatrix: false.")
        log.info("importance matrix on %d calibration windows", len(windows))
        imatrix = importance_matrix(hf_dir, windows, layers)
    log.info("llama.cpp quantizer: %s for %s", recipe.gguf_type, recipe.target)
    q = quantize_gguf(f32, out_path, recipe.gguf_type, imatrix["values"] if imatrix else None)
    log.info("%s written in %.2f s", recipe.gguf_type, q["seconds"])
    tensors = _reader(out_path).tensors  # one read of the written file: type counts and lm_head/embedding types
    types = type_counts(tensors)
    out_types = {t.name: t.tensor_type.name for t in tensors if t.name in ("output.weight", "token_embd.weight")}
    if "output.weight" not in out_types and "token_embd.weight" in out_types:  # tied embeddings: one matrix
        out_types["output.weight"] = f"tied to the embeddings ({out_types['token_embd.weight'].lower()})"
    technique = {"algorithm": f"llama.cpp {recipe.gguf_type}" + (" with an importance matrix" if imatrix else ""),
                 "gguf_type": recipe.gguf_type, "tensor_types": types,
                 "serving_format": f"GGUF {recipe.gguf_type} for llama.cpp (written by llama-cpp-python "
                 f"{version('llama-cpp-python')})", "llama_cpp_python": version("llama-cpp-python"),
                 "converter": (conv or {}).get("converter") or f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python "
                 f"{version('llama-cpp-python')})", "f32_gguf": str(f32), "kv_cache_type": recipe.kv_cache_type,
                 "lm_head": out_types.get("output.weight", "?").lower(),
                 "embeddings": out_types.get("token_embd.weight", "?").lower(),
                 "load": "llama-server -m model.gguf / llama_cpp.Llama(model_path=...)",
                 "bits_per_weight": bits_per_weight(tensors), **k_quant_fallback(recipe.gguf_type, tensors)}
    if imatrix:
        technique["imatrix"] = {k: imatrix[k] for k in ("tokens", "windows", "entries")} | {
            "statistic": "mean squared input activation per column (llama-imatrix's), FP32 checkpoint"}
    return technique


def bits_per_weight(tensors) -> float:
    """Effective bits per weight of the file's matrices (scales and block headers included)."""
    mats = [t for t in tensors if len(t.shape) >= 2]
    n = sum(int(t.n_elements) for t in mats)
    return round(sum(int(t.n_bytes) for t in mats) * 8 / n, 2) if n else 0.0


def k_quant_fallback(gguf_type: str, tensors) -> dict:
    """Matrices a k-quant file type could not use: llama.cpp falls back to a legacy 32-block type for rows that are
    not a multiple of the 256-wide k-quant super-block. Named with its cause for the card."""
    if "_K" not in gguf_type:
        return {}
    mats = [t for t in tensors if len(t.shape) >= 2]
    fell = [t for t in mats if "_K" not in t.tensor_type.name and t.tensor_type.name not in ("F32", "F16", "BF16")
            and int(t.shape[0]) % 256]
    if not fell:
        return {}
    types = type_counts(fell)
    rows = sorted({int(t.shape[0]) for t in fell})
    return {"fallback": f"{len(fell)} of {len(mats)} weight matrices fell back from {gguf_type}'s k-quants to "
                        + ", ".join(f"{k} x{v}" for k, v in types.items())
                        + f": their rows of {', '.join(map(str, rows))} are not a multiple of the 256-wide k-quant "
                        "super-block"}


def gguf_py():
    """llama.cpp's own ``gguf`` Python package, from the converter's tree (PyPI's lags behind it)."""
    d = converter_dir()
    if str(d / "gguf-py") not in sys.path:
        sys.path.insert(1, str(d / "gguf-py"))
    import gguf

    return gguf


def _reader(path):
    return gguf_py().GGUFReader(str(path))
