"""MLflow runs that users can browse: one parent run per pipeline run, one nested run per target (registered or
not) with the target's overall and per-slice metrics, their interval bounds, the gate verdict per check, the
tuning trials, the card, and the calibration and validation sets as MLflow datasets.

Both runs are found again by tags, so a retried register stage reuses them: the parent by ``qops.pipeline_run``
(``<pipeline>|<run id>``), a target's run by that tag, ``qops.target`` and its parent. Parents are created under a
file lock in the run folder (and a lock between the threads of one process) and, against attempts from other
artifact roots, checked after creation: an attempt that finds an earlier parent than its own deletes its own before
anything is logged into it (best effort: two attempts that each see only their own parent keep both)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

from qops.locks import FileLock
from qops.redact import redact

log = logging.getLogger(__name__)

PIPELINE_RUN_TAG = "qops.pipeline_run"
KIND_TAG = "qops.run_kind"  # pipeline | target
PARENT_TAG = "mlflow.parentRunId"
_BAD = re.compile(r"[^\w.\- /]+")
_MAX_KEY = 250
_CREATING = threading.Lock()  # file locks are re-entrant within a process: threads of one process wait here


def metric_key(text: str) -> str:
    """An MLflow metric/tag name for a check or slice name: ``slice_drop[accuracy:sex=female & age=old]`` →
    ``slice_drop/accuracy/sex/female/age/old``; other characters MLflow refuses become ``_``; names too long for
    MLflow keep a hash of the whole."""
    key = re.sub(r"\s*&\s*", "/", text)
    key = key.replace("[", "/").replace("]", "").replace("=", "/").replace(":", "/")
    key = _BAD.sub("_", key)
    key = "/".join(p.strip(" .") or "_" for p in key.split("/") if p.strip())
    if len(key) > _MAX_KEY:
        key = key[:_MAX_KEY - 13] + "_" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return key


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _entry_metrics(prefix: str, metric: str, entry: dict) -> dict[str, float]:
    """``fp32_<m>``, ``quantized_<m>``, ``delta_<m>`` and the delta's interval ``delta_<m>_ci_low``/``_ci_high``."""
    out = {}
    for field, name in (("fp32", f"fp32_{metric}"), ("quantized", f"quantized_{metric}"),
                        ("delta", f"delta_{metric}"), ("ci_low", f"delta_{metric}_ci_low"),
                        ("ci_high", f"delta_{metric}_ci_high")):
        v = _num(entry.get(field))
        if v is not None:
            out[prefix + metric_key(name)] = v
    return out


def evaluation_metrics(ev: dict) -> dict[str, float]:
    """The metrics of an evaluation (``evaluation.json``): overall per metric, per slice under
    ``slice/<column>/<value>/`` (and ``slice/.../rows``), and the performance numbers (``latency_p50_ms``,
    ``size_bytes``: the quantized model's; ``fp32_latency_p50_ms``, ``fp32_size_bytes``, the ratios)."""
    out: dict[str, float] = {}
    for m, entry in (ev.get("overall") or {}).items():
        out.update(_entry_metrics("", m, entry))
    for s in ev.get("slices") or []:
        prefix = f"slice/{metric_key(s['key'])}/"
        if s.get("n") is not None:
            out[prefix + "rows"] = float(s["n"])
        for m, entry in (s.get("metrics") or {}).items():
            out.update(_entry_metrics(prefix, m, entry))
    perf = ev.get("performance") or {}
    for k in ("latency_p50_ms", "latency_p90_ms", "size_bytes"):
        v = perf.get(k)
        if isinstance(v, dict):
            for side, name in (("quantized", k), ("fp32", f"fp32_{k}")):
                if _num(v.get(side)) is not None:
                    out[name] = float(v[side])
    for k in ("latency_ratio", "size_ratio"):
        if _num(perf.get(k)) is not None:
            out[k] = float(perf[k])
    return out


