"""Run folders: where every file of a run lives (:class:`RunLayout`, the only place a run-folder path is composed),
unique run ids, the spec a folder belongs to, and the locks that keep runs apart.

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
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from qops.artifacts import read_json
from qops.errors import SpecError
from qops.locks import FileLock

RUN_FILE = "run.json"
RUN_LOCK = ".qops-run.lock"
TARGET_LOCK = ".qops-target.lock"
MLFLOW_LOCK = ".qops-mlflow.lock"
CALIBRATION_MANIFEST = "calibration.json"
CALIBRATION_FEEDS = "calibration_feeds.npz"
LATEST_SUMMARY = "latest_summary.json"
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def new_run_id(prefix: str = "cli") -> str:
    """``cli-20261204T175301123456Z-3fa9c2``: UTC time to the microsecond and 24 random bits."""
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


def safe_name(text: str) -> str:
    """A file-system-safe version of a run id or name (Airflow run ids contain ':' and '+')."""
    return UNSAFE.sub("_", text).strip("_") or "run"


def bind_spec(rdir: Path, spec_sha256: str, pipeline: str, run_id: str) -> dict:
    """Record (first stage) or check (every later one) which spec the run folder belongs to."""
    rdir.mkdir(parents=True, exist_ok=True)
    path = RunLayout.at(rdir).run_file
    if not path.is_file():
        record = {"pipeline": pipeline, "run_id": run_id, "spec_sha256": spec_sha256,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = path.with_name(f".{RUN_FILE}.qops-tmp-{os.getpid()}-{secrets.token_hex(4)}")
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
        stack.enter_context(FileLock(RunLayout.at(rdir).lock, what=f"run folder {rdir}", shared=scope != "run",
                                     fix=_busy_fix(run_id), note=note))
        if scope == "target" and target:
            tdir = RunLayout.at(rdir).target(target)
            stack.enter_context(FileLock(tdir.lock, what=f"target folder {tdir.path}", fix=_busy_fix(run_id),
                                         note=note))
        yield bind_spec(rdir, spec_sha256, pipeline, run_id)


class RunLayout:
    """Every path of a run folder, in one place: ``<artifact_root>/<pipeline>/<run_id>/`` holds ``run.json``,
    ``source.json``, ``calibration/``, ``summary.json`` and one ``targets/<target>/`` per target, which holds the
    stage files (``quantize.json``, ``evaluation.json``, ``gate.json``, ``card.json``, ``register.json``,
    ``approval.json``, ``promote.json``) and, for a QAT model, the same files again under ``qat/``. No other module composes a path
    in a run folder or spells one of these names (tests/unit/test_structure.py keeps it so)."""

    RUN = RUN_FILE
    SOURCE = "source.json"
    QUANTIZE = "quantize.json"
    EVALUATION = "evaluation.json"
    GATE = "gate.json"
    CARD = "card.json"
    REGISTER = "register.json"
    PROMOTE = "promote.json"
    APPROVAL = "approval.json"
    SUMMARY = "summary.json"

    def __init__(self, artifact_root: str | os.PathLike, pipeline: str, run_id: str):
        self.artifact_root, self.pipeline, self.run_id = str(artifact_root), pipeline, run_id
        self.root = Path(self.artifact_root) / safe_name(pipeline) / safe_name(run_id)

    @classmethod
    def of(cls, spec, run_id: str) -> "RunLayout":
        return cls(spec.artifact_root, spec.name, run_id)

    @classmethod
    def at(cls, root: str | os.PathLike) -> "RunLayout":
        """The layout of the run folder ``root`` (a summary's ``run_dir``, a locked folder), kept exactly as given."""
        root = Path(root)
        layout = cls(root.parent.parent, root.parent.name, root.name)
        layout.root = root
        return layout

    @property
    def run_file(self) -> Path:
        return self.root / self.RUN

    @property
    def lock(self) -> Path:
        return self.root / RUN_LOCK

    @property
    def mlflow_lock(self) -> Path:
        """Held while the run's MLflow parent run is looked up or created (one parent per pipeline run)."""
        return self.root / MLFLOW_LOCK

    @property
    def source(self) -> Path:
        return self.root / self.SOURCE

    @property
    def fp32_export(self) -> Path:
        """The FP32 ONNX export of a decoder LLM (its KV cache included), shared by the run's ONNX targets."""
        return self.root / "fp32"

    @property
    def qlora(self) -> Path:
        """The QLoRA fine-tuning folder: checkpoint, adapter, merged model."""
        return self.root / "qlora"

    @property
    def calibration_dir(self) -> Path:
        return self.root / "calibration"

    @property
    def calibration_files(self) -> "CalibrationFiles":
        return CalibrationFiles(self.calibration_dir)

    @property
    def calibration(self) -> Path:
        """The calibration manifest (``calibration/calibration.json``)."""
        return self.calibration_files.manifest

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def latest_summary(self) -> Path:
        return self.root.parent / LATEST_SUMMARY

    def target(self, target: str) -> "TargetFolder":
        return TargetFolder(self.root / "targets" / target)


@dataclass(frozen=True)
class CalibrationFiles:
    """What :func:`qops.calibration.select_calibration` writes into its output folder (a run's ``calibration/``):
    the selected rows, their manifest, the model-input feeds, the drift report."""

    dir: Path

    @property
    def table(self) -> Path:
        return self.dir / "calibration.parquet"

    @property
    def manifest(self) -> Path:
        return self.dir / CALIBRATION_MANIFEST

    @property
    def feeds(self) -> Path:
        return self.dir / CALIBRATION_FEEDS

    @property
    def drift_report(self) -> Path:
        return self.dir / "drift_report.json"

    @property
    def drift_text(self) -> Path:
        return self.dir / "drift_report.txt"


@dataclass(frozen=True)
class ModelFolder:
    """The stage files of one candidate model: a target's PTQ model (``targets/<t>/``) or its QAT model
    (``targets/<t>/qat/``)."""

    path: Path

    @property
    def quantize(self) -> Path:
        return self.path / RunLayout.QUANTIZE

    @property
    def evaluation(self) -> Path:
        return self.path / RunLayout.EVALUATION

    @property
    def gate(self) -> Path:
        return self.path / RunLayout.GATE

    @property
    def work(self) -> Path:
        """Scratch of the stage that makes this model (QAT's checkpoints)."""
        return self.path / "work"


@dataclass(frozen=True)
class TargetFolder(ModelFolder):
    """``targets/<t>/``: the PTQ model and its stage files, the target's card, registration and promotion (for
    the candidate, PTQ or QAT), its lock, and ``qat/``."""

    @property
    def qat(self) -> ModelFolder:
        return ModelFolder(self.path / "qat")

    @property
    def lock(self) -> Path:
        return self.path / TARGET_LOCK

    @property
    def card(self) -> Path:
        return self.path / RunLayout.CARD

    @property
    def card_dir(self) -> Path:
        """The rendered card (``card.md``, ``card.html``, the card's data, charts: :func:`qops.cards.write_card`)."""
        return self.path / "card"

    @property
    def register(self) -> Path:
        return self.path / RunLayout.REGISTER

    @property
    def promote(self) -> Path:
        return self.path / RunLayout.PROMOTE

    @property
    def approval(self) -> Path:
        """A person's answer to the DAG's approval request (``mlflow.promotion.approval: airflow``)."""
        return self.path / RunLayout.APPROVAL

    def model(self, suffix: str) -> Path:
        """The quantized graph or program: ``model.onnx``, ``model.pt2`` (the target's output suffix)."""
        return self.path / f"model{suffix}"

    def llm_model(self, single_file: bool) -> Path:
        """A decoder LLM engine's output: the folder ``model/``, or ``model/model.gguf`` for a single-file engine."""
        folder = self.path / "model"
        return folder / "model.gguf" if single_file else folder
