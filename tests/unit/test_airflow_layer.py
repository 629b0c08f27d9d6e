"""The Airflow layer outside a DAG run: the MLflow hook and the DAG the factory builds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_REGISTRY_URI", "AIRFLOW_CONN_MLFLOW_DEFAULT")


def _isolate_mlflow_env(monkeypatch):
    """configure() exports to os.environ: register each variable with monkeypatch first (set, then delete), so
    that whatever the hook writes is undone after the test and nothing leaks into later tests."""
    for k in MLFLOW_ENV:
        monkeypatch.setenv(k, "placeholder")
        monkeypatch.delenv(k)


def test_mlflow_hook_reads_the_connection_and_keeps_credentials_out_of_the_uri(monkeypatch):
    from qops_airflow.hooks import MlflowHook

    _isolate_mlflow_env(monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_TEST",
                       '{"conn_type": "qops_mlflow", "host": "127.0.0.1", "port": 5000, "login": "u", "password": "s3cret"}')
    uri = MlflowHook("mlflow_test").configure()
    assert uri == "http://127.0.0.1:5000" == os.environ["MLFLOW_TRACKING_URI"]
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "u" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert "s3cret" not in uri


def test_mlflow_hook_extra_tracking_uri_and_no_connection(monkeypatch):
    from qops_airflow.hooks import MlflowHook

    _isolate_mlflow_env(monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_X", '{"conn_type": "qops_mlflow", "extra": {"tracking_uri": "sqlite:///x.db"}}')
    assert MlflowHook("mlflow_x").configure() == "sqlite:///x.db"
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_T", '{"conn_type": "qops_mlflow", "host": "mlflow.example", "schema": "https", '
                       '"extra": {"token": "tok-123"}}')
    assert MlflowHook("mlflow_t").configure() == "https://mlflow.example"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "tok-123"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///y.db")
    assert MlflowHook(None).configure() is None  # no connection applies: the caller keeps the spec's URI or the env
    assert MlflowHook().configure() is None  # the default connection id, not defined here: the same
    with pytest.raises(Exception, match="mlflow_missing"):  # a named connection that does not exist is an error
        MlflowHook("mlflow_missing").configure()
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", '{"conn_type": "qops_mlflow", "extra": '
                       '{"tracking_uri": "sqlite:///default.db", "registry_uri": "sqlite:///reg.db"}}')
    assert MlflowHook().configure() == "sqlite:///default.db" and os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///reg.db"
    client = MlflowHook().get_conn()
    assert client.tracking_uri == "sqlite:///default.db" and client._registry_uri == "sqlite:///reg.db"


def test_the_connection_wins_over_the_specs_tracking_uri(monkeypatch, tmp_path):
    """docs/airflow.md: with mlflow_conn_id, the connection's URI is the one the stages use, whatever the spec says;
    without one, the spec's."""
    import yaml

    from qops_airflow.operators import QopsCardOperator

    _isolate_mlflow_env(monkeypatch)
    spec = yaml.safe_load((REPO / "dags" / "specs" / "german_credit.yaml").read_text())
    spec.setdefault("mlflow", {})["tracking_uri"] = "sqlite:///from-the-spec.db"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_W", '{"conn_type": "qops_mlflow", "extra": {"tracking_uri": "sqlite:///conn.db"}}')
    op = QopsCardOperator(task_id="t", spec_path=str(path), target="x86_64_vnni_int8", mlflow_conn_id="mlflow_w")
    assert op._spec().mlflow.tracking_uri == "sqlite:///conn.db"
    op = QopsCardOperator(task_id="t2", spec_path=str(path), target="x86_64_vnni_int8")
    assert op.mlflow_conn_id == "mlflow_default" and "mlflow_conn_id" in op.template_fields
    assert op._spec().mlflow.tracking_uri == "sqlite:///from-the-spec.db"  # mlflow_default is not defined here
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", '{"conn_type": "qops_mlflow", "extra": '
                       '{"tracking_uri": "sqlite:///default.db"}}')
    assert op._spec().mlflow.tracking_uri == "sqlite:///default.db"  # defined: the default connection is used


