"""Human approval of a promotion, for real (mlflow.promotion.approval: airflow): the stack of scripts/native_stack.py
on loopback (PostgreSQL, Redis, MLflow, the Airflow api-server, scheduler, dag-processor, triggerer and one Celery
worker), a DAG built by the factory from a spec asking for approval, two DAG runs whose approval tasks wait; one is
approved and one rejected with a reason through the REST API (PATCH .../taskInstances/{task}/{map_index}/hitlDetails,
as an operator's script or the UI's Required Actions page answers), and the registry is checked with MlflowClient.

Needs Debian's postgresql and redis-server (`.ci/run` installs them); skipped where they are missing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from native_stack import NativeStack, missing_tools  # noqa: E402

DAG_ID, TARGET = "approval_quantize", "x86_64_vnni_int8"
ASK = f"{TARGET}.approve_promotion"
DAG = '''
from pathlib import Path
from qops_airflow.dag_factory import build_quantization_dag
dag = build_quantization_dag(Path(__file__).parent / "specs" / "approval.yaml", dag_id="approval_quantize")
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"{missing} needed for the system test (.ci/run installs postgresql and redis-server)")
    from planted_models import planted_pipeline_spec

    home = tmp_path_factory.mktemp("approval")
    (home / "planted").mkdir()
    dags = home / "dags"
    (dags / "specs").mkdir(parents=True)
    spec = planted_pipeline_spec(home / "planted", name="approval")
    (dags / "specs" / "approval.yaml").write_text(yaml.safe_dump(spec))
    (dags / f"{DAG_ID}.py").write_text(DAG)
    with NativeStack(home, dags, queues=("cpu",)) as s:
        s.wait_dag(DAG_ID)
        yield s


def _hitl(stack, run_id: str) -> str:
    return f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{ASK}/-1/hitlDetails"


def _awaiting(stack, run_id: str, seconds: float = 600) -> dict:
    """Until the approval task waits for an answer: its HITL detail (subject, body, options)."""
    deadline = time.time() + seconds
    while True:
        state = stack.task_instances(DAG_ID, run_id).get(ASK, {}).get("state")
        if state == "awaiting_input":
            return stack.call("GET", _hitl(stack, run_id))
        assert state not in ("failed", "skipped", "upstream_failed"), stack.task_instances(DAG_ID, run_id)
        assert time.time() < deadline, f"{ASK} not waiting after {seconds} s: {state}; logs in {stack.logs}"
        time.sleep(2)


def _registered(stack, run_id: str) -> str:
    xcom = stack.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TARGET}.register/xcomEntries/"
                             "return_value?deserialize=true")["value"]
    return str(xcom["version"])


def test_approve_moves_the_alias_reject_leaves_it_and_both_are_recorded(stack):
    from mlflow import MlflowClient

    client, name = MlflowClient(stack.mlflow_uri), "model-x86-64-vnni-int8"
    yes, no = stack.trigger(DAG_ID), stack.trigger(DAG_ID)
    asked = _awaiting(stack, yes)
    v_yes = _registered(stack, yes)
    assert asked["options"] == ["Approve", "Reject"] and asked["response_received"] is False
    assert asked["subject"] == f"Promote {name} v{v_yes} to @production? (approval, {TARGET})"
    body = asked["body"]
    assert f"| **{TARGET}** | **ptq** | **passed** | **accuracy " in body and "x smaller)" in body
    assert "card.html](file://" in body and f"/#/models/{name}/versions/{v_yes})" in body
    # nothing moves while the request waits
    assert stack.task_instances(DAG_ID, yes)[f"{TARGET}.promote"]["state"] in (None, "none", "scheduled")

    answer = stack.call("PATCH", _hitl(stack, yes), {"chosen_options": ["Approve"], "params_input": {"reason": "ok"}})
    assert answer["chosen_options"] == ["Approve"] and answer["responded_by"]["name"] == "Anonymous"
    assert stack.wait_run(DAG_ID, yes) == "success", stack.task_instances(DAG_ID, yes)
    assert str(client.get_model_version_by_alias(name, "production").version) == v_yes
    tags = client.get_model_version(name, v_yes).tags
    assert (tags["qops.approval"], tags["qops.approval.by"], tags["qops.approval.reason"]) == (
        "approved", "Anonymous", "ok")
    assert tags["qops.promoted.production"].endswith(f"by approval run {yes}")

    _awaiting(stack, no)
    v_no = _registered(stack, no)
    assert v_no != v_yes
    stack.call("PATCH", _hitl(stack, no), {"chosen_options": ["Reject"],
                                           "params_input": {"reason": "p50 latency too high on the edge box"}})
    assert stack.wait_run(DAG_ID, no) == "success", stack.task_instances(DAG_ID, no)
    tis = stack.task_instances(DAG_ID, no)
    assert tis[ASK]["state"] == "success" and tis[f"{TARGET}.promote"]["state"] == "skipped", tis
    assert tis["summary"]["state"] == "success"
    assert str(client.get_model_version_by_alias(name, "production").version) == v_yes  # the alias stayed
    tags = client.get_model_version(name, v_no).tags
    assert (tags["qops.approval"], tags["qops.approval.by"], tags["qops.approval.reason"],
            tags["qops.approval.alias"]) == ("rejected", "Anonymous", "p50 latency too high on the edge box",
                                             "production")
    assert "qops.promoted.production" not in tags
