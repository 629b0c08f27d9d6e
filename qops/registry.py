"""MLflow: fetch the source model, log + register quantized models per target, aliases, promotion.

Registration never leaves a half-registered version: a version is created with all its tags in one
call, and if anything after it fails (description, aliases) the version is deleted again. Retries
are idempotent: a version carries ``qops.run_key`` (pipeline, run, target, model hash) and a retry
with the same key returns the existing version instead of creating another.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qops import __version__
from qops.errors import ModelError, RegistryError, RegistryUnavailable
from qops.mlflow_store import ensure_sqlite_store
from qops.redact import redact, split_credentials

log = logging.getLogger(__name__)

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def configure_mlflow(tracking_uri: str | None = None, registry_uri: str | None = None) -> str:
    """Point MLflow at the tracking (and registry) store. Credentials in the URI (``http://user:pass@host``) move
    to ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, so MLflow never holds them in a URI it prints; MLflow's own
    "View run at" lines are suppressed when the URI still carries a secret (a ``?token=``). A SQLite store is
    created or checked once, under a lock (:mod:`qops.mlflow_store`). Returns the URI without credentials."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("No MLflow tracking URI configured.",
                            "set mlflow.tracking_uri in the spec or the MLFLOW_TRACKING_URI environment variable "
                            "(e.g. sqlite:///mlflow.db).")
    uri, user, password = split_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:  # subprocesses read it too: without its credentials
        os.environ["MLFLOW_TRACKING_URI"] = split_credentials(env_uri)[0]
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    ensure_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    if registry_uri:
        registry_uri = split_credentials(registry_uri)[0]
        ensure_sqlite_store(registry_uri)
        mlflow.set_registry_uri(registry_uri)
    return uri


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
            from qops.quantize.torch_engine import load_program

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

    from qops.artifacts import atomic_path

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
    from qops.quantize.torch_engine import weights_only_loads

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
    from qops.quantize.torch_engine import save_program

    save_program(program, dst.with_suffix(".pt2"), {})  # the FP32 program, for torchao targets
    return _program_to_onnx(program, dst, uri)


def _program_to_onnx(program, dst: Path, uri: str, meta: dict | None = None) -> Path:
    """Export a ``torch.export`` program to ONNX, keeping its dynamic dimensions. One input is named
    ``features`` (the tabular contract); several keep the program's input names (``input_ids``, ...). The
    program's qops string metadata (``qops.feature_columns``) goes into the ONNX metadata."""
    import torch

    from qops.artifacts import atomic_path
    from qops.quantize.torch_engine import program_inputs

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


def example_feed(sess) -> dict:
    """A small valid feed for every input of an ONNX Runtime session: batch 2, other dynamic dimensions 8;
    integer inputs (token ids, masks) are ones, floats zeros."""
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    feed = {}
    for inp in sess.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else (2 if i == 0 else 8) for i, d in enumerate(inp.shape)]
        dtype = types.get(inp.type, np.float32)
        feed[inp.name] = (np.ones if np.issubdtype(dtype, np.integer) else np.zeros)(dims, dtype=dtype)
    return feed


