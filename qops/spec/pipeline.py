"""The pipeline spec: the sections together, the targets and their options, MLflow, card, storage, schedule and
watch; cross-section validation (targets fit the data kind, QAT plans exist)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from qops.errors import QopsError
from qops.qat.plan import config_for, plan_for
from qops.spec.base import Base
from qops.spec.calibration import CalibrationSpec
from qops.spec.data import DataSpec
from qops.spec.gates import GateSpec
from qops.spec.training import QatSpec, QloraSpec, TuningSpec
from qops.targets import get_target, list_targets


class StorageSpec(Base):
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; default "
                                        "$AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL or AWS.")
    s3_region: str | None = None


class PromotionSpec(Base):
    """Move a serving alias to a registered quantized version, by policy (docs/registry.md#promotion)."""

    alias: str = Field("production", description="The serving alias to move.")
    require_approval: bool = Field(False, description="Only with a manual approval: the DAG run's conf "
                                   "{approve_promotion: true}, or qops promote --approve.")
    approval: Literal["airflow"] | None = Field(
        None, description="airflow: the DAG asks a person first (an ApprovalOperator before each promote task, "
        "showing the run's verdicts, metrics and links); Approve moves the alias, Reject leaves it, and either is "
        "recorded on the model version (docs/registry.md#human-approval). qops run then needs --approve.")
    approvers: list[str] = Field(
        default_factory=list, description="With approval: airflow, the Airflow users (ids) who may answer; "
        "empty: anyone who may act on the DAG.")
    approval_timeout_hours: float | None = Field(
        None, gt=0, description="With approval: airflow, an unanswered request is rejected after this many hours "
        "(the alias stays; recorded like a person's Reject); null: it waits.")
    better_on: dict[str, Literal["max", "min"]] = Field(
        default_factory=dict, description="Logged metric -> max/min: the version must be at least as good as "
        "the current holder on each (e.g. quantized_accuracy: max, latency_p50_ms: min).")

    @model_validator(mode="after")
    def _approval_options_need_approval(self):
        if self.approval is None and (self.approvers or self.approval_timeout_hours is not None):
            raise ValueError("approvers and approval_timeout_hours apply to approval: airflow; set it, or drop them")
        return self


class MlflowSpec(Base):
    tracking_uri: str | None = Field(default=None, description="Default: $MLFLOW_TRACKING_URI.")
    registry_uri: str | None = None
    experiment: str = "qops"
    model_name: str = Field(
        "{source}-{target}",
        description="Registered model name per target; {source} is the source model's registered name.",
    )
    register_failed: bool = Field(
        False, description="Register a version whose gates failed (no aliases, tagged qops.gate=failed)."
    )
    promote_alias: str | None = Field(
        "champion", description="The alias registration moves to every gate-passed version (the one serving "
        "reads); null: automatic promotion is off, only candidate_alias moves (promote with mlflow.promotion or "
        "qops promote).")
    candidate_alias: str = "candidate"
    promotion: PromotionSpec | None = Field(default=None, description="Also move a serving alias (e.g. "
                                            "production) after registration, by policy.")


class CardSpec(Base):
    intended_use: str | None = None
    training_data: str | None = None
    limitations: str | None = Field(default=None, description="Rendered as 'Caveats and recommendations'.")
    ethical_considerations: str | None = None
    owners: list[str] = Field(default_factory=list)


class WatchSpec(Base):
    """Run the DAG when the source model's alias moves in the MLflow registry (docs/airflow.md#promotion-triggers)."""

    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between registry polls (triggerer).")
    fire_on_start: bool = Field(False, description="Also run for the version holding the alias when watching "
                                "starts (default: only for later moves).")


class PipelineSpec(Base):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source_model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION, or a .onnx path.")
    data: DataSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    targets: list[str] = Field(min_length=1)
    target_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Target name -> recipe fields to override (qops targets --json lists them).")
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    qat: QatSpec | None = Field(default=None, description="Quantization-aware training per target (docs/qat.md).")
    qlora: QloraSpec | None = Field(default=None, description="QLoRA fine-tuning of a causal LM before quantization "
                                    "(docs/llm.md#qlora).")
    gates: GateSpec = Field(default_factory=GateSpec)
    target_gates: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Target name -> gates fields that differ for that target (e.g. "
        "max_latency_ratio for a target evaluated off its serving hardware); the rest come from gates.")
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    card: CardSpec = Field(default_factory=CardSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    artifact_root: str = Field("qops-artifacts", description="Local folder for run artifacts.")
    schedule_asset: str | None = Field(
        default=None, description="Asset URI whose updates trigger the quantization DAG."
    )
    watch: WatchSpec | None = Field(default=None, description="Also trigger the DAG when source_model's alias "
                                    "(models:/NAME@ALIAS) moves to another version, set by anyone.")

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("targets must not repeat")
        return v

    @model_validator(mode="after")
    def _check_known_targets(self) -> "PipelineSpec":
        for t in self.targets:
            get_target(t, self.target_options.get(t))  # raises TargetError naming the problem and the fix
        for field, names in (("target_options", self.target_options), ("target_gates", self.target_gates)):
            stray = sorted(set(names) - set(self.targets))
            if stray:
                raise ValueError(f"{field} names target(s) {stray} that are not in targets {self.targets}")
        if self.data.kind == "causal_lm":
            if "task" not in self.gates.model_fields_set:
                self.gates.task = "causal_lm"
                if "metric" not in self.gates.model_fields_set:
                    self.gates.metric = "perplexity_increase"
            if self.gates.task != "causal_lm":
                raise ValueError(f"gates.task is {self.gates.task} but data.kind is causal_lm; use gates.task: "
                                 "causal_lm (or leave it out)")
            if self.qat is not None:
                raise ValueError("qat applies to classifiers and encoders; for a causal LM use the qlora block "
                                 "(docs/llm.md#qlora)")
        elif self.qlora is not None:
            raise ValueError("qlora fine-tunes causal LMs; set data.kind: causal_lm or remove the qlora block")
        elif self.gates.task == "causal_lm":
            raise ValueError("gates.task causal_lm needs data.kind: causal_lm")
        self._check_model_kinds()
        for t in self.target_gates:
            try:
                self.gates_for(t)
            except ValidationError as e:
                raise ValueError(f"target_gates.{t}: " + "; ".join(
                    f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
        if self.qat is not None:
            self._check_qat()
        if self.watch is not None and self.watched_alias() is None:
            raise ValueError(f"watch needs source_model as models:/NAME@ALIAS (an alias to watch); it is "
                             f"{self.source_model!r}")
        return self

    def _check_model_kinds(self) -> None:
        """Every target of a causal_lm spec must be an LLM recipe, and LLM recipes only serve causal_lm specs."""
        llm = self.data.kind == "causal_lm"
        for t in self.targets:
            r = self.recipe(t)
            if llm and r.model_kind != "causal_lm":
                ok = [n for n, x in list_targets().items() if x.model_kind == "causal_lm"]
                raise ValueError(f"Target {t!r} quantizes ONNX graphs of any kind; data.kind causal_lm takes decoder "
                                 f"LLM targets (KV-cache aware, lm_head and embedding choices). Fix: use one of {ok}.")
            if not llm and r.model_kind == "causal_lm":
                raise ValueError(f"Target {t!r} is a decoder-LLM target but data.kind is {self.data.kind}. Fix: set "
                                 "data.kind: causal_lm (docs/llm.md), or pick a target from `qops targets`.")

    def watched_alias(self) -> tuple[str, str] | None:
        """(model name, alias) of ``source_model`` when it is ``models:/NAME@ALIAS``."""
        m = re.match(r"^models:/([^/@]+)@([^/@]+)$", self.source_model)
        return (m.group(1), m.group(2)) if m else None

    def _check_qat(self) -> None:
        stray = sorted(set(self.qat.targets) - set(self.targets))
        if stray:
            raise ValueError(f"qat.targets names target(s) {stray} that are not in targets {self.targets}")
        for name, t in self.qat.targets.items():
            if t.steps is not None and t.epochs is not None:
                raise ValueError(f"qat.targets.{name}: set steps or epochs, not both")
            try:
                plan = plan_for(self.recipe(name), engine=t.engine, scheme=t.scheme, mode="static")
                if t.group_size and plan.output == "onnx_matmulnbits" and t.group_size != plan.group_size:
                    raise QopsError(f"target {name} stores blocks of {plan.group_size}; qat group_size "
                                    f"{t.group_size} would not fit", "drop qat group_size for this target, or set "
                                    "target_options block_size to the same value")
                config_for(self.qat, name, plan, has_label=bool(self.qat.label or self.data.label))
            except QopsError as e:
                raise ValueError(f"qat.targets.{name}: {e}") from None

    def qat_plan(self, target: str, mode: str | None = None):
        """The QAT plan of ``target`` (None when the spec has no QAT for it)."""
        if self.qat is None or target not in self.qat.targets:
            return None
        t = self.qat.targets[target]
        return plan_for(self.recipe(target), engine=t.engine, scheme=t.scheme, mode=mode)

    def recipe(self, target: str):
        return get_target(target, self.target_options.get(target))

    def gates_for(self, target: str) -> GateSpec:
        """The gates of one target: ``gates`` with the target's ``target_gates`` fields."""
        over = self.target_gates.get(target)
        return GateSpec.model_validate({**self.gates.model_dump(), **over}) if over else self.gates

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()
