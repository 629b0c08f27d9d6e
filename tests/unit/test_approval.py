"""The human approval of a promotion (mlflow.promotion.approval: airflow) without Airflow: the request is read from
the run folder (every target's verdict and metrics, the card and MLflow links), each answer is recorded on the model
version and in approval.json, and the promote stage then needs the approval (tests/integration/test_approval_dag.py
answers a real Airflow's ApprovalOperator through the REST API)."""

from __future__ import annotations

import json

import pytest
import yaml
from planted_models import planted_pipeline_spec


def test_the_request_shows_the_run_and_each_answer_is_recorded(tmp_path, mlflow_uri):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from qops.errors import PromotionRefused
    from qops.pipeline import plan
    from qops.pipeline.approval import approval_request, record_decision
    from qops.pipeline.publish import stage_promote
    from qops.spec import load_spec

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(planted_pipeline_spec(tmp_path)))
    spec = load_spec(tmp_path / "spec.yaml")
    steps = plan(spec)
    assert [st.name for st, _ in steps][-2:] == ["promote", "summary"]
    for st, target in steps[:-2]:  # up to register: what the DAG has done when it asks
        st.fn(spec, "r1", target) if st.per_target else st.fn(spec, "r1")

    req = approval_request(spec, "r1", "x86_64_vnni_int8", "http://mlflow.example:5000/")
    name, version = req["name"], req["version"]
    assert (name, version, req["alias"]) == ("model-x86-64-vnni-int8", "1", "production")
    assert req["subject"] == "Promote model-x86-64-vnni-int8 v1 to @production? (planted-approval, x86_64_vnni_int8)"
    body = req["body"]
    assert "| **x86_64_vnni_int8** | **ptq** | **passed** | **accuracy " in body  # the verdict and metric row
    assert "x smaller)" in body and "x faster)" in body and "model-x86-64-vnni-int8 v1" in body
    tdir = tmp_path / "artifacts" / "planted-approval" / "r1" / "targets" / "x86_64_vnni_int8"
    assert f"[card.html]({(tdir / 'card' / 'card.html').resolve().as_uri()})" in body
    assert "[model-x86-64-vnni-int8 v1](http://mlflow.example:5000/#/models/model-x86-64-vnni-int8/versions/1)" in body

    client = MlflowClient()
    # Reject: the answer and the reason on the version, the alias untouched
    out = record_decision(spec, "r1", "x86_64_vnni_int8", approved=False, by="alice", reason="  latency on arm  ")
    assert out["decision"] == "rejected" and json.loads((tdir / "approval.json").read_text()) == out
    tags = client.get_model_version(name, version).tags
    assert {k: tags[k] for k in ("qops.approval", "qops.approval.by", "qops.approval.reason",
                                 "qops.approval.alias")} == {"qops.approval": "rejected", "qops.approval.by": "alice",
                                                             "qops.approval.reason": "latency on arm",
                                                             "qops.approval.alias": "production"}
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "production")
    # approval: airflow makes the approval mandatory for the promote stage too (qops run needs --approve)
    with pytest.raises(PromotionRefused, match="needs a manual approval"):
        stage_promote(spec, "r1", "x86_64_vnni_int8", approved=False)

    # Approve: recorded, and the promote stage moves the alias
    record_decision(spec, "r1", "x86_64_vnni_int8", approved=True, by="bob", reason=None)
    tags = client.get_model_version(name, version).tags
    assert (tags["qops.approval"], tags["qops.approval.by"], tags["qops.approval.reason"]) == ("approved", "bob", "")
    assert stage_promote(spec, "r1", "x86_64_vnni_int8", approved=True)["promoted"]
    assert str(client.get_model_version_by_alias(name, "production").version) == version
    row = steps[-1][0].fn(spec, "r1")["targets"][0]  # the summary shows the answer
    assert row["approval"]["decision"] == "approved" and row["approval"]["by"] == "bob"


def test_nothing_registered_nothing_to_ask(tmp_path):
    from qops.pipeline.approval import approval_request
    from qops.spec import load_spec

    raw = planted_pipeline_spec(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    res = approval_request(load_spec(tmp_path / "spec.yaml"), "r0", "x86_64_vnni_int8")
    assert res["skipped"] and "nothing was registered for x86_64_vnni_int8" in res["reason"]
    raw["mlflow"]["promotion"].pop("approval")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    res = approval_request(load_spec(tmp_path / "spec.yaml"), "r0", "x86_64_vnni_int8")
    assert res["skipped"] and "no mlflow.promotion.approval" in res["reason"]
