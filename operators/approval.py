"""The human approval before a promotion (``mlflow.promotion.approval: airflow``): Airflow's ApprovalOperator
(standard provider, human-in-the-loop), asking on the Required Actions page — or through the REST API's
``hitlDetails`` endpoint — whether the version this run registered may take the serving alias.

The request's body (every target's verdict and metrics, links to the card and the MLflow version) is read from the
run folder when the task runs (:func:`qops.pipeline.approval.approval_request`), never from XCom. **Approve**: the
promote task downstream runs; **Reject**: Airflow skips it and the alias stays. Both answers, with who gave them
and the reason typed in the form's ``reason`` field, are recorded on the model version
(:func:`qops.pipeline.approval.record_decision`)."""

from __future__ import annotations

from typing import Any, Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from qops_airflow.links import QopsMlflowModelLink, QopsModelCardLink, mlflow_ui_base


def approval_options(promotion) -> dict:
    """The ApprovalOperator's arguments from the spec's ``mlflow.promotion``: who may answer (``approvers``) and
    how long it waits (``approval_timeout_hours``: then Reject, recorded as the timeout's)."""
    from datetime import timedelta

    out: dict[str, Any] = {}
    if promotion.approvers:
        out["assigned_users"] = [{"id": u, "name": u} for u in promotion.approvers]
    if promotion.approval_timeout_hours is not None:
        out["response_timeout"] = timedelta(hours=promotion.approval_timeout_hours)
        out["defaults"] = [ApprovalOperator.REJECT]
    return out


def task_spec(spec_path: str, mlflow_conn_id: str | None):
    """The spec, with the MLflow connection's tracking URI when one applies (as the stage operators read it)."""
    from qops import redact
    from qops.spec import load_spec
    from qops_airflow.hooks import MlflowHook

    redact.install()
    uri = MlflowHook(mlflow_conn_id).configure()
    spec = load_spec(spec_path)
    if uri:
        spec.mlflow.tracking_uri = uri
    return spec


class QopsApprovalOperator(ApprovalOperator):
    """Ask a person to approve promoting the target's registered version to ``mlflow.promotion.alias``."""

    template_fields: Sequence[str] = ("subject", "body", "spec_path", "run_key", "target", "mlflow_conn_id")
    operator_extra_links = (QopsMlflowModelLink(), QopsModelCardLink())
    ui_color = "#f6e7c1"
    TASK_ID = "approve_promotion"  # in the target's task group, before promote (qops_airflow.dag_factory)

    def __init__(self, *, spec_path: str, target: str, run_key: str = "{{ run_id }}",
                 mlflow_conn_id: str | None = "mlflow_default", **kwargs: Any) -> None:
        kwargs.setdefault("subject", f"Promote the {target} model?")  # replaced from the run folder at run time
        kwargs.setdefault("params", {"reason": Param("", type="string", title="Reason",
                                                     description="Why (recorded on the model version)")})
        super().__init__(**kwargs)
        self.spec_path, self.target, self.run_key, self.mlflow_conn_id = spec_path, target, run_key, mlflow_conn_id

    def execute(self, context):
        from qops.errors import QopsError
        from qops.pipeline.approval import approval_request

        try:
            req = approval_request(task_spec(self.spec_path, self.mlflow_conn_id), self.run_key, self.target,
                                   mlflow_ui_base())
        except QopsError as e:
            raise AirflowFailException(f"qops approval: {e}") from e
        if req.get("skipped"):
            raise AirflowSkipException(f"qops approval: {req['reason']}")
        self.subject, self.body = req["subject"], req["body"]
        self.log.info("asking to promote %s version %s to @%s: answer on the Required Actions page",
                      req["name"], req["version"], req["alias"])
        return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        from qops.errors import QopsError
        from qops.pipeline.approval import record_decision

        if "error" not in event and event.get("chosen_options"):  # a person answered (not a timeout)
            self.validate_chosen_options(event["chosen_options"])  # a bad answer records nothing
            self.validate_params_input(event.get("params_input") or {})
            user = event.get("responded_by_user") or {}
            approved = event["chosen_options"] == [self.APPROVE]
            if event.get("timedout"):  # nobody answered in time: the default (Reject), recorded as such
                by, reason = "timeout", f"no answer within {self.response_timeout}"
            else:
                by, reason = user.get("name") or user.get("id"), (event.get("params_input") or {}).get("reason")
            try:
                out = record_decision(task_spec(self.spec_path, self.mlflow_conn_id), self.run_key, self.target,
                                      approved=approved, by=by, reason=reason)
            except QopsError as e:
                raise AirflowFailException(f"qops approval: {e}") from e
            self.log.info("%s version %s: %s by %s%s", out.get("name"), out.get("version"), out.get("decision"),
                          by, f" ({reason})" if reason else "")
        return super().execute_complete(context, event)
