"""MLflow, in four modules: ``client`` (where the tracking server is, whether it answers), ``source`` (fetch the
source model into the run folder), ``registration`` (log and register one quantized model per run key, idempotently)
and ``aliases`` (``candidate``/``champion``, promotion by policy)."""

from qops.registry.aliases import promote, settle_aliases
from qops.registry.client import MODELS_URI, configure_mlflow, mlflow_tracking_uri, reachable
from qops.registry.flavors import log_transformers_model
from qops.registry.registration import (
    RegisterResult,
    example_feed,
    first_version_for,
    named_signature,
    prequantized,
    providers_for,
    quantization_config,
    register,
    serving_requirements,
)
from qops.registry.source import SourceModel, download_model_version, fetch_source_model, single_file_onnx

__all__ = ["MODELS_URI", "RegisterResult", "SourceModel", "configure_mlflow", "download_model_version", "example_feed", "fetch_source_model", "first_version_for", "log_transformers_model", "mlflow_tracking_uri", "named_signature", "prequantized", "promote", "providers_for", "quantization_config", "reachable", "register", "serving_requirements", "settle_aliases", "single_file_onnx"]
