"""One thin operator per pipeline stage: parse arguments, call one qops stage function, return small JSON.

Every operator takes the pipeline spec path (the single source of truth) and the run key (default:
the Airflow run id) that names the run's artifact folder. Heavy libraries are imported in
``execute`` only, so DAG parsing stays cheap.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from qops_airflow.links import QopsMlflowModelLink, QopsModelCardLink


class _QopsStageOperator(BaseOperator):
    template_fields: Sequence[str] = ("spec_path", "run_key")
    ui_color = "#d9ecf2"
    stage: str = ""
    default_trigger_rule: str | None = None  # set by stages that must run after upstream failures too

    def __init__(self, *, spec_path: str, run_key: str = "{{ run_id }}", mlflow_conn_id: str | None = None,
                 **kwargs: Any) -> None:
        if self.default_trigger_rule:
            kwargs.setdefault("trigger_rule", self.default_trigger_rule)
        super().__init__(**kwargs)
        self.spec_path = spec_path
        self.run_key = run_key
        self.mlflow_conn_id = mlflow_conn_id

    def _spec(self):
        from qops import redact
        from qops.spec import load_spec

        from qops_airflow.hooks import MlflowHook

        redact.install()  # the task log's handlers: no credential from MLflow, boto3 or qops reaches it
        MlflowHook(self.mlflow_conn_id).configure()
        return load_spec(self.spec_path)

    def _call(self, fn, *args, **kwargs):
        from qops.errors import QopsError

        from qops.errors import RegistryUnavailable

        try:
            return fn(*args, **kwargs)
        except RegistryUnavailable:  # an outage, nothing half-registered: the task's retries may succeed
            raise
        except QopsError as e:  # bad input: retrying will not help, fail with the message
            raise AirflowFailException(f"qops {self.stage}: {e}") from e


class QopsSourceOperator(_QopsStageOperator):
    """Resolve the FP32 source model (``models:/NAME@ALIAS``) to a local ONNX file in the run folder."""

    stage = "source"

    def execute(self, context) -> dict:
        from qops.pipeline import stage_source

        from qops_airflow.triggers import source_from_events

        spec = self._spec()
        watched = spec.watched_alias()
        uri = source_from_events(context, watched[0]) if watched else None
        if uri:  # the run was triggered by the alias moving: quantize exactly that version
            self.log.info("triggered by %s@%s moving: resolving %s", watched[0], watched[1], uri)
        return self._call(stage_source, spec, self.run_key, source_uri=uri)


class QopsCalibrateOperator(_QopsStageOperator):
    """Select the calibration set and check it for drift (GX); fails with the drifted columns."""

    stage = "calibrate"

    def execute(self, context) -> dict:
        from qops.errors import DriftError, QopsError
        from qops.pipeline import stage_calibrate

        try:
            res = stage_calibrate(self._spec(), self.run_key)
        except DriftError as e:
            context["ti"].xcom_push(key="drift_report", value={"drifted_columns": e.report.get("drifted_columns")})
            raise AirflowFailException(f"qops calibrate: {e}") from e
        except QopsError as e:
            raise AirflowFailException(f"qops calibrate: {e}") from e
        self.log.info("calibration set %s (%d rows, sha256 %s), drift %s", res["path"], res["rows"], res["sha256"],
                      "passed" if res["drift_passed"] else f"in {res['drifted_columns']} (warn)")
        return {k: res[k] for k in ("path", "sha256", "rows", "drift_passed", "drifted_columns", "drift_report_path")}


class QopsFinetuneOperator(_QopsStageOperator):
    """QLoRA fine-tuning of a causal LM (the spec's ``qlora`` block): NF4 base, LoRA adapters, merged full-precision
    model exported to ONNX; it replaces the source for the later stages. A retry resumes from the last checkpoint."""

    template_fields: Sequence[str] = ("spec_path", "run_key")
    stage = "finetune"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("retries", 2)  # a killed worker's retry resumes from the last checkpoint
        super().__init__(**kwargs)

    def execute(self, context) -> dict:
        from qops.pipeline import stage_finetune

        res = self._call(stage_finetune, self._spec(), self.run_key)
        self.log.info("QLoRA: %d steps (resumed from %d), loss %.4f; merged model %s", res["steps"],
                      res["resumed_from"], res["final_loss"] or float("nan"), res["merged_dir"])
        return res


class _TargetOperator(_QopsStageOperator):
    template_fields: Sequence[str] = ("spec_path", "run_key", "target")

    def __init__(self, *, target: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target


class QopsQuantizeOperator(_TargetOperator):
    """Quantize the source model for one hardware target (the target's recipe and the spec's target_options;
    accuracy-aware tuning when the spec's ``tuning`` is enabled: trials are logged and kept in quantize.json)."""

    stage = "quantize"

    def execute(self, context) -> dict:
        from qops.pipeline import stage_quantize

        res = self._call(stage_quantize, self._spec(), self.run_key, self.target)
        self.log.info("%s: %s bytes (%.2fx smaller), mode %s, in %.1fs", self.target, res["size_bytes"],
                      res["size_ratio"], res.get("mode"), res["seconds"])
        for note in res.get("notes") or []:
            self.log.info("%s: %s", self.target, note)
        for t in res.get("trials") or []:
            self.log.info("trial %s %-8s %-60s %-7s latency x%s cosine %s%s", t["trial"], t["phase"], t["config"],
                          t["verdict"], t["latency_ratio"], t["cosine"], "  <- chosen" if t["chosen"] else "")
        out = {k: res[k] for k in ("target", "model_path", "model_sha256", "size_bytes", "size_ratio")}
        out.update(mode=res.get("mode"), trials=len(res.get("trials") or []))
        return out


class QopsEvaluateOperator(_TargetOperator):
    """Evaluate FP32 vs quantized on the validation slices; size, latency, fairness."""

    stage = "evaluate"

    def execute(self, context) -> dict:
        from qops.pipeline import stage_evaluate

        res = self._call(stage_evaluate, self._spec(), self.run_key, self.target)
        m, perf = res["primary_metric"], res["performance"]
        return {"target": self.target, "metric": m, **{k: res["overall"][m][k] for k in ("fp32", "quantized", "ci_low",
                                                                                          "ci_high")},
                "latency_p50_ms": perf["latency_p50_ms"], "size_bytes": perf["size_bytes"],
                "on_target_hardware": res["hardware_match"]["matches"]}


class QopsGateOperator(_TargetOperator):
    """Apply the gates. Pushes the gate result to XCom (key ``gate_result``), then fails the task with a
    message listing each failed check."""

    stage = "gate"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())

    def execute(self, context) -> dict:
        from qops.pipeline import stage_gate

        res = self._call(stage_gate, self._spec(), self.run_key, self.target)
        context["ti"].xcom_push(key="gate_result", value=res)
        self.log.info("gate for %s:\n%s", self.target, res["message"])
        for w in res.get("warnings") or []:
            self.log.warning("gate warning for %s: %s", self.target, w)
        if not res["passed"] and res.get("qat_next"):
            self.log.warning("PTQ model of %s failed its gates; the qat task trains a QAT model next "
                             "(qat.when: ptq_fails)", self.target)
        elif not res["passed"]:
            raise AirflowFailException(f"qops gate for target {self.target}: {res['message']}")
        return {"target": self.target, "passed": res["passed"], "checks": len(res["checks"]),
                "inconclusive": len(res.get("inconclusive") or []), "qat_next": res.get("qat_next", False)}


class QopsQatOperator(_TargetOperator):
    """Quantization-aware training for a target (the spec's ``qat`` block): skipped when PTQ passed and
    ``qat.when`` is ``ptq_fails``. Trains with checkpoints in the run folder, so a retry of this task resumes
    where the previous attempt stopped; then evaluates and gates the QAT model like the PTQ one, and fails
    when its gates fail. Progress goes to the task log every tenth of the steps."""

    stage = "qat"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("retries", 2)  # a killed worker's retry resumes from the last checkpoint
        super().__init__(**kwargs)

    def execute(self, context) -> dict:
        from qops.pipeline import stage_qat

        res = self._call(stage_qat, self._spec(), self.run_key, self.target)
        if not res["ran"]:
            raise AirflowSkipException(f"no QAT for {self.target}: {res['reason']}")
        self.log.info("QAT for %s: %d steps%s in %.1f s, %s bytes; gates %s", self.target, res["steps"],
                      f" (resumed at step {res['resumed_from']})" if res["resumed_from"] else "", res["seconds"],
                      res["size_bytes"], "passed" if res["passed"] else "failed")
        if not res["passed"]:
            raise AirflowFailException(f"qops gate for the QAT model of {self.target}: {res['message']}")
        return res


class QopsCardOperator(_TargetOperator):
    """Write the model card (Markdown, JSON, chart). Runs after a failed gate too, to document it."""

    stage = "card"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())
    default_trigger_rule = "all_done"

    def execute(self, context) -> dict:
        from pathlib import Path

        from qops.pipeline import stage_card

        from qops.pipeline import candidate

        spec = self._spec()
        folder, method, _ = candidate(spec, self.run_key, self.target)
        if not (folder / "gate.json").is_file():
            raise AirflowSkipException(f"no gate result for the {method.upper()} model of {self.target}: an upstream "
                                       "stage failed before its gate")
        res = self._call(stage_card, spec, self.run_key, self.target, dag_id=context["dag"].dag_id)
        self.log.info("model card: %s", Path(res["markdown_path"]))
        return res