def test_mlflow_hook_tests_leave_the_environment_as_they_found_it():
    """Runs after the two tests above (file order): none of their exports survived them."""
    assert os.environ.get("MLFLOW_TRACKING_PASSWORD") != "s3cret" and os.environ.get("MLFLOW_TRACKING_TOKEN") != "tok-123"
    assert os.environ.get("MLFLOW_TRACKING_URI") not in ("sqlite:///x.db", "sqlite:///y.db", "http://127.0.0.1:5000",
                                                         "sqlite:///default.db")
    assert os.environ.get("MLFLOW_REGISTRY_URI") != "sqlite:///reg.db"


def test_the_provider_declares_its_connection_form():
    """Airflow's ProvidersManager reads the connection type, its form fields (the token a password field) and the
    field behaviour from the provider info, as the UI's connection form does."""
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    widgets = pm.connection_form_widgets
    assert {f"extra__qops_mlflow__{f}" for f in ("tracking_uri", "registry_uri", "token")} <= set(widgets)
    assert widgets["extra__qops_mlflow__token"].is_sensitive
    assert pm.field_behaviours["qops_mlflow"]["hidden_fields"] == ["extra"]
    assert pm.hooks["qops_mlflow"].hook_class_name == "qops_airflow.hooks.MlflowHook"


def test_dag_factory_builds_the_pipeline_from_the_spec(monkeypatch, tmp_path):
    monkeypatch.setenv("QOPS_HOME", str(tmp_path))
    from qops_airflow.dag_factory import build_quantization_dag

    dag = build_quantization_dag(REPO / "dags" / "specs" / "german_credit.yaml", dag_id="t")
    ids = set(dag.task_ids)
    for target in ("x86_64_vnni_int8", "x86_64_int8_dynamic", "arm64_int8"):
        assert {f"{target}.{s}" for s in ("quantize", "evaluate", "gate", "card", "register")} <= ids
    assert {"resolve_source", "calibrate", "summary", "fail_run_if_any_task_failed"} <= ids
    gate = dag.get_task("arm64_int8.gate")
    assert gate.queue == "cpu" and gate.template_fields == ("spec_path", "run_key", "target", "mlflow_conn_id")
    assert {link.name for link in gate.operator_extra_links} == {"MLflow model", "Model card"}
    assert dag.get_task("arm64_int8.card").trigger_rule == "all_done"
    # the spec's qat block: a qat task between gate and card for arm64_int8 only, retried (it resumes)
    qat = dag.get_task("arm64_int8.qat")
    assert qat.upstream_task_ids == {"arm64_int8.gate"} and qat.downstream_task_ids == {"arm64_int8.card",
                                                                                        "fail_run_if_any_task_failed"}
    assert qat.retries == 2 and qat.queue == "cpu" and "x86_64_vnni_int8.qat" not in ids
    assert dag.get_task("fail_run_if_any_task_failed").trigger_rule == "one_failed"
    assert dag.get_task("fail_run_if_any_task_failed").upstream_task_ids == ids - {"fail_run_if_any_task_failed"}


