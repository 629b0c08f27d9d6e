"""What every stage shares: holding the run folder while it runs, reading what an earlier stage wrote, and the
registered model's name (also read by the Airflow UI's "MLflow model" link, on an api-server with the light
install: this module imports no worker library)."""

from __future__ import annotations

import functools
from pathlib import Path

from qops.artifacts import read_json
from qops.errors import QopsError
from qops.run_folder import RunLayout, claim


def claimed(scope: str):
    """A stage holds its run folder while it runs (:func:`qops.run_folder.claim`): ``run`` exclusive (run-level
    stages that write shared inputs), ``shared`` (summary), ``target`` (the run folder shared, the target's own
    folder exclusive). The spec binding is checked first, so a run id reused with another spec fails here."""
    def wrap(fn):
        @functools.wraps(fn)
        def stage(spec, run_id: str, *args, **kwargs):
            target = (args[0] if args else kwargs.get("target")) if scope == "target" else None
            with claim(RunLayout.of(spec, run_id).root, spec.digest(), spec.name, run_id, scope=scope,
                       target=target):
                return fn(spec, run_id, *args, **kwargs)
        return stage
    return wrap


def required(path: Path, stage: str) -> dict:
    """The JSON an earlier stage wrote, or an error naming the stage to run first."""
    if not path.is_file():
        raise QopsError(f"{path} is missing: stage {stage!r} has not run for this run id.",
                        f"run the {stage} stage first (same spec and run id).")
    return read_json(path)


def skipped(target: str | None, reason: str, **extra) -> dict:
    """A stage's result when its skip rule holds (Airflow marks the task skipped; ``qops stage`` exits 0)."""
    return {**({"target": target} if target else {}), "skipped": True, "reason": reason, **extra}


def registered_name(spec, source_name: str, target: str) -> str:
    return spec.mlflow.model_name.format(source=source_name, target=target.replace("_", "-"), pipeline=spec.name)
