"""The registry alias watcher: fires when an alias moves (set through MlflowClient, as the MLflow UI does), keeps
its watermark in the registry across restarts, and the DAG factory schedules the quantization DAG on it."""

from __future__ import annotations

import asyncio

import pytest
from mlflow import MlflowClient

from qops.quantize import quantize
from qops.registry import register


@pytest.fixture
def versions(mlflow_uri, fp32_model, tmp_path):
    q = tmp_path / "q.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", q)
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    out = []
    for i in range(2):
        out.append(register(model_path=q, name="watched", run_key=f"k{i}", gate_passed=True, card_files=[card],
                            tags={"qops.target": "t"}, promote=False).version)
    MlflowClient().set_registered_model_alias("watched", "champion", out[0])
    return mlflow_uri, out


def _watch(trigger) -> tuple[asyncio.Queue, asyncio.Task]:
    """Run the trigger as the triggerer does, collecting its events (cancelling a wait must not stop it)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def consume():
        async for ev in trigger.run():
            await queue.put(ev)

    return queue, asyncio.create_task(consume())


def test_alias_moves_fire_once_each_and_survive_a_restart(versions):
    from qops.alias_events import WATERMARK_TAG
    from qops_airflow.triggers import MlflowAliasTrigger

    uri, (v1, v2) = versions
    client = MlflowClient()

    async def scenario():
        events, task = _watch(MlflowAliasTrigger("watched", "champion", uri, poll_interval=0.05))
        with pytest.raises(asyncio.TimeoutError):  # first start: records v1, no event
            await asyncio.wait_for(events.get(), 1.0)
        assert client.get_registered_model("watched").tags[WATERMARK_TAG.format(alias="champion")] == v1
        client.set_registered_model_alias("watched", "champion", v2)  # a promotion made elsewhere
        ev = await asyncio.wait_for(events.get(), 10.0)
        assert ev.payload == {"model_name": "watched", "alias": "champion", "version": v2, "previous": v1,
                              "model_uri": f"models:/watched/{v2}", "via": "poller"}
        with pytest.raises(asyncio.TimeoutError):  # one move, one event
            await asyncio.wait_for(events.get(), 1.0)
        task.cancel()
        # a restarted triggerer: the watermark (v2) is in the registry, so no second event for the same move
        events, task = _watch(MlflowAliasTrigger("watched", "champion", uri, poll_interval=0.05))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(events.get(), 1.0)
        client.set_registered_model_alias("watched", "champion", v1)
        ev = await asyncio.wait_for(events.get(), 10.0)
        assert (ev.payload["version"], ev.payload["previous"]) == (v1, v2)
        task.cancel()

    asyncio.run(scenario())
    cls, kwargs = MlflowAliasTrigger("watched", "champion", uri, poll_interval=5).serialize()
    assert cls == "qops_airflow.triggers.MlflowAliasTrigger" and kwargs["poll_interval"] == 5.0


def test_the_source_task_resolves_the_version_an_event_names():
    from types import SimpleNamespace

    from qops_airflow.triggers import source_from_events

    ev = SimpleNamespace(extra={"from_trigger": True, "payload": {"model_name": "m", "model_uri": "models:/m/7"}})
    other = SimpleNamespace(extra={"payload": {"model_name": "other", "model_uri": "models:/other/1"}})
    assert source_from_events({"triggering_asset_events": {"a": [other, ev]}}, "m") == "models:/m/7"
    assert source_from_events({"triggering_asset_events": {}}, "m") is None


def test_dag_factory_schedules_on_the_alias_watcher(monkeypatch, tmp_path):
    from pathlib import Path

    import yaml

    from qops_airflow.dag_factory import build_quantization_dag
    from qops_airflow.triggers import MlflowAliasTrigger

    monkeypatch.setenv("QOPS_HOME", str(tmp_path))
    repo = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((repo / "dags" / "specs" / "german_credit.yaml").read_text())
    raw["watch"] = {"poll_interval_s": 10}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    dag = build_quantization_dag(tmp_path / "spec.yaml", dag_id="w")
    cond = dag.timetable.asset_condition
    assets = list(getattr(cond, "objects", [cond]))
    assert [a.uri for a in assets] == ["mlflow://german-credit/champion"]  # retraining and promotions: one Asset
    (watcher,) = assets[0].watchers
    assert isinstance(watcher.trigger, MlflowAliasTrigger)
    assert (watcher.trigger.model_name, watcher.trigger.alias, watcher.trigger.poll_interval) == (
        "german-credit", "champion", 10.0)
    raw["source_model"] = "some.onnx"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    from qops.errors import SpecError
    from qops.spec import load_spec

    with pytest.raises(SpecError, match="watch needs source_model as models:/NAME@ALIAS"):
        load_spec(tmp_path / "bad.yaml")
