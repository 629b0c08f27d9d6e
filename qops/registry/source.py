"""Fetch the source model: ``models:/NAME@ALIAS`` or ``/VERSION`` from MLflow (onnx or pytorch flavor; a torch.export
program is exported to ONNX), or a local ``.onnx``/``.pt2`` file, into the run folder as one self-contained ONNX file."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qops.artifacts import atomic_path
from qops.errors import ModelError
from qops.programs import load_program, program_inputs, save_program, weights_only_loads
from qops.redact import redact
from qops.registry.client import MODELS_URI, reachable

log = logging.getLogger(__name__)


@dataclass
class SourceModel:
    uri: str
    path: str
    name: str
    version: str | None
    run_id: str | None
    flavor: str
    pt2_path: str | None = None  # the FP32 torch.export program, for torchao targets (pytorch sources)


def fetch_source_model(uri: str, dest_dir: str | os.PathLike) -> SourceModel:
    """Resolve ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (or a local .onnx path) to a local ONNX file."""
    dest = Path(dest_dir)
    m = MODELS_URI.match(uri)
    if not m:
        p = Path(uri)
        if p.suffix == ".onnx" and p.is_file():
            return SourceModel(uri=str(p), path=str(p), name=p.stem, version=None, run_id=None, flavor="onnx")
        if p.suffix == ".pt2" and p.is_file():
            ep, meta = load_program(p)
            onnx_path = _program_to_onnx(ep, dest / "fp32.onnx", str(p), meta)
            return SourceModel(uri=str(p), path=str(onnx_path), name=p.stem, version=None, run_id=None,
                               flavor="pytorch", pt2_path=str(p))
        raise ModelError(f"Source model {uri!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION, an .onnx nor a "
                         ".pt2 file.", "set source_model to a registered model URI or an existing .onnx/.pt2 path.")
    name, mv, local, mlmodel = download_model_version(uri, dest / "source")
    flavors = mlmodel.get("flavors", {})
    pt2_path = None
    if "onnx" in flavors:
        path = single_file_onnx(local / flavors["onnx"]["data"], dest / "fp32.onnx")
        flavor = "onnx"
        program_uri = (mv.tags or {}).get("qops.torch_program")
        if program_uri:  # the torch.export program the ONNX model came from (QAT trains it)
            pt2_path = _download_program(program_uri, dest / "torch_program", uri)
    elif "pytorch" in flavors:
        path = _pytorch_to_onnx(local, flavors["pytorch"], mlmodel.get("signature") or {}, dest / "fp32.onnx", uri)
        flavor = "pytorch"
        pt2_path = str(dest / "fp32.pt2")
    else:
        raise ModelError(
            f"Source model {uri} (version {mv.version}) has flavors {sorted(flavors)}; qops reads onnx and "
            "pytorch (pt2) models.",
            "log the FP32 model with mlflow.onnx.log_model or mlflow.pytorch.log_model(serialization_format='pt2').",
        )
    return SourceModel(uri=uri, path=str(path), name=name, version=str(mv.version), run_id=mv.run_id, flavor=flavor,
                       pt2_path=pt2_path)


def download_model_version(uri: str, dest: Path):
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → (name, ModelVersion, local folder, parsed MLmodel)."""
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = MODELS_URI.match(uri)
    client = MlflowClient()
    reachable(client)  # a server that is down: a clear error in seconds, not "not found" after minutes
    name = m.group("name")
    try:
        mv = (client.get_model_version_by_alias(name, m.group("alias")) if m.group("alias")
              else client.get_model_version(name, m.group("version")))
    except MlflowException as e:
        raise ModelError(f"Source model {uri} not found in the MLflow registry: {redact(e.message)}",
                         "register the FP32 model first (the retraining job) or fix source_model.") from None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dest)))
    return name, mv, local, yaml.safe_load((local / "MLmodel").read_text())


def _download_program(program_uri: str, dest: Path, uri: str) -> str:
    """Fetch the ``.pt2`` a model version's ``qops.torch_program`` tag names (loaded later with weights_only)."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=program_uri, dst_path=str(dest)))
    except Exception as e:  # noqa: BLE001 - any store error: the tag is unusable
        raise ModelError(f"Source model {uri} tags its torch program as {program_uri}, which cannot be downloaded: "
                         f"{str(e).splitlines()[0][:200]}", "fix or remove the model version's qops.torch_program "
                         "tag.") from None
    if local.suffix.lower() != ".pt2" or not local.is_file():
        raise ModelError(f"Source model {uri} tags its torch program as {program_uri}, which is not a .pt2 file.",
                         "tag the version with the artifact URI of a torch.export archive (.pt2).")
    return str(local)


def single_file_onnx(src: Path, dst: Path) -> Path:
    """MLflow stores ONNX weights as external data; fold them into one file (when under 2 GB) so sizes,
    hashes and the quantizer see the whole model."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    external = model.ByteSize() >= 2**31 - 1
    with atomic_path(dst) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=external,
                        location=dst.name + ".data" if external else None)
    return dst