def named_signature(sess, example: dict, outs: list):
    """An MLflow signature with one tensor spec per input and output name; dimensions the graph leaves dynamic
    (batch, sequence) are -1, so any batch and sequence length is accepted."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(node, array):
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
        return TensorSpec(array.dtype, tuple(dims), node.name)

    return ModelSignature(inputs=Schema([spec(i, example[i.name]) for i in sess.get_inputs()]),
                          outputs=Schema([spec(o, a) for o, a in zip(sess.get_outputs(), outs)]))


@dataclass
class RegisterResult:
    registered: bool
    name: str
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    model_uri: str | None = None
    run_id: str | None = None
    reason: str = ""
    reused: bool = False


def reachable(client, attempts: int = 4, backoff_s: float = 1.0) -> None:
    """Check that the tracking server answers before anything is written: ``attempts`` tries with exponential
    backoff (MLflow's own HTTP retries are turned off for the check, so the bound is ours), then a clear error.
    Nothing has been registered when it fails, and a retry of the task registers idempotently."""
    import time

    from mlflow.exceptions import MlflowException

    uri = redact(mlflow_tracking_uri())
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    last = None
    try:
        for i in range(attempts):
            try:
                client.search_experiments(max_results=1)
                return
            except (MlflowException, OSError) as e:  # connection refused, timeouts, 5xx
                last = e
                log.warning("MLflow at %s did not answer (attempt %d of %d): %s", uri, i + 1, attempts,
                            redact(str(e).splitlines()[0][:200]))
                if i + 1 < attempts:
                    time.sleep(backoff_s * 2 ** i)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous
    raise RegistryUnavailable(f"The MLflow tracking server at {uri} did not answer after {attempts} attempts "
                              f"({redact(str(last).splitlines()[0][:200]) if last else 'no response'}); nothing "
                              "was registered.",
                              "start the server or fix the tracking URI (spec mlflow.tracking_uri, MLFLOW_TRACKING_URI "
                              "or the Airflow connection); the task's retry registers idempotently.")


def mlflow_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _find_version(client, name: str, run_key: str):
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    return first_version_for(client, name, run_key)


def first_version_for(client, name: str, run_key: str):
    """The live version registered for ``run_key``: the lowest-numbered one (the first created), ignoring versions
    a concurrent attempt has already marked superseded. Every attempt calls this right after creating its own
    version, so of two racing creations exactly one survives."""
    live = [mv for mv in client.search_model_versions(f"name = '{name}'")
            if (mv.tags or {}).get("qops.run_key") == run_key and not (mv.tags or {}).get("qops.superseded_by")]
    return min(live, key=lambda mv: int(mv.version)) if live else None


def _reused(client, name: str, mv) -> "RegisterResult":
    """The result for a version registered earlier (a retry, or a concurrent attempt that got in first)."""
    version = str(mv.version)
    aliases = client.get_registered_model(name).aliases
    return RegisterResult(True, name, version, sorted(a for a, v in aliases.items() if str(v) == version),
                          f"models:/{name}/{version}", mv.run_id, reused=True)


def _await_complete(client, name: str, version: str, timeout_s: float = 600.0) -> "RegisterResult":
    """Wait for the concurrent attempt that owns ``version`` to finish it (``qops.complete``)."""
    import time

    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            raise RegistryUnavailable(f"The concurrent registration of {name} version {version} was rolled back.",
                                      "retry: registration is idempotent.") from None
        if (mv.tags or {}).get("qops.complete") == "true":
            return _reused(client, name, mv)
        if time.monotonic() > deadline:
            raise RegistryUnavailable(f"The concurrent registration of {name} version {version} did not complete in "
                                      f"{timeout_s:.0f} s.", "retry once it has finished or failed.")
        time.sleep(0.5)


def serving_requirements(is_program: bool, execution_providers: list[str] | None = None) -> list[str]:
    """The registered model's pip requirements, stated rather than inferred: MLflow's inference starts a Python
    subprocess per model (seconds each), and the versions that produced and checked the artifact are the ones
    to serve it with. GPU providers need ``onnxruntime-gpu`` (same version)."""
    from importlib.metadata import version

    reqs = [f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}"]
    if is_program:
        return reqs + [f"torch=={version('torch').split('+')[0]}"]
    gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in execution_providers or [])
    runtime = "onnxruntime-gpu" if gpu else "onnxruntime"
    return reqs + [f"onnx=={version('onnx')}", f"{runtime}=={version('onnxruntime')}"]


def _newest_first(mv) -> tuple[int, int]:
    """Order of qops versions for the aliases registration moves: the newest source version, then the latest
    registration of it (a source given as a file has no version: it ranks below registered sources)."""
    src = (mv.tags or {}).get("qops.source_version") or ""
    return (int(src) if src.isdigit() else -1, int(mv.version))


def settle_aliases(client, name: str, aliases: list[str], rounds: int = 10) -> dict[str, str]:
    """Point each of ``aliases`` at the newest complete, gate-passed qops version of ``name`` (by
    :func:`_newest_first`); returns {alias: version}. Lock-free and safe under concurrent registrations: each writer
    sets what it computed, then reads back and repeats until what it reads is what it would set, and since the
    newest version only ever gets newer, the last writer's confirmation leaves every alias on the newest one —
    two DAG runs registering at once never leave ``candidate`` and ``champion`` on versions out of order."""
    held: dict[str, str] = {}
    for _ in range(rounds):
        ready = [mv for mv in client.search_model_versions(f"name = '{name}'")
                 if (mv.tags or {}).get("qops.complete") == "true" and (mv.tags or {}).get("qops.gate") == "passed"]
        if not ready:
            return {}
        best = str(max(ready, key=_newest_first).version)
        current = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
        if all(current.get(a) == best for a in aliases):
            return {a: best for a in aliases}
        for a in aliases:
            if current.get(a) != best:
                client.set_registered_model_alias(name, a, best)
        held = {a: best for a in aliases}
    log.warning("aliases %s of %s still moving after %d rounds (registrations racing); left on %s", aliases, name,
                rounds, held)
    return held


def register(
    *,
    model_path: str | os.PathLike,
    name: str,
    run_key: str,
    tags: dict[str, str],
    gate_passed: bool,
    card_files: list[str | os.PathLike],
    register_failed: bool = False,
    promote: bool = True,
    candidate_alias: str = "candidate",
    promote_alias: str = "champion",
    experiment: str = "qops",
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    finalize_card=None,
    execution_providers: list[str] | None = None,
    example: dict | None = None,
    extra_files: list[str | os.PathLike] | None = None,
) -> RegisterResult:
    """Log the quantized ONNX model (onnx flavor, with signature) and its card; register one version.

    ``finalize_card(mlflow_info) -> files``, if given, re-renders the card with the new version's
    lineage (run id, model name and version) before it is attached; otherwise ``card_files`` are attached.
    ``execution_providers``: what the ONNX flavor declares for serving (MLflow's default lists CUDA first;
    :func:`providers_for` gives a target's). ``example``: the feed the signature is inferred from (default: one
    built from the graph's inputs); ``extra_files``: logged beside the model under ``files/`` (a decoder's
    ``genai_config.json`` and tokenizer: with the model they make an ONNX Runtime GenAI folder). A folder
    ``model_path`` (a decoder LLM checkpoint for PyTorch serving) is logged with the transformers flavor.
    """
    import mlflow
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    model_path = Path(model_path)
    if not model_path.is_file() and not (model_path.is_dir() and (model_path / "config.json").is_file()):
        raise RegistryError(f"Quantized model {model_path} does not exist.", "run the quantize stage first.")
    missing = [str(f) for f in card_files if not Path(f).is_file()]
    if missing:
        raise RegistryError(f"Model card file(s) {missing} do not exist.", "run the card stage before registering.")
    if not gate_passed and not register_failed:
        return RegisterResult(registered=False, name=name,
                              reason="gates failed; not registered (set mlflow.register_failed to register it)")
    client = MlflowClient()
    reachable(client)
    existing = _find_version(client, name, run_key)
    if existing is not None and existing.tags.get("qops.complete") == "true":
        log.info("version %s of %s already registered for run key %s: reusing it", existing.version, name, run_key)
        if gate_passed:  # the earlier attempt may have died before its aliases were settled
            settle_aliases(client, name, [candidate_alias, *([promote_alias] if promote else [])])
        return _reused(client, name, existing)
    if existing is not None:  # an earlier attempt died between create and complete: remove it, then redo
        client.delete_model_version(name, existing.version)

    is_program = model_path.suffix.lower() == ".pt2"
    is_checkpoint = model_path.is_dir()
    if is_checkpoint:
        signature = model = None
    elif is_program:  # torchao targets: a torch.export program, logged with the pytorch flavor as pt2
        from qops.data import onnx_io
        from qops.runtime import TorchSession

        width = onnx_io(model_path)[0][0].width or 1
        example = np.zeros((2, width), dtype=np.float32)
        runner = TorchSession(model_path, compile=False)
        signature = infer_signature(example, runner.run(None, {"x": example})[0])
        model = runner.module
    else:
        model = onnx.load(str(model_path))
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        example = example or example_feed(sess)
        outs = sess.run(None, example)
        names = [o.name for o in sess.get_outputs()]
        if len(example) == 1 and len(names) == 1:  # one tensor in, one out: the plain tensor signature
            signature = infer_signature(next(iter(example.values())), outs[0])
        else:  # named inputs and outputs: a tensor spec per name (pyfunc predicts on a dict of arrays)
            signature = named_signature(sess, example, outs)

    safe_tags = {k: redact(str(v)) for k, v in tags.items()}  # a tag never carries a credential
    safe_tags.update({"qops.run_key": run_key, "qops.gate": "passed" if gate_passed else "failed",
                      "qops.version": __version__})
    mlflow.set_experiment(experiment)
    version = None
    with mlflow.start_run(run_name=f"register-{name}") as run:
        try:
            mlflow.set_tags(safe_tags)
            if params:
                mlflow.log_params(params)
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            reqs = serving_requirements(is_program or is_checkpoint, execution_providers)
            if is_checkpoint:
                from qops.llm.source import log_transformers_model

                info = log_transformers_model(model_path, reqs)
            elif is_program:
                info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                                serialization_format="pt2", pip_requirements=reqs)
            else:
                info = mlflow.onnx.log_model(model, name="model", signature=signature, pip_requirements=reqs,
                                             onnx_execution_providers=execution_providers or ["CPUExecutionProvider"])
            mv = mlflow.register_model(info.model_uri, name, tags=safe_tags)
            version = str(mv.version)
            first = first_version_for(client, name, run_key)
            winner = None if first is None else str(first.version)
            if winner is not None and winner != version:
                # a concurrent registration of the same run key was created first: it stays, this one goes
                client.set_model_version_tag(name, version, "qops.superseded_by", winner)
                client.delete_model_version(name, version)
                version = None
                mlflow.set_tag("qops.registration", f"superseded by version {winner}")
                log.info("version %s of %s was registered for run key %s by a concurrent attempt: using it",
                         winner, name, run_key)
                return _await_complete(client, name, winner)
            files = card_files
            if finalize_card is not None:
                files = finalize_card({"run_id": run.info.run_id, "model_name": name, "model_version": version})
            for f in files:
                mlflow.log_artifact(str(f), artifact_path="card")
            for f in extra_files or []:
                mlflow.log_artifact(str(f), artifact_path="files")
            names = sorted(Path(f).name for f in files)
            card_md = next((n for n in names if n.endswith(".md")), names[0])
            card_uri = f"runs:/{run.info.run_id}/card/{card_md}"
            links = ", ".join(f"`runs:/{run.info.run_id}/card/{n}`" for n in names)
            client.update_model_version(
                name, version,
                description=f"Quantized by qops {__version__} for target `{tags.get('qops.target', '?')}`. "
                f"Gate: {'passed' if gate_passed else 'FAILED'}. Model card: {links}.",
            )
            client.set_model_version_tag(name, version, "qops.card_uri", card_uri)
            client.set_model_version_tag(name, version, "qops.complete", "true")
            aliases = []
            if gate_passed:
                moved = [candidate_alias, *([promote_alias] if promote else [])]
                held = settle_aliases(client, name, moved)
                aliases = sorted(a for a in moved if held.get(a) == version)
        except Exception as e:
            if version is not None:
                try:
                    client.delete_model_version(name, version)
                except Exception:  # noqa: BLE001 - best effort rollback, the original error matters
                    log.exception("rollback of %s version %s failed", name, version)
            mlflow.set_tag("qops.registration", "rolled_back")
            raise RegistryUnavailable(f"Registering {name} failed and was rolled back: {redact(str(e))}",
                                      "check the MLflow server/backend and retry; retries are idempotent.") from e
    return RegisterResult(True, name, version, sorted(aliases), f"models:/{name}/{version}", run.info.run_id)


def providers_for(recipe: dict) -> list[str]:
    """The ONNX Runtime execution providers a target's model is served with, best first, ending on the CPU
    (TensorRT falls back to CUDA, CUDA to the CPU; CPU targets list the CPU only)."""
    ep = recipe.get("execution_provider") or "CPUExecutionProvider"
    chain = {"TensorrtExecutionProvider": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
             "CUDAExecutionProvider": ["CUDAExecutionProvider"]}.get(ep, [ep] if ep != "CPUExecutionProvider" else [])
    return chain + ["CPUExecutionProvider"]


def promote(name: str, version: str, alias: str = "champion", *, approved: bool = False,
            require_approval: bool = False, better_on: dict[str, str] | None = None, by: str | None = None) -> dict:
    """Point ``alias`` at ``version`` when the policy allows it; the version it replaces is tagged with when and
    by whom (``by``: e.g. the DAG run).

    Policy: the version's gates passed (always); ``require_approval``: only with ``approved``; ``better_on``
    (metric -> ``max`` or ``min``): the version's logged metrics must be at least as good as the current
    holder's on each. Promoting the version that already holds the alias changes nothing (retries are safe).
    Returns ``promoted`` (bool), ``previous`` (the replaced version or None) and ``reason``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    reachable(client)  # a server that is down: a clear error in seconds, with no credential in it
    try:
        return _promote(client, name, version, alias, approved, require_approval, better_on, by)
    except MlflowException as e:
        raise RegistryError(f"Promoting {name} version {version} to @{alias} failed: "
                            f"{redact(str(e).splitlines()[0][:300])}",
                            "check the model name and version (qops register prints them) and the tracking URI.") from None


def _promote(client, name, version, alias, approved, require_approval, better_on, by) -> dict:
    from datetime import datetime, timezone

    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(name, version)
    if mv.tags.get("qops.gate") != "passed":
        raise RegistryError(f"{name} version {version} did not pass its gates (qops.gate={mv.tags.get('qops.gate')}).",
                            "promote a version whose gates passed.")
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    out = {"name": name, "version": str(version), "alias": alias,
           "previous": None if current is None else str(current.version)}
    if current is not None and str(current.version) == str(version):
        return {**out, "promoted": False, "reason": f"version {version} already holds @{alias}"}
    if require_approval and not approved:
        raise RegistryError(f"Promoting {name} version {version} to @{alias} needs a manual approval.",
                            "approve it: qops promote --approve, or trigger the DAG with conf "
                            '{"approve_promotion": true}.')
    if better_on and current is not None:
        mine, theirs = client.get_run(mv.run_id).data.metrics, client.get_run(current.run_id).data.metrics
        worse = []
        for metric, direction in better_on.items():
            if direction not in ("max", "min"):
                raise RegistryError(f"Promotion metric {metric!r} has direction {direction!r}.", "use max or min.")
            if metric not in mine or metric not in theirs:
                raise RegistryError(f"Metric {metric!r} is not logged for version {version} and the holder of "
                                    f"@{alias} (version {current.version}).",
                                    f"compare on logged metrics (version {version} has {sorted(mine)}).")
            ok = mine[metric] >= theirs[metric] if direction == "max" else mine[metric] <= theirs[metric]
            if not ok:
                worse.append(f"{metric} {mine[metric]:.6g} vs {theirs[metric]:.6g} ({direction})")
        if worse:
            raise RegistryError(f"{name} version {version} is not better than version {current.version}, which "
                                f"holds @{alias}: {'; '.join(worse)}.",
                                "keep the current holder, or relax mlflow.promotion.better_on.")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"qops.promoted.{alias}", f"{now} by {by or 'qops promote'}")
    if current is not None:
        client.set_model_version_tag(name, current.version, f"qops.replaced.{alias}",
                                     f"{now} by version {version} ({by or 'qops promote'})")
    return {**out, "promoted": True, "reason": f"@{alias} moved from version {out['previous']} to {version}"
            if current is not None else f"@{alias} set to version {version}"}