"""Celery configuration for qops workers: Airflow's default, plus a preload of the libraries qops' tasks use.

Airflow runs every task in a process forked from the Celery worker, so whatever the worker imported, the task
inherits for free; what it did not import, each task imports again. qops' stages use heavy libraries (Great
Expectations ~4 s, torch/torchao ~3.5 s, scikit-learn ~2 s, MLflow ~1.5 s on a 2-core Xeon), which made each task
start seconds late. With this configuration the worker imports them once, at start (``worker_init``, in the
worker only: the scheduler also reads this module and imports nothing heavy).

    [celery]
    celery_config_options = qops_airflow.celery_config.CELERY_CONFIG

``QOPS_WORKER_PRELOAD``: comma-separated modules to import instead of the default list, or ``none``.
Measured in docs/benchmarks.md (Airflow overhead).
"""

from __future__ import annotations

import importlib
import logging
import os
import time

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import worker_init

log = logging.getLogger(__name__)

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)

PRELOAD = ("qops.pipeline.per_target", "qops.pipeline.prepare", "qops.pipeline.publish", "qops.pipeline.run",
           "qops.evaluate", "qops.gates", "qops.calibration", "qops.quantize", "qops.registry",
           "qops.cards", "numpy", "pandas", "onnx", "onnxruntime", "sklearn.metrics", "great_expectations",
           "fairlearn.metrics", "mlflow", "mlflow.onnx", "torch", "matplotlib.pyplot")


def preload_modules() -> list[str]:
    raw = os.environ.get("QOPS_WORKER_PRELOAD", "").strip()
    if raw.lower() == "none":
        return []
    return [m.strip() for m in raw.split(",") if m.strip()] if raw else list(PRELOAD)


@worker_init.connect
def preload(**_kwargs) -> None:
    """Import the task libraries in the worker before its pool forks (each failure is logged and skipped)."""
    t0, done = time.perf_counter(), []
    for name in preload_modules():
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as e:  # noqa: BLE001 - a missing optional library must not stop the worker
            log.warning("qops worker preload: %s not imported (%s)", name, e)
    log.info("qops worker preload: %d modules in %.1f s", len(done), time.perf_counter() - t0)
