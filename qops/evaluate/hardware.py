"""Where a model is measured: the worker's CPU/GPU, whether it matches the target's hardware, file sizes, and
batch-1 latency with the compared models interleaved run by run."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from qops.evaluate.outputs import model_session
from qops.quantize.graph import model_size


def worker_hardware() -> dict:
    """The evaluating worker's CPU, recorded with every latency figure."""
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags: set[str] = set()
        for line in text.splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
        info["isa"] = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                        "amx_bf16", "fma", "asimd", "asimddp", "i8mm"})
    except OSError:
        info["isa"] = []
    return info


def hardware_match(recipe: dict | None, hw: dict) -> dict:
    """Is the worker the target's hardware? If not, latency is not the target's latency; say so."""
    if recipe is None:
        return {"matches": None, "note": "no target recipe given"}
    arch, isa = recipe.get("arch"), set(recipe.get("required_isa") or [])
    missing = sorted(isa - set(hw.get("isa", [])))
    if arch and hw.get("machine") != arch:
        return {"matches": False, "note": f"measured on a {hw.get('machine')} worker, not on the target's {arch} "
                                          "hardware: size and accuracy hold, latency does not transfer"}
    if missing:
        return {"matches": False, "note": f"worker lacks {', '.join(missing)} that the target assumes: latency "
                                          "here is not the target's"}
    return {"matches": True, "note": "measured on hardware of the target's kind"}


def file_size(path) -> int:
    if str(path).lower().endswith(".onnx"):
        return model_size(path)  # with external data
    return Path(path).stat().st_size


def measure_latency(models: list[str | os.PathLike], feed: dict[str, np.ndarray], runs: int = 300,
                    warmup: int = 30, recipe: dict | None = None, describe: list | None = None) -> list[np.ndarray]:
    """Batch-1 latency of several models, interleaved run by run in one process (one intra-op thread)
    so that clock, cache and load changes hit all models alike."""
    sessions = [model_session(m, threads=1, recipe=recipe) for m in models]
    if describe is not None:
        describe.extend(s.describe for s in sessions)
    row = {k: v[:1] for k, v in feed.items()}
    for _ in range(warmup):
        for s in sessions:
            s.run(None, row)
    times = [np.empty(runs) for _ in sessions]
    for i in range(runs):
        for j, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, row)
            times[j][i] = time.perf_counter() - t0
    return times