def test_the_dag_and_qops_run_read_one_stage_table(monkeypatch, tmp_path):
    """Every task of the DAG is a (stage, target) of the plan `qops run` executes, with the table's queue, retries
    and trigger rule, and nothing else but the watcher."""
    import yaml

    monkeypatch.setenv("QOPS_HOME", str(tmp_path))
    from qops.pipeline import plan
    from qops.spec import load_spec
    from qops_airflow.dag_factory import build_quantization_dag

    raw = yaml.safe_load((REPO / "dags" / "specs" / "german_credit.yaml").read_text())
    raw["mlflow"]["promotion"] = {"alias": "production"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "spec.yaml")
    dag = build_quantization_dag(tmp_path / "spec.yaml", dag_id="t")
    steps = plan(spec)
    ids = {f"{t}.{st.task_id}" if t else st.task_id: (st, t) for st, t in steps}
    assert set(dag.task_ids) == set(ids) | {"fail_run_if_any_task_failed"}
    assert [st.name for st, t in steps if t == "arm64_int8"] == ["quantize", "evaluate", "gate", "qat", "card",
                                                                   "register", "promote"]
    for task_id, (st, t) in ids.items():
        task = dag.get_task(task_id)
        assert (task.trigger_rule == "all_done") == st.after_failure, task_id
        assert task.retries == (st.retries or task.retries), task_id
        if st.queue(spec, t):
            assert task.queue == st.queue(spec, t), task_id