def gate_metrics(g: dict) -> tuple[dict[str, float], dict[str, str]]:
    """A gate result (``gate.json``) as metrics ``gate/<check>/passed`` (1 or 0), ``/value``, ``/threshold``,
    ``/interval_low``, ``/interval_high``, ``gate/passed``, and tags ``qops.gate.<check>`` (the evidence's
    status: passed, failed, inconclusive, insufficient_data)."""
    metrics = {"gate/passed": 1.0 if g.get("passed") else 0.0}
    tags = {}
    for c in g.get("checks") or []:
        key = metric_key(c["name"])
        metrics[f"gate/{key}/passed"] = 1.0 if c.get("passed") else 0.0
        for field in ("value", "threshold"):
            if _num(c.get(field)) is not None:
                metrics[f"gate/{key}/{field}"] = float(c[field])
        interval = c.get("interval") or []
        if len(interval) == 2 and all(_num(v) is not None for v in interval):
            metrics[f"gate/{key}/interval_low"], metrics[f"gate/{key}/interval_high"] = map(float, interval)
        tags[f"qops.gate.{key}"] = str(c.get("status") or ("passed" if c.get("passed") else "failed"))
    return metrics, tags


def trials_table(trials: list[dict]):
    """Tuning trials as a DataFrame for ``mlflow.log_table``: nested values (options, failures) as JSON text."""
    import pandas as pd

    rows = [{k: (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v)
             for k, v in t.items()} for t in trials]
    return pd.DataFrame(rows)


