"""The stage table: the pipeline's graph written once. ``qops run`` (:func:`qops.pipeline.run.run_pipeline`), the
Airflow DAG factory (``qops_airflow.dag_factory``) and ``qops stage`` all read it, so they run the same stages in
the same order, on the same queues, with the same skip and failure rules.

Order: ``source`` → ``finetune`` (with a ``qlora`` block) → ``calibrate`` → per target ``quantize`` → ``evaluate``
→ ``gate`` → ``qat`` (targets in ``qat.targets``) → ``card`` → ``register`` → ``promote`` (with
``mlflow.promotion``) → ``summary``. Skip rules live in the stage functions (their result says ``skipped``); a
stage's ``failed`` rule says when its result fails the run's task (Airflow) or exits 3 (``qops stage``)."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from qops.errors import QopsError

# The stage functions are named, not imported: the DAG factory reads this table when a DAG file is parsed, and the
# stage modules import the data, evaluation and registry stacks (NumPy, pandas, ONNX Runtime, MLflow) that a
# scheduler or dag-processor with the light install (`qops[airflow]`, docs/deployment.md) does not have. A stage's
# function is imported when it is first called or inspected, on the worker that runs it.
PER_TARGET = "qops.pipeline.per_target"
PREPARE = "qops.pipeline.prepare"
PUBLISH = "qops.pipeline.publish"
SUMMARY = "qops.pipeline.summary"


def always(spec, target=None) -> bool:
    return True


def default_queue(spec, target=None) -> str | None:
    """Per-target stages run on the target's queue (cpu or gpu); run-level stages on the default queue."""
    return spec.recipe(target).queue if target else None


def gate_failed(res: dict) -> str | None:
    """A failed gate fails its task, unless QAT runs next for the target (``qat_next``)."""
    return None if res["passed"] or res.get("qat_next") else res["message"]


def qat_failed(res: dict) -> str | None:
    return res["message"] if res.get("ran") and not res["passed"] else None


def qat_queue(spec, target) -> str:
    """QAT runs on the queue its scheme needs (CUDA schemes: gpu)."""
    return spec.qat_plan(target).queue


@dataclass(frozen=True)
class Stage:
    name: str  # `qops stage NAME`
    fn_ref: str  # "module:function"; fn(spec, run_id[, target], **options) -> dict
    per_target: bool
    task_id: str  # the Airflow task id (per-target stages: inside the target's task group)
    applies: Callable = always  # applies(spec, target) -> bool: is the stage in this spec's graph?
    queue: Callable = default_queue  # queue(spec, target) -> str | None
    after_failure: bool = False  # also runs when an upstream stage failed (documents, summarises)
    retries: int | None = None  # Airflow retries (None: the deployment's default)
    failed: Callable | None = None  # failed(result) -> message | None: the result fails the task / exits 3

    @property
    def fn(self) -> Callable:
        """The stage function, imported on first use (see the note on the module's imports)."""
        module, _, name = self.fn_ref.partition(":")
        return getattr(importlib.import_module(module), name)

    def options(self) -> set[str]:
        """The keyword options the stage function takes (``source_uri``, ``dag_id``, ``approved``)."""
        params = list(inspect.signature(self.fn).parameters)
        return set(params[3 if self.per_target else 2:])


STAGES: tuple[Stage, ...] = (
    Stage("source", f"{PREPARE}:stage_source", False, "resolve_source"),
    Stage("finetune", f"{PREPARE}:stage_finetune", False, "qlora_finetune",
          applies=lambda spec, t=None: spec.qlora is not None, queue=lambda spec, t=None: spec.qlora.queue, retries=2),
    Stage("calibrate", f"{PREPARE}:stage_calibrate", False, "calibrate"),
    Stage("quantize", f"{PER_TARGET}:stage_quantize", True, "quantize"),
    Stage("evaluate", f"{PER_TARGET}:stage_evaluate", True, "evaluate"),
    Stage("gate", f"{PER_TARGET}:stage_gate", True, "gate", failed=gate_failed),
    Stage("qat", f"{PER_TARGET}:stage_qat", True, "qat", applies=lambda spec, t: spec.qat_plan(t) is not None,
          queue=qat_queue, retries=2, failed=qat_failed),
    Stage("card", f"{PUBLISH}:stage_card", True, "card", after_failure=True),
    Stage("register", f"{PUBLISH}:stage_register", True, "register", after_failure=True, retries=3),
    Stage("promote", f"{PUBLISH}:stage_promote", True, "promote",
          applies=lambda spec, t: spec.mlflow.promotion is not None),
    Stage("summary", f"{SUMMARY}:stage_summary", False, "summary", after_failure=True),
)
BY_NAME = {s.name: s for s in STAGES}
RUN_STAGES = tuple(s for s in STAGES if not s.per_target and s.name != "summary")
TARGET_STAGES = tuple(s for s in STAGES if s.per_target)


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise QopsError(f"There is no stage {name!r}.", f"use one of {list(BY_NAME)}.")
    return BY_NAME[name]


def plan(spec) -> list[tuple[Stage, str | None]]:
    """Every (stage, target) of this spec's graph, in run order."""
    steps = [(s, None) for s in RUN_STAGES if s.applies(spec)]
    steps += [(s, t) for t in spec.targets for s in TARGET_STAGES if s.applies(spec, t)]
    return steps + [(BY_NAME["summary"], None)]


def call_stage(st: Stage, spec, run_id: str, target: str | None = None, **options) -> dict:
    """Run one stage; ``options`` it does not take are dropped (every caller may offer ``dag_id``)."""
    if st.per_target and not target:
        raise QopsError(f"Stage {st.name!r} runs per target.", f"pass --target (one of {spec.targets}).")
    if st.per_target and target not in spec.targets:
        raise QopsError(f"Target {target!r} is not in the spec's targets.", f"use one of {spec.targets}.")
    kw = {k: v for k, v in options.items() if k in st.options() and v is not None}
    return st.fn(spec, run_id, target, **kw) if st.per_target else st.fn(spec, run_id, **kw)