class QopsRegisterOperator(_TargetOperator):
    """Log + register the quantized model in MLflow with tags, card and aliases (only if gates passed,
    unless the spec says ``register_failed``)."""

    stage = "register"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())
    default_trigger_rule = "all_done"

    def __init__(self, **kwargs: Any) -> None:
        # registry/S3 outages are retried with backoff; a retry reuses a completed version (one per run key)
        kwargs.setdefault("retries", 3)
        kwargs.setdefault("retry_delay", timedelta(seconds=30))
        kwargs.setdefault("retry_exponential_backoff", 2.0)
        super().__init__(**kwargs)

    def execute(self, context) -> dict:
        from qops.artifacts import read_json, run_dir
        from qops.pipeline import candidate, stage_register

        spec = self._spec()
        tdir = run_dir(spec.artifact_root, spec.name, self.run_key) / "targets" / self.target
        folder, method, _ = candidate(spec, self.run_key, self.target)
        if not (tdir / "card.json").is_file() or not (folder / "gate.json").is_file():
            raise AirflowSkipException(f"no model card for {self.target}: an upstream stage failed")
        if not read_json(folder / "gate.json")["passed"] and not spec.mlflow.register_failed:
            raise AirflowSkipException(f"gates failed for the {method.upper()} model of {self.target}: not registered "
                                       "(mlflow.register_failed is off)")
        res = self._call(stage_register, spec, self.run_key, self.target)
        self.log.info("registered %s version %s, aliases %s", res["name"], res["version"], res["aliases"])
        return res