def _experiment_id(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    import mlflow

    return mlflow.set_experiment(experiment).experiment_id  # creates it (and tolerates a concurrent creator)


def _runs(client, exp_id: str, filters: list[str]):
    return client.search_runs([exp_id], filter_string=" and ".join(filters), max_results=50,
                              order_by=["attributes.start_time ASC"])


def _quoted(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _earliest(runs):
    return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def pipeline_run(client, *, experiment: str, pipeline: str, run_id: str, lock_path: str | os.PathLike,
                 tags: dict[str, str] | None = None) -> str:
    """The parent run of pipeline run ``run_id``: found by ``qops.pipeline_run``, else created (under the file lock
    ``lock_path``, so sibling target tasks of one run create one parent). Returns its MLflow run id."""
    exp_id = _experiment_id(client, experiment)
    key = f"{pipeline}|{run_id}"
    filters = [f"tags.`{PIPELINE_RUN_TAG}` = {_quoted(key)}", f"tags.`{KIND_TAG}` = 'pipeline'"]
    with _CREATING, FileLock(lock_path, what=f"MLflow parent run of {key}", timeout_s=300):
        found = _runs(client, exp_id, filters)
        if found:
            return _earliest(found).info.run_id
        safe = {k: redact(str(v)) for k, v in (tags or {}).items()}
        run = client.create_run(exp_id, run_name=f"{pipeline} {run_id}",
                                tags={**safe, PIPELINE_RUN_TAG: key, KIND_TAG: "pipeline", "qops.pipeline": pipeline,
                                      "qops.run_id": run_id})
        mine = run.info.run_id
        first = _earliest(_runs(client, exp_id, filters) or [run]).info.run_id
        if first != mine:  # a concurrent attempt from another artifact root got in first: it stays
            client.delete_run(mine)
            log.info("parent run %s of %s was created concurrently: using it", first, key)
        return first


def find_pipeline_run(client, *, experiment: str, pipeline: str, run_id: str) -> str | None:
    """The parent run of pipeline run ``run_id`` when one was created (by a register stage), else None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = _runs(client, exp.experiment_id, [f"tags.`{PIPELINE_RUN_TAG}` = {_quoted(f'{pipeline}|{run_id}')}",
                                              f"tags.`{KIND_TAG}` = 'pipeline'"])
    return _earliest(found).info.run_id if found else None


def target_run(client, *, parent_id: str, pipeline: str, run_id: str, target: str) -> str:
    """The nested run of ``target`` under the parent run: found by its tags, else created (the caller holds the
    target's lock). Returns its MLflow run id."""
    parent = client.get_run(parent_id)
    key = f"{pipeline}|{run_id}"
    filters = [f"tags.`{PIPELINE_RUN_TAG}` = {_quoted(key)}", f"tags.`{KIND_TAG}` = 'target'",
               f"tags.`qops.target` = {_quoted(target)}", f"tags.`{PARENT_TAG}` = {_quoted(parent_id)}"]
    found = _runs(client, parent.info.experiment_id, filters)
    if found:
        return _earliest(found).info.run_id
    run = client.create_run(parent.info.experiment_id, run_name=target,
                            tags={PARENT_TAG: parent_id, PIPELINE_RUN_TAG: key, KIND_TAG: "target",
                                  "qops.pipeline": pipeline, "qops.run_id": run_id, "qops.target": target})
    return run.info.run_id


def log_dataset(client, mlflow_run_id: str, table: str | os.PathLike, *, name: str, context: str,
                label: str | None = None) -> dict | None:
    """Log a parquet/CSV table as an MLflow dataset input of the run (``context``: calibration, validation), with
    MLflow's digest; an input already logged with the same digest is not logged twice. Returns {name, digest,
    rows} or None when the table cannot be read as a table (a data kind that is not one)."""
    import mlflow

    from qops.data import read_table
    from qops.errors import QopsError

    path = Path(table)
    if path.suffix.lower() not in (".parquet", ".pq", ".csv"):
        log.warning("the %s set %s is not a table: not logged as an MLflow dataset", context, path)
        return None
    try:
        df = read_table(path, f"{context} set")
    except (QopsError, OSError, ValueError) as e:
        log.warning("the %s set %s could not be read: not logged as an MLflow dataset (%s)", context, path, e)
        return None
    ds = mlflow.data.from_pandas(df, source=redact(str(path)), name=name,
                                 targets=label if label and label in df.columns else None)
    have = {(i.dataset.digest, i.dataset.name) for i in client.get_run(mlflow_run_id).inputs.dataset_inputs}
    if (ds.digest, ds.name) not in have:
        with mlflow.start_run(run_id=mlflow_run_id):
            mlflow.log_input(ds, context=context)
    return {"name": ds.name, "digest": ds.digest, "rows": int(len(df))}


def log_target(client, mlflow_run_id: str, *, metrics: dict[str, float], params: dict[str, str],
               tags: dict[str, str], card_files: list[str | os.PathLike], trials: list[dict] | None = None) -> None:
    """Log one target's metrics, params (those not logged yet: a retry logs the same), tags (redacted), card files
    (``card/``) and tuning trials (``tuning/trials.json``, once) into its nested run."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    run = client.get_run(mlflow_run_id)
    now = get_current_time_millis()
    new_params = [Param(k, str(v)) for k, v in params.items() if k not in run.data.params]
    items = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
    tag_items = [RunTag(k, redact(str(v))) for k, v in tags.items()]
    for i in range(0, len(items), 1000):  # MLflow's batch limits: 1000 metrics, 100 params, 100 tags
        client.log_batch(mlflow_run_id, metrics=items[i:i + 1000])
    for i in range(0, len(new_params), 100):
        client.log_batch(mlflow_run_id, params=new_params[i:i + 100])
    for i in range(0, len(tag_items), 100):
        client.log_batch(mlflow_run_id, tags=tag_items[i:i + 100])
    for f in card_files:
        client.log_artifact(mlflow_run_id, str(f), artifact_path="card")
    if trials and not client.list_artifacts(mlflow_run_id, "tuning"):
        client.log_table(mlflow_run_id, data=trials_table(trials), artifact_file="tuning/trials.json")


def finish(client, mlflow_run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(mlflow_run_id, status)
