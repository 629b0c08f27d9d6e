"""MLflow, in five modules: ``client`` (where the tracking server is, whether it answers), ``source`` (fetch the
source model into the run folder, read its signature and input example), ``tracking`` (the parent run of a pipeline
run and one nested run per target, with metrics, gate verdicts, trials, card and datasets), ``registration`` (log
and register one quantized model per run key, idempotently) and ``aliases`` (``candidate``/``champion``, promotion
by policy)."""

from qops.registry.aliases import promote, settle_aliases
from qops.registry.approval import record_approval
from qops.registry.client import MODELS_URI, configure_mlflow, mlflow_tracking_uri, reachable
from qops.registry.flavors import log_transformers_model
from qops.registry.registration import (
    RegisterResult,
    first_version_for,
    named_signature,
    prequantized,
    providers_for,
    quantization_config,
    register,
    serving_requirements,
)
from qops.registry.source import (
    SourceModel,
    download_model_version,
    fetch_source_model,
    single_file_onnx,
    source_signature,
)
from qops.registry.tracking import (
    evaluation_metrics,
    find_pipeline_run,
    finish,
    gate_metrics,
    log_dataset,
    log_target,
    metric_key,
    pipeline_run,
    target_run,
)

__all__ = ["MODELS_URI", "RegisterResult", "SourceModel", "configure_mlflow", "download_model_version", "evaluation_metrics", "fetch_source_model", "find_pipeline_run", "finish", "first_version_for", "gate_metrics", "log_dataset", "log_target", "log_transformers_model", "metric_key", "mlflow_tracking_uri", "named_signature", "pipeline_run", "prequantized", "promote", "providers_for", "quantization_config", "reachable", "record_approval", "register", "serving_requirements", "settle_aliases", "single_file_onnx", "source_signature", "target_run"]