class QopsPromoteOperator(_TargetOperator):
    """Move the spec's serving alias (``mlflow.promotion.alias``, e.g. ``production``) to the version this run
    registered, when the policy allows it: gates passed, a manual approval if required (the DAG run's conf
    ``{"approve_promotion": true}``, or ``approved=True``), and not worse than the current holder on the policy's
    metrics. The replaced version is tagged with when and by which run. Refusals fail the task (no retries)."""

    template_fields: Sequence[str] = ("spec_path", "run_key", "target", "approved")
    stage = "promote"
    operator_extra_links = (QopsMlflowModelLink(),)

    def __init__(self, *, approved: str | bool = "{{ (dag_run.conf or {}).get('approve_promotion', False) }}",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.approved = approved

    def execute(self, context) -> dict:
        from qops.pipeline import stage_promote

        approved = self.approved if isinstance(self.approved, bool) else str(self.approved).strip().lower() in (
            "true", "1", "yes")
        res = self._call(stage_promote, self._spec(), self.run_key, self.target, approved=approved)
        self.log.info("%s: %s", self.target, res["reason"])
        return res


class QopsSummaryOperator(_QopsStageOperator):
    """Write the run's summary.json and log the summary table."""

    stage = "summary"
    default_trigger_rule = "all_done"

    def execute(self, context) -> dict:
        from qops.pipeline import format_summary, stage_summary

        summary = stage_summary(self._spec(), self.run_key, dag_id=context["dag"].dag_id)
        self.log.info("\n%s", format_summary(summary))
        return {"summary": f"{summary['run_dir']}/summary.json",
                "passed": [r["target"] for r in summary["targets"] if r.get("gate") == "passed"]}


class QopsWatcherOperator(BaseOperator):
    """Fails the DAG run when any upstream task failed (Airflow's watcher pattern).

    The summary task runs with ``trigger_rule=all_done`` so that it reports failed targets too; as the
    only leaf it would mark the run successful. This task, downstream of every task with
    ``trigger_rule=one_failed``, is skipped when all went well and fails otherwise.
    """

    ui_color = "#f2d9d9"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "one_failed")
        kwargs.setdefault("retries", 0)
        super().__init__(**kwargs)

    def execute(self, context) -> None:
        raise AirflowFailException("an upstream task failed (a gate, or a stage with bad input): see its log; "
                                   "the summary lists each target's verdict")
