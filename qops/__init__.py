"""qops: quantization pipeline core (calibration, PTQ, gates, model cards, MLflow registry).

This package never imports Airflow; the Airflow layer lives in ``qops_airflow``.
"""

__version__ = "0.1.0"

from qops.errors import QopsError  # noqa: E402

__all__ = ["QopsError", "__version__"]
