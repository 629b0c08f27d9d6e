"""Build the quantization DAG from the pipeline spec (the same spec `qops run` executes)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Asset, TaskGroup

from qops_airflow.operators import (
    QopsCalibrateOperator,
    QopsCardOperator,
    QopsEvaluateOperator,
    QopsFinetuneOperator,
    QopsGateOperator,
    QopsPromoteOperator,
    QopsQatOperator,
    QopsQuantizeOperator,
    QopsRegisterOperator,
    QopsSourceOperator,
    QopsSummaryOperator,
    QopsWatcherOperator,
)


def spec_asset(uri: str, watchers=None) -> Asset:
    """The Asset a retraining DAG updates and the quantization DAG is scheduled on."""
    return Asset(uri=uri, name=uri, watchers=watchers or [])


def schedule_assets(spec):
    """``schedule_asset`` and, with ``watch``, the registry alias watcher (on the same Asset when its URI is
    ``mlflow://NAME/ALIAS``, so retraining DAGs and promotions made anywhere else both trigger the run)."""
    from airflow.sdk import AssetWatcher

    from qops.alias_events import asset_uri
    from qops_airflow.triggers import MlflowAliasTrigger

    assets = []
    watched = spec.watched_alias() if spec.watch else None
    watch_uri = asset_uri(*watched) if watched else None
    watchers = []
    if watched:
        watchers = [AssetWatcher(name=f"qops_{watched[0]}_{watched[1]}_alias".replace("-", "_"),
                                 trigger=MlflowAliasTrigger(watched[0], watched[1], spec.mlflow.tracking_uri,
                                                            spec.watch.poll_interval_s, spec.watch.fire_on_start))]
    if spec.schedule_asset:
        assets.append(spec_asset(spec.schedule_asset, watchers if spec.schedule_asset == watch_uri else None))
    if watched and spec.schedule_asset != watch_uri:
        assets.append(spec_asset(watch_uri, watchers))
    if len(assets) == 2:
        return assets[0] | assets[1]  # either one (a list would wait for both)
    return assets or None


def build_quantization_dag(spec_path: str | Path, dag_id: str | None = None, mlflow_conn_id: str | None = None,
                           **dag_kwargs) -> DAG:
    """One DAG per spec: source -> calibrate -> per target (quantize -> evaluate -> gate [-> qat] -> card -> register)
    -> summary, and a watcher task that fails the run if any task failed. Scheduled on ``spec.schedule_asset``
    when set. Target tasks go to the target's queue."""
    from qops.spec import load_spec

    spec_path = str(Path(spec_path).resolve())
    spec = load_spec(spec_path)
    schedule = schedule_assets(spec)
    dag_kwargs.setdefault("start_date", datetime(2026, 1, 1))
    dag_kwargs.setdefault("catchup", False)
    dag_kwargs.setdefault("tags", ["qops", "quantization"])
    common = {"spec_path": spec_path, "mlflow_conn_id": mlflow_conn_id}
    with DAG(dag_id or f"qops_{spec.name.replace('-', '_')}_quantize", schedule=schedule,
             doc_md=f"Quantization pipeline `{spec.name}` built from `{Path(spec_path).name}`.", **dag_kwargs) as dag:
        source = QopsSourceOperator(task_id="resolve_source", **common)
        calibrate = QopsCalibrateOperator(task_id="calibrate", **common)
        summary = QopsSummaryOperator(task_id="summary", **common)
        if spec.qlora is not None:  # QLoRA: the merged model replaces the source before calibration
            finetune = QopsFinetuneOperator(task_id="qlora_finetune", queue=spec.qlora.queue, **common)
            source >> finetune >> calibrate
        else:
            source >> calibrate
        for target in spec.targets:
            queue = spec.recipe(target).queue
            with TaskGroup(group_id=target):
                kw = {**common, "target": target, "queue": queue}
                chain = [QopsQuantizeOperator(task_id="quantize", **kw), QopsEvaluateOperator(task_id="evaluate", **kw),
                         QopsGateOperator(task_id="gate", **kw)]
                plan = spec.qat_plan(target)
                if plan is not None:  # QAT on the queue its scheme needs (CUDA schemes: gpu)
                    chain.append(QopsQatOperator(task_id="qat", **{**kw, "queue": plan.queue}))
                chain += [QopsCardOperator(task_id="card", **kw), QopsRegisterOperator(task_id="register", **kw)]
                if spec.mlflow.promotion is not None:  # move the serving alias by policy
                    chain.append(QopsPromoteOperator(task_id="promote", **kw))
            calibrate >> chain[0]
            for a, b in zip(chain, chain[1:]):
                a >> b
            chain[-1] >> summary
        watcher = QopsWatcherOperator(task_id="fail_run_if_any_task_failed")
        for task in dag.tasks:
            if task is not watcher:
                task >> watcher
    return dag