def _pytorch_to_onnx(local: Path, conf: dict, signature: dict, dst: Path, uri: str) -> Path:
    """Export a pytorch-flavor model saved as a ``torch.export`` archive (pt2) to ONNX with a dynamic batch.

    Pickled PyTorch models are refused: loading them runs arbitrary code. MLflow is told to disallow
    pickle, so it also checks that the pt2 archive holds only tensors and plain data.
    """
    import json

    import numpy as np


    pt2 = local / conf.get("model_data", "data") / "model.pt2"
    if not pt2.is_file():
        raise ModelError(
            f"Source model {uri} is a pickled PyTorch model; qops does not unpickle model files.",
            "re-log it with mlflow.pytorch.log_model(..., serialization_format='pt2', input_example=X) "
            "or log an ONNX export with mlflow.onnx.log_model.",
        )
    try:
        specs = json.loads(signature.get("inputs") or "[]")
        inputs = [(sp.get("name"), sp["tensor-spec"]["shape"], sp["tensor-spec"]["dtype"]) for sp in specs]
        if not inputs:
            raise KeyError("inputs")
    except (ValueError, KeyError, IndexError, TypeError):
        raise ModelError(f"Source model {uri} has no tensor input signature to export it with.",
                         "log it with an input_example (a float32 array of shape [batch, n_features], or a dict "
                         "of named arrays).") from None
    import mlflow
    import torch

    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

    try:
        with weights_only_loads():  # torch.export.load would otherwise fall back to full unpickling
            module = mlflow.pytorch.load_model(str(local))
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous
    examples = tuple(torch.from_numpy(np.ones([2] + [d if d > 0 else 8 for d in shape[1:]], dtype=dtype))
                     for _, shape, dtype in inputs)
    # the signature's -1 dimensions stay dynamic; torch works out which of them are equal (batch, sequence)
    dynamic = tuple({i: torch.export.Dim.AUTO for i, d in enumerate(shape) if i == 0 or d <= 0}
                    for _, shape, _ in inputs)
    try:
        program = torch.export.export(module, examples, dynamic_shapes=dynamic)
    except Exception as e:
        raise ModelError(f"Exporting the PyTorch source model {uri} failed: {e}",
                         "export it yourself with torch.onnx.export and log the ONNX model.") from None

    save_program(program, dst.with_suffix(".pt2"), {})  # the FP32 program, for torchao targets
    return _program_to_onnx(program, dst, uri)


def _program_to_onnx(program, dst: Path, uri: str, meta: dict | None = None) -> Path:
    """Export a ``torch.export`` program to ONNX, keeping its dynamic dimensions. One input is named
    ``features`` (the tabular contract); several keep the program's input names (``input_ids``, ...). The
    program's qops string metadata (``qops.feature_columns``) goes into the ONNX metadata."""
    import torch

    inputs = program_inputs(program)
    examples = tuple(torch.ones([2] + [d if d else 8 for d in shape[1:]], dtype=getattr(torch, dt))
                     for _, shape, dt in inputs)
    names = ["features"] if len(inputs) == 1 else [n for n, _, _ in inputs]
    try:
        onnx_program = torch.onnx.export(program, examples, dynamo=True, input_names=names, verbose=False,
                                         output_names=["output"] if len(inputs) == 1 else None)
    except Exception as e:
        raise ModelError(f"Exporting the PyTorch source model {uri} to ONNX failed: {e}",
                         "export it yourself with torch.onnx.export and log the ONNX model.") from None
    for k, v in (meta or {}).items():
        if k.startswith("qops.") and isinstance(v, str):
            onnx_program.model.metadata_props[k] = v
    with atomic_path(dst) as tmp:
        onnx_program.save(str(tmp))
    return dst


def source_signature(name: str, version: str | None):
    """The signature and input example of the source model version ``name``/``version`` (either None where the
    version has none, or the source is a file): a quantized version copies them, so it is called with the columns
    and example its source was."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    if not version:
        return None, None
    uri = f"models:/{name}/{version}"
    try:
        model = Model.load(uri)
    except (MlflowException, OSError) as e:
        log.warning("the MLmodel of source %s could not be read (%s): the signature is inferred instead", uri,
                    redact(str(e).splitlines()[0][:200]))
        return None, None
    example = None
    if model.saved_input_example_info:
        try:
            example = model.load_input_example(uri)  # reads only the example's file
        except (MlflowException, OSError, ValueError) as e:
            log.warning("the input example of source %s could not be read (%s)", uri,
                        redact(str(e).splitlines()[0][:200]))
    return model.signature, example
