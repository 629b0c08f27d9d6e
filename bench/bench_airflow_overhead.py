"""What Airflow adds: a demo spec (German Credit by default, or the news-topics transformer) run three ways in one
session, against one MLflow tracking server, on one retrained model version:

1. ``qops run SPEC`` (no Airflow);
2. ``airflow dags test german_credit_quantize`` (one process, SQLite metadata DB: the demo's way);
3. the production stack of scripts/native_stack.py (PostgreSQL, Redis, CeleryExecutor with a ``cpu`` worker of
   concurrency 1, api-server, scheduler, dag-processor, triggerer), triggered through the REST API v2 and timed
   from the trigger to the run's end state.

Each is one wall-clock measurement of the whole run (the stack's start-up is not counted). Goal: Airflow adds
<= 30 % (ratio <= 1.30).

    .venv/bin/python bench/bench_airflow_overhead.py [--example german_credit|news_topics] [--out bench/results]

Writes ``<out>/airflow_overhead_<example>.md`` (the table for docs/benchmarks.md), ``.json`` and the Celery
run's task timeline ``_timeline.json``.
Needs Debian's postgresql and redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "scripts"))
from bench_quantize import cpu_info  # noqa: E402
from native_stack import BIN, NativeStack  # noqa: E402

EXAMPLES = {  # example -> (spec, DAG id, retraining call run in the venv's python)
    "german_credit": ("german_credit.yaml", "german_credit_quantize",
                      "from qops.examples.german_credit import retrain_and_register as r; "
                      "r(sys.argv[1] + '/retrain', model_name='german-credit')"),
    "news_topics": ("news_topics.yaml", "news_topics_quantize",
                    "from qops.examples.news import retrain_and_register as r; "
                    "r(sys.argv[1] + '/news/retrain', model_name='news-topics')"),
}
DAG = '''
from qops_airflow.dag_factory import build_quantization_dag
dag = build_quantization_dag({spec!r}, dag_id={dag_id!r})
'''


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=env["QOPS_HOME"]).returncode
    return time.perf_counter() - t0, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--example", choices=sorted(EXAMPLES), default="german_credit")
    args = ap.parse_args()
    spec_name, dag_id, retrain = EXAMPLES[args.example]
    spec = REPO / "dags" / "specs" / spec_name
    home = Path(tempfile.mkdtemp(prefix="qops-overhead-"))
    qops_home = home / "qops"
    qops_home.mkdir()
    dags = home / "dags"
    dags.mkdir()
    (dags / f"{dag_id}.py").write_text(DAG.format(spec=str(spec), dag_id=dag_id))
    rows = []
    # Airflow's default parse intervals (the system test shortens them to see new DAG files at once)
    prod = {"QOPS_HOME": str(qops_home), "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "300"}
    with NativeStack(home / "stack", dags, queues=("cpu",), extra_env=prod) as stack:
        env = {**os.environ, "QOPS_HOME": str(qops_home), "MLFLOW_TRACKING_URI": stack.mlflow_uri,
               "PYTHONWARNINGS": "ignore", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        t, rc = timed([sys.executable, "-c", f"import sys; {retrain}", str(qops_home)], env, home / "retrain.log")
        assert rc == 0, (home / "retrain.log").read_text()[-3000:]
        print(f"retrained and registered in {t:.1f} s", flush=True)

        t_cli, rc = timed([str(BIN / "qops"), "run", str(spec), "--run-id", "bench-cli"], env, home / "qops_run.log")
        print(f"qops run: {t_cli:.1f} s (exit {rc})", flush=True)
        rows.append({"how": "`qops run` (no Airflow)", "seconds": t_cli, "exit": rc})

        af_env = {**env, "AIRFLOW_HOME": str(home / "airflow-sqlite"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                  "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=af_env, capture_output=True, check=True,
                       cwd=qops_home)
        t_test, rc = timed([str(BIN / "airflow"), "dags", "test", dag_id], af_env, home / "dags_test.log")
        print(f"airflow dags test: {t_test:.1f} s (exit {rc})", flush=True)
        rows.append({"how": "`airflow dags test` (SQLite, one process)", "seconds": t_test, "exit": rc})

        stack.wait_dag(dag_id)
        t0 = time.perf_counter()
        run_id = stack.trigger(dag_id)
        state = stack.wait_run(dag_id, run_id, seconds=3600, poll=1)
        t_celery = time.perf_counter() - t0
        print(f"CeleryExecutor run: {t_celery:.1f} s ({state})", flush=True)
        tis = stack.task_instances(dag_id, run_id)
        busy = sum(t["duration"] or 0 for t in tis.values())
        timeline = sorted(({"task": k, "queued": t["queued_when"], "start": t["start_date"], "end": t["end_date"],
                            "duration": t["duration"], "state": t["state"]} for k, t in tis.items()),
                          key=lambda r: r["start"] or "")
        (Path(args.out) / f"airflow_overhead_{args.example}_timeline.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"airflow_overhead_{args.example}_timeline.json").write_text(json.dumps(timeline, indent=1))
        rows.append({"how": "CeleryExecutor stack (PostgreSQL, Redis, 1 cpu worker), REST-triggered",
                     "seconds": t_celery, "state": state, "task_seconds": busy, "tasks": len(tis)})
    for r in rows:
        r["ratio"] = r["seconds"] / t_cli
    result = {"machine": cpu_info(), "spec": str(spec.relative_to(REPO)), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"airflow_overhead_{args.example}.json").write_text(json.dumps(result, indent=2))
    lines = [f"Machine: {result['machine']}. Spec: `{result['spec']}`.", "",
             "| how | wall s | vs `qops run` |", "|---|---:|---:|"]
    lines += [f"| {r['how']} | {r['seconds']:.1f} | {r['ratio']:.2f}x |" for r in rows]
    celery = rows[-1]
    lines += ["", f"Celery run: {celery['tasks']} task instances, {celery['task_seconds']:.1f} s inside tasks "
              f"(the rest is scheduling, queueing and task start-up)."]
    (out / f"airflow_overhead_{args.example}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
