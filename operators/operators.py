"""One thin operator per pipeline stage. Each reads its stage from qops' stage table (:mod:`qops.pipeline.table`):
it calls the stage function once and turns the result into Airflow's terms — ``skipped`` results skip the task, a
result the stage's ``failed`` rule rejects fails it (after pushing the result to XCom), anything else returns a
small JSON. Retries and trigger rules come from the table too, so the DAG, ``qops run`` and ``qops stage`` decide
alike.

Every operator takes the pipeline spec path (the single source of truth) and the run key (default: the Airflow
run id) that names the run's artifact folder. Heavy libraries are imported in ``execute`` only, so DAG parsing
stays cheap.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from qops_airflow.links import QopsMlflowModelLink, QopsModelCardLink


class QopsStageOperator(BaseOperator):
    """Runs the qops stage named by ``stage`` (a class attribute) for the spec and run key."""

    template_fields: Sequence[str] = ("spec_path", "run_key", "mlflow_conn_id")
    ui_color = "#d9ecf2"
    stage: str = ""

    def __init__(self, *, spec_path: str, run_key: str = "{{ run_id }}", mlflow_conn_id: str | None = "mlflow_default",
                 **kwargs: Any) -> None:
        from qops.pipeline.table import stage

        st = stage(self.stage)
        if st.after_failure:  # documents / summarises whatever happened upstream
            kwargs.setdefault("trigger_rule", "all_done")
        if st.retries:  # resumable (checkpoints) or idempotent (one registered version per run key)
            kwargs.setdefault("retries", st.retries)
        super().__init__(**kwargs)
        self.spec_path = spec_path
        self.run_key = run_key
        self.mlflow_conn_id = mlflow_conn_id

    def _spec(self):
        from qops import redact
        from qops.spec import load_spec
        from qops_airflow.hooks import MlflowHook

        redact.install()  # the task log's handlers: no credential from MLflow, boto3 or qops reaches it
        uri = MlflowHook(self.mlflow_conn_id).configure()
        spec = load_spec(self.spec_path)
        if uri:  # a connection that applies wins over the spec's tracking URI (docs/airflow.md)
            spec.mlflow.tracking_uri = uri
        return spec

    def _call(self, fn, *args, context=None, **kwargs):
        from qops.errors import DriftError, QopsError, RegistryUnavailable

        try:
            return fn(*args, **kwargs)
        except RegistryUnavailable:  # an outage, nothing half-registered: the task's retries may succeed
            raise
        except DriftError as e:
            if context is not None:
                context["ti"].xcom_push(key="drift_report", value={"drifted_columns": e.report.get("drifted_columns")})
            raise AirflowFailException(f"qops {self.stage}: {e}") from e
        except QopsError as e:  # bad input: retrying will not help, fail with the message
            raise AirflowFailException(f"qops {self.stage}: {e}") from e

    def options(self, context, spec) -> dict:
        """Keyword options of the stage function (``dag_id``; the source and promote stages add theirs)."""
        return {"dag_id": context["dag"].dag_id}

    def report(self, res: dict, context) -> None:
        """Log the result (before the failure rule applies)."""

    def result(self, res: dict) -> dict:
        """What goes to XCom: small JSON, never artifacts."""
        return res

    def execute(self, context) -> dict:
        from qops.pipeline.table import call_stage, stage

        spec = self._spec()
        st = stage(self.stage)
        res = self._call(call_stage, st, spec, self.run_key, getattr(self, "target", None),
                         context=context, **self.options(context, spec))
        if res.get("skipped"):
            raise AirflowSkipException(f"qops {self.stage}: {res['reason']}")
        self.report(res, context)
        failure = st.failed(res) if st.failed else None
        if failure:
            raise AirflowFailException(f"qops {self.stage} for target {getattr(self, 'target', '')}: {failure}")
        return self.result(res)


class QopsSourceOperator(QopsStageOperator):
    """Resolve the FP32 source model (``models:/NAME@ALIAS``) to local files in the run folder; a run triggered by
    the watched alias moving resolves exactly the version the event names."""

    stage = "source"

    def options(self, context, spec) -> dict:
        from qops_airflow.triggers import source_from_events

        watched = spec.watched_alias()
        uri = source_from_events(context, watched[0]) if watched else None
        if uri:
            self.log.info("triggered by %s@%s moving: resolving %s", watched[0], watched[1], uri)
        return {"source_uri": uri}


class QopsFinetuneOperator(QopsStageOperator):
    """QLoRA fine-tuning of a causal LM (the spec's ``qlora`` block): NF4 base, LoRA adapters, merged full-precision
    model exported to ONNX; it replaces the source for the later stages. A retry resumes from the last checkpoint."""

    stage = "finetune"

    def report(self, res: dict, context) -> None:
        self.log.info("QLoRA: %d steps (resumed from %d), loss %.4f; merged model %s", res["steps"],
                      res["resumed_from"], res["final_loss"] or float("nan"), res["merged_dir"])


class QopsCalibrateOperator(QopsStageOperator):
    """Select the calibration set and check it for drift (GX); fails with the drifted columns."""

    stage = "calibrate"

    def report(self, res: dict, context) -> None:
        self.log.info("calibration set %s (%d rows, sha256 %s), drift %s", res["path"], res["rows"], res["sha256"],
                      "passed" if res["drift_passed"] else f"in {res['drifted_columns']} (warn)")

    def result(self, res: dict) -> dict:
        return {k: res[k] for k in ("path", "sha256", "rows", "drift_passed", "drifted_columns", "drift_report_path")}


class QopsTargetOperator(QopsStageOperator):
    template_fields: Sequence[str] = ("spec_path", "run_key", "target", "mlflow_conn_id")

    def __init__(self, *, target: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target


class QopsQuantizeOperator(QopsTargetOperator):
    """Quantize the source model for one hardware target (the target's recipe and the spec's target_options;
    accuracy-aware tuning when the spec's ``tuning`` is enabled: trials are logged and kept in quantize.json)."""

    stage = "quantize"

    def report(self, res: dict, context) -> None:
        self.log.info("%s: %s bytes (%.2fx smaller), mode %s, in %.1fs", self.target, res["size_bytes"],
                      1 / res["size_ratio"], res.get("mode"), res["seconds"])
        for note in res.get("notes") or []:
            self.log.info("%s: %s", self.target, note)
        for t in res.get("trials") or []:
            self.log.info("trial %s %-8s %-60s %-7s latency x%s cosine %s%s", t["trial"], t["phase"], t["config"],
                          t["verdict"], t["latency_ratio"], t["cosine"], "  <- chosen" if t["chosen"] else "")

    def result(self, res: dict) -> dict:
        out = {k: res[k] for k in ("target", "model_path", "model_sha256", "size_bytes", "size_ratio")}
        out.update(mode=res.get("mode"), trials=len(res.get("trials") or []))
        return out


class QopsEvaluateOperator(QopsTargetOperator):
    """Evaluate FP32 vs quantized on the validation slices; size, latency, fairness."""

    stage = "evaluate"

    def result(self, res: dict) -> dict:
        m, perf = res["primary_metric"], res["performance"]
        return {"target": self.target, "metric": m,
                **{k: res["overall"][m][k] for k in ("fp32", "quantized", "ci_low", "ci_high")},
                "latency_p50_ms": perf["latency_p50_ms"], "size_bytes": perf["size_bytes"],
                "on_target_hardware": res["hardware_match"]["matches"]}


class QopsGateOperator(QopsTargetOperator):
    """Apply the gates. Pushes the gate result to XCom (key ``gate_result``), then fails the task with a
    message listing each failed check (unless QAT runs next for the target)."""

    stage = "gate"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())

    def report(self, res: dict, context) -> None:
        context["ti"].xcom_push(key="gate_result", value=res)
        self.log.info("gate for %s:\n%s", self.target, res["message"])
        for w in res.get("warnings") or []:
            self.log.warning("gate warning for %s: %s", self.target, w)
        if not res["passed"] and res.get("qat_next"):
            self.log.warning("PTQ model of %s failed its gates; the qat task trains a QAT model next "
                             "(qat.when: ptq_fails)", self.target)

    def result(self, res: dict) -> dict:
        return {"target": self.target, "passed": res["passed"], "checks": len(res["checks"]),
                "inconclusive": len(res.get("inconclusive") or []), "qat_next": res.get("qat_next", False)}


class QopsQatOperator(QopsTargetOperator):
    """Quantization-aware training for a target (the spec's ``qat`` block): skipped when PTQ passed and
    ``qat.when`` is ``ptq_fails``. Trains with checkpoints in the run folder, so a retry of this task resumes
    where the previous attempt stopped; then evaluates and gates the QAT model like the PTQ one, and fails
    when its gates fail. Progress goes to the task log every tenth of the steps."""

    stage = "qat"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())

    def report(self, res: dict, context) -> None:
        self.log.info("QAT for %s: %d steps%s in %.1f s, %s bytes; gates %s", self.target, res["steps"],
                      f" (resumed at step {res['resumed_from']})" if res["resumed_from"] else "", res["seconds"],
                      res["size_bytes"], "passed" if res["passed"] else "failed")