def test_dag_factory_adds_a_promote_task_when_the_spec_has_a_promotion_policy(monkeypatch, tmp_path):
    import yaml

    monkeypatch.setenv("QOPS_HOME", str(tmp_path))
    from qops_airflow.dag_factory import build_quantization_dag

    raw = yaml.safe_load((REPO / "dags" / "specs" / "german_credit.yaml").read_text())
    raw["mlflow"]["promotion"] = {"alias": "production", "require_approval": True,
                                  "better_on": {"quantized_accuracy": "max"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    dag = build_quantization_dag(tmp_path / "spec.yaml", dag_id="p")
    promote = dag.get_task("arm64_int8.promote")
    assert promote.upstream_task_ids == {"arm64_int8.register"}
    assert promote.approved == "{{ (dag_run.conf or {}).get('approve_promotion', False) }}"
    assert "approved" in promote.template_fields


def test_dag_factory_asks_a_person_before_promote_with_approval_airflow(monkeypatch, tmp_path):
    """mlflow.promotion.approval: airflow puts Airflow's ApprovalOperator between register and promote in each
    target's group; without it the DAG has the same task ids and edges as before."""
    import yaml
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    monkeypatch.setenv("QOPS_HOME", str(tmp_path))
    from qops_airflow.dag_factory import build_quantization_dag

    raw = yaml.safe_load((REPO / "dags" / "specs" / "german_credit.yaml").read_text())
    raw["mlflow"]["promotion"] = {"alias": "production"}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(raw))
    raw["mlflow"]["promotion"]["approval"] = "airflow"
    (tmp_path / "asked.yaml").write_text(yaml.safe_dump(raw))
    plain = build_quantization_dag(tmp_path / "plain.yaml", dag_id="plain")
    asked = build_quantization_dag(tmp_path / "asked.yaml", dag_id="asked")
    targets = ("x86_64_vnni_int8", "x86_64_int8_dynamic", "arm64_int8")
    assert set(asked.task_ids) == set(plain.task_ids) | {f"{t}.approve_promotion" for t in targets}
    assert asked.get_task("fail_run_if_any_task_failed").upstream_task_ids == set(asked.task_ids) - {
        "fail_run_if_any_task_failed"}
    assert not any("approve" in t for t in plain.task_ids)
    assert plain.get_task("arm64_int8.promote").upstream_task_ids == {"arm64_int8.register"}
    for t in targets:
        ask = asked.get_task(f"{t}.approve_promotion")
        assert isinstance(ask, ApprovalOperator) and ask.options == ["Approve", "Reject"]
        assert ask.upstream_task_ids == {f"{t}.register"}
        assert ask.downstream_task_ids == {f"{t}.promote", "fail_run_if_any_task_failed"}
        assert asked.get_task(f"{t}.promote").upstream_task_ids == {f"{t}.approve_promotion"}
        assert asked.get_task(f"{t}.promote").approved is True  # it runs only on Approve (Reject skips it)
        assert ask.target == t and ask.run_key == "{{ run_id }}" and "reason" in ask.params
        assert ask.trigger_rule == "all_success"  # nothing registered (register skipped): nothing to ask
        assert ask.response_timeout is None and not ask.assigned_users  # waits for anyone who may act on the DAG
    # who may answer, and how long it waits before Reject
    from datetime import timedelta

    raw["mlflow"]["promotion"].update(approvers=["alice", "bob"], approval_timeout_hours=48)
    (tmp_path / "bounded.yaml").write_text(yaml.safe_dump(raw))
    ask = build_quantization_dag(tmp_path / "bounded.yaml", dag_id="bounded").get_task("arm64_int8.approve_promotion")
    assert ask.response_timeout == timedelta(hours=48) and ask.defaults == ["Reject"]
    assert [u["id"] for u in ask.assigned_users] == ["alice", "bob"]
    # everything else is wired as without the option
    asks = {f"{t}.approve_promotion" for t in targets}
    for task_id in plain.task_ids:
        if not task_id.endswith(".promote"):
            assert asked.get_task(task_id).upstream_task_ids - asks == plain.get_task(task_id).upstream_task_ids, \
                task_id


def test_an_unknown_approval_value_is_a_spec_error(tmp_path):
    import yaml

    from qops.errors import SpecError
    from qops.spec import load_spec

    raw = yaml.safe_load((REPO / "dags" / "specs" / "german_credit.yaml").read_text())
    raw["mlflow"]["promotion"] = {"alias": "production", "approval": "slack"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"mlflow\.promotion\.approval: Input should be 'airflow'"):
        load_spec(tmp_path / "spec.yaml")
    r = subprocess.run([sys.executable, "-m", "qops.cli", "run", str(tmp_path / "spec.yaml")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "mlflow.promotion.approval: Input should be 'airflow'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    raw["mlflow"]["promotion"] = {"alias": "production", "approvers": ["alice"]}  # without approval: airflow
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="approvers and approval_timeout_hours apply to approval: airflow"):
        load_spec(tmp_path / "spec.yaml")


def test_dag_factory_puts_qlora_between_source_and_calibration(monkeypatch, tmp_path):
    """The LLM example's spec with a qlora block: finetune on its queue, retried (it resumes from checkpoints)."""
    import yaml

    monkeypatch.setenv("QOPS_HOME", str(tmp_path))
    from qops_airflow.dag_factory import build_quantization_dag

    raw = yaml.safe_load((REPO / "dags" / "specs" / "tiny_llama.yaml").read_text())
    raw["qlora"] = {"steps": 50, "queue": "gpu"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    dag = build_quantization_dag(tmp_path / "spec.yaml", dag_id="l")
    ft = dag.get_task("qlora_finetune")
    assert ft.upstream_task_ids == {"resolve_source"} and dag.get_task("calibrate").upstream_task_ids == {
        "qlora_finetune"}
    assert ft.queue == "gpu" and ft.retries == 2
    assert dag.get_task("llm_int4_gptq.quantize").queue == "cpu"
    assert "qlora_finetune" not in build_quantization_dag(REPO / "dags" / "specs" / "tiny_llama.yaml",
                                                          dag_id="m").task_ids


def test_registry_outages_are_retried_bad_input_is_not():
    """An outage (nothing half-registered) propagates as itself, so Airflow's retries — on by default for
    the register task, with backoff — run; bad input fails the task at once."""
    import pytest
    from airflow.sdk.exceptions import AirflowFailException

    from qops.errors import RegistryError, RegistryUnavailable
    from qops_airflow.operators import QopsRegisterOperator

    op = QopsRegisterOperator(task_id="register", spec_path="spec.yaml", target="x86_64_vnni_int8")
    assert op.retries == 3 and op.retry_exponential_backoff == 2.0

    def outage():
        raise RegistryUnavailable("the server did not answer", "retry")

    def bad():
        raise RegistryError("model card missing", "run the card stage")

    with pytest.raises(RegistryUnavailable):
        op._call(outage)
    with pytest.raises(AirflowFailException, match="model card missing"):
        op._call(bad)
