"""Where a target runs: the hardware it is for, the runtime and execution provider that serve it, the device and
the worker queue its quantization job runs on. Shared by every engine (an engine's own options live in its config,
:mod:`qops.targets.configs`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Placement(BaseModel):
    """``hardware``: what the target is for, in words (the card quotes it). ``runtime`` / ``execution_provider``:
    what serves the artifact. ``device``: where quantization and evaluation run; ``queue``: the Airflow worker
    queue (``gpu`` for CUDA). ``arch`` / ``required_isa`` / ``min_compute_capability``: what the target hardware
    has, compared with the machine that measured (the card's "not on target hardware" note)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    hardware: str
    runtime: str = "onnxruntime"
    execution_provider: str = "CPUExecutionProvider"
    device: Literal["cpu", "cuda"] = "cpu"
    queue: Literal["cpu", "gpu"] = "cpu"
    arch: str | None = "x86_64"  # platform.machine() of the target hardware; None: any
    required_isa: tuple[str, ...] = ()  # CPU flags the recipe assumes
    min_compute_capability: tuple[int, int] | None = None  # CUDA capability the recipe needs (FP8: 8.9)

    def problems(self) -> list[tuple[str, str]]:
        if self.device == "cuda" and self.queue != "gpu":
            return [("a CUDA recipe must run on the 'gpu' worker queue.", "set queue='gpu'.")]
        return []