class QopsCardOperator(QopsTargetOperator):
    """Write the model card (Markdown, HTML, JSON, chart). Runs after a failed gate too, to document it."""

    stage = "card"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())

    def report(self, res: dict, context) -> None:
        self.log.info("model card: %s", Path(res["markdown_path"]))


class QopsRegisterOperator(QopsTargetOperator):
    """Log + register the quantized model in MLflow with tags, card and aliases (only if gates passed,
    unless the spec says ``register_failed``)."""

    stage = "register"
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())

    def __init__(self, **kwargs: Any) -> None:
        # registry/S3 outages are retried with backoff; a retry reuses a completed version (one per run key)
        kwargs.setdefault("retry_delay", timedelta(seconds=30))
        kwargs.setdefault("retry_exponential_backoff", 2.0)
        super().__init__(**kwargs)

    def report(self, res: dict, context) -> None:
        self.log.info("registered %s version %s, aliases %s", res["name"], res["version"], res["aliases"])


class QopsPromoteOperator(QopsTargetOperator):
    """Move the spec's serving alias (``mlflow.promotion.alias``, e.g. ``production``) to the version this run
    registered, when the policy allows it: gates passed, a manual approval if required (the DAG run's conf
    ``{"approve_promotion": true}``, or ``approved=True``), and not worse than the current holder on the policy's
    metrics. The replaced version is tagged with when and by which run. Refusals fail the task (no retries)."""

    template_fields: Sequence[str] = ("spec_path", "run_key", "target", "approved", "mlflow_conn_id")
    stage = "promote"
    operator_extra_links = (QopsMlflowModelLink(),)

    def __init__(self, *, approved: str | bool = "{{ (dag_run.conf or {}).get('approve_promotion', False) }}",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.approved = approved

    def options(self, context, spec) -> dict:
        approved = self.approved if isinstance(self.approved, bool) else str(self.approved).strip().lower() in (
            "true", "1", "yes")
        return {"approved": approved}

    def report(self, res: dict, context) -> None:
        self.log.info("%s: %s", self.target, res["reason"])


class QopsSummaryOperator(QopsStageOperator):
    """Write the run's summary.json and log the summary table."""

    stage = "summary"

    def report(self, res: dict, context) -> None:
        from qops.pipeline import format_summary

        self.log.info("\n%s", format_summary(res))

    def result(self, res: dict) -> dict:
        from qops.run_folder import RunLayout

        return {"summary": str(RunLayout.at(res["run_dir"]).summary),
                "passed": [r["target"] for r in res["targets"] if r.get("gate") == "passed"]}


OPERATORS: dict[str, type[QopsStageOperator]] = {
    op.stage: op for op in (QopsSourceOperator, QopsFinetuneOperator, QopsCalibrateOperator, QopsQuantizeOperator,
                            QopsEvaluateOperator, QopsGateOperator, QopsQatOperator, QopsCardOperator,
                            QopsRegisterOperator, QopsPromoteOperator, QopsSummaryOperator)}


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
