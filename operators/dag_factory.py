"""Build the quantization DAG from the pipeline spec (the same spec `qops run` executes)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Asset, TaskGroup

from qops_airflow.operators import OPERATORS, QopsWatcherOperator


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


def build_quantization_dag(spec_path: str | Path, dag_id: str | None = None,
                           mlflow_conn_id: str | None = "mlflow_default", **dag_kwargs) -> DAG:
    """One DAG per spec, built from qops' stage table (:mod:`qops.pipeline.table`, the graph ``qops run`` runs):
    the run-level stages in a chain (source [-> qlora_finetune] -> calibrate), then per target a task group
    (quantize -> evaluate -> gate [-> qat] -> card -> register [-> approve_promotion] [-> promote]) on the target's
    queue, then summary, and a watcher task that fails the run if any task failed. ``approve_promotion`` (Airflow's
    ApprovalOperator, :mod:`qops_airflow.approval`) only with ``mlflow.promotion.approval: airflow``. Scheduled on
    ``spec.schedule_asset`` when set."""
    from qops.pipeline.table import BY_NAME, RUN_STAGES, TARGET_STAGES
    from qops.spec import load_spec

    spec_path = str(Path(spec_path).resolve())
    spec = load_spec(spec_path)
    schedule = schedule_assets(spec)
    dag_kwargs.setdefault("start_date", datetime(2026, 1, 1))
    dag_kwargs.setdefault("catchup", False)
    dag_kwargs.setdefault("tags", ["qops", "quantization"])
    common = {"spec_path": spec_path, "mlflow_conn_id": mlflow_conn_id}
    approval = None
    if spec.mlflow.promotion is not None and spec.mlflow.promotion.approval == "airflow":
        from qops_airflow.approval import QopsApprovalOperator, approval_options

        approval = QopsApprovalOperator
        approval_kwargs = approval_options(spec.mlflow.promotion)

    def task(st, target=None, **extra):
        kw = {**common, **({"target": target} if target else {}), **extra}
        queue = st.queue(spec, target)
        if queue:
            kw["queue"] = queue
        return OPERATORS[st.name](task_id=st.task_id, **kw)

    with DAG(dag_id or f"qops_{spec.name.replace('-', '_')}_quantize", schedule=schedule,
             doc_md=f"Quantization pipeline `{spec.name}` built from `{Path(spec_path).name}`.", **dag_kwargs) as dag:
        run_chain = [task(st) for st in RUN_STAGES if st.applies(spec)]
        for a, b in zip(run_chain, run_chain[1:]):
            a >> b
        summary = task(BY_NAME["summary"])
        for target in spec.targets:
            with TaskGroup(group_id=target):
                chain = []
                for st in TARGET_STAGES:
                    if not st.applies(spec, target):
                        continue
                    if st.name == "promote" and approval:
                        # a person answers first; the promote task runs only on Approve (Reject skips it)
                        chain.append(approval(task_id=approval.TASK_ID, target=target, **common, **approval_kwargs))
                        chain.append(task(st, target, approved=True))
                    else:
                        chain.append(task(st, target))
            run_chain[-1] >> chain[0]
            for a, b in zip(chain, chain[1:]):
                a >> b
            chain[-1] >> summary
        watcher = QopsWatcherOperator(task_id="fail_run_if_any_task_failed")
        for t in dag.tasks:
            if t is not watcher:
                t >> watcher
    return dag
