"""Who owns a run folder: unique run ids, the spec a folder belongs to, and the locks that keep runs apart.

- :func:`new_run_id` is unique (microseconds plus a random suffix): two runs started in the same second get two
  folders.
- The first stage of a run records the spec's sha256 in ``run.json`` (created atomically, never overwritten);
  every later stage compares it, so a run id reused with a different spec is refused (exit 2, both hashes named)
  while the same spec and run id resume.
- ``qops run`` holds the run folder exclusively for the whole run. A single stage (an Airflow task, ``qops stage``)
  holds it shared — sibling target tasks of one DAG run work side by side — plus its target folder exclusively;
  run-level stages (source, fine-tune, calibrate) hold the run folder exclusively. Locks are ``flock``s
  (:mod:`qops.locks`): released by the kernel when a process dies, taken over with a log line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from qops.artifacts import read_json, run_dir
from qops.errors import SpecError
from qops.locks import FileLock

RUN_FILE = "run.json"
RUN_LOCK = ".qops-run.lock"
TARGET_LOCK = ".qops-target.lock"


def new_run_id(prefix: str = "cli") -> str:
    """``cli-20261204T175301123456Z-3fa9c2``: UTC time to the microsecond and 24 random bits."""
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


def bind_spec(rdir: Path, spec_sha256: str, pipeline: str, run_id: str) -> dict:
    """Record (first stage) or check (every later one) which spec the run folder belongs to."""
    rdir.mkdir(parents=True, exist_ok=True)
    path = rdir / RUN_FILE
    if not path.is_file():
        record = {"pipeline": pipeline, "run_id": run_id, "spec_sha256": spec_sha256,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = rdir / f".{RUN_FILE}.qops-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)  # atomic create-if-absent: of two first stages, exactly one records its spec
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    record = read_json(path)
    if record.get("spec_sha256") != spec_sha256:
        raise SpecError(
            f"Run folder {rdir} belongs to another spec: it was started with spec sha256 "
            f"{record.get('spec_sha256')}, this spec's sha256 is {spec_sha256}.",
            "give this run its own --run-id (or none: qops makes a unique one), or rerun with the spec the run "
            "started with to resume it.")
    return record


def _busy_fix(run_id: str) -> str:
    return (f"wait for the other process to finish (run id {run_id!r} resumes afterwards), or start this one with "
            "another --run-id (or none: qops makes a unique one).")


@contextlib.contextmanager
def claim(rdir: Path, spec_sha256: str, pipeline: str, run_id: str, *, scope: str = "run",
          target: str | None = None) -> Iterator[dict]:
    """Hold the run folder for ``scope``: ``run`` (a whole ``qops run``, or a run-level stage: exclusive),
    ``shared`` (a read-mostly run-level stage: summary) or ``target`` (a per-target stage: the run folder shared,
    ``targets/<target>`` exclusive); then check the spec binding. Yields the ``run.json`` record."""
    rdir = Path(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    note = {"run_id": run_id, "pipeline": pipeline}
    with contextlib.ExitStack() as stack:
        stack.enter_context(FileLock(rdir / RUN_LOCK, what=f"run folder {rdir}", shared=scope != "run",
                                     fix=_busy_fix(run_id), note=note))
        if scope == "target" and target:
            tdir = rdir / "targets" / target  # RunLayout.target
            stack.enter_context(FileLock(tdir / TARGET_LOCK, what=f"target folder {tdir}", fix=_busy_fix(run_id),
                                         note=note))
        yield bind_spec(rdir, spec_sha256, pipeline, run_id)


CALIBRATION_MANIFEST = "calibration.json"
CALIBRATION_FEEDS = "calibration_feeds.npz"
LATEST_SUMMARY = "latest_summary.json"


class RunLayout:
    """Every path of a run folder, in one place: ``<artifact_root>/<pipeline>/<run_id>/`` holds ``run.json``,
    ``source.json``, ``calibration/``, ``summary.json`` and one ``targets/<target>/`` per target, which holds the
    stage files (``quantize.json``, ``evaluation.json``, ``gate.json``, ``card.json``, ``register.json``,
    ``promote.json``) and, for a QAT model, the same files again under ``qat/``."""

    SOURCE = "source.json"
    QUANTIZE = "quantize.json"
    EVALUATION = "evaluation.json"
    GATE = "gate.json"
    CARD = "card.json"
    REGISTER = "register.json"
    PROMOTE = "promote.json"
    SUMMARY = "summary.json"

    def __init__(self, artifact_root: str | os.PathLike, pipeline: str, run_id: str):
        self.artifact_root, self.pipeline, self.run_id = str(artifact_root), pipeline, run_id
        self.root = run_dir(self.artifact_root, pipeline, run_id)

    @classmethod
    def of(cls, spec, run_id: str) -> "RunLayout":
        return cls(spec.artifact_root, spec.name, run_id)

    @property
    def source(self) -> Path:
        return self.root / self.SOURCE

    @property
    def calibration_dir(self) -> Path:
        return self.root / "calibration"

    @property
    def calibration(self) -> Path:
        return self.calibration_dir / CALIBRATION_MANIFEST

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def latest_summary(self) -> Path:
        return Path(self.artifact_root) / self.pipeline / LATEST_SUMMARY

    def target(self, target: str) -> Path:
        return self.root / "targets" / target

    @staticmethod
    def qat(target_dir: Path) -> Path:
        return Path(target_dir) / "qat"
