"""Register one quantized model: log it with its flavor (onnx, pytorch ``.pt2``, transformers folder, GGUF as a
pyfunc), signature, card and tags, create one version per run key, settle aliases.

Registration never leaves a half-registered version: a version is created with all its tags in one
call, and if anything after it fails (description, aliases) the version is deleted again. Retries
are idempotent: a version carries ``qops.run_key`` (pipeline, run, target, model hash) and a retry
with the same key returns the existing version instead of creating another."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from qops import __version__
from qops.errors import RegistryError, RegistryUnavailable
from qops.redact import redact
from qops.registry.aliases import settle_aliases
from qops.registry.client import reachable
from qops.registry.flavors import log_gguf_model, log_prequantized_transformers_model, log_transformers_model
from qops.runtime import TorchSession, provider_chain

log = logging.getLogger(__name__)


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
    serves: dict | None = None  # the serving check of a decoder LLM (loaded in its runtime, generated)


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


def serving_requirements(is_program: bool, execution_providers: list[str] | None = None,
                         extra: tuple[str, ...] = ()) -> list[str]:
    """The registered model's pip requirements, stated rather than inferred: MLflow's inference starts a Python
    subprocess per model (seconds each), and the versions that produced and checked the artifact are the ones
    to serve it with. GPU providers need ``onnxruntime-gpu`` (same version); ``extra``: further distributions
    the model needs at load (``bitsandbytes`` for a bitsandbytes checkpoint)."""
    from importlib.metadata import version

    reqs = [f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}"] + [f"{d}=={version(d)}" for d in extra]
    if is_program:
        return reqs + [f"torch=={version('torch').split('+')[0]}"]
    gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in execution_providers or [])
    runtime = "onnxruntime-gpu" if gpu else "onnxruntime"
    return reqs + [f"onnx=={version('onnx')}", f"{runtime}=={version('onnxruntime')}"]


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
    promote_alias: str | None = "champion",
    experiment: str = "qops",
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    finalize_card=None,
    execution_providers: list[str] | None = None,
    example: dict | None = None,
    extra_files: list[str | os.PathLike] | None = None,
    serves=None,
    flavor: str | None = None,
    run_id: str | None = None,
    signature=None,
    input_example=None,
    log_input_example: bool = True,
) -> RegisterResult:
    """Log the quantized ONNX model (onnx flavor, with signature) and its card; register one version.

    ``finalize_card(mlflow_info) -> files``, if given, re-renders the card with the new version's
    lineage (run id, model name and version) before it is attached; otherwise ``card_files`` are attached.
    ``execution_providers``: what the ONNX flavor declares for serving (MLflow's default lists CUDA first;
    :func:`providers_for` gives a target's). ``example``: real rows as the model's feed (by input name), which the
    signature is inferred from and which is logged as the input example (unless ``log_input_example`` is off: a
    decoder's KV-cache feed); without it and without ``signature`` the model is logged with neither — qops never
    invents an input. ``signature``/``input_example``: copied from the source model version
    (:func:`qops.registry.source.source_signature`) and used as they are. ``extra_files``: logged beside the model under ``files/`` (a decoder's
    ``genai_config.json`` and tokenizer: with the model they make an ONNX Runtime GenAI folder). A folder
    ``model_path`` (a decoder LLM checkpoint for PyTorch serving) is logged with the transformers flavor.
    ``serves(model_uri) -> {"passed": bool, ...}``, if given, loads the new version in its serving runtime before
    any alias moves: a failure keeps the version (tagged ``qops.serves=failed``) without aliases. ``flavor``
    (``onnx``, ``pytorch``, ``transformers``, ``gguf``): the artifact's kind as its engine declares it
    (:mod:`qops.engines`); without it, read off the path (a QAT model's suffix). ``run_id``: the MLflow run to log
    the model into (the target's nested run, :mod:`qops.registry.tracking`); default: a new run.
    ``promote_alias`` None (or ``promote`` False): only the candidate alias moves.
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
    moved = [candidate_alias, *([promote_alias] if promote and promote_alias else [])]
    if existing is not None and existing.tags.get("qops.complete") == "true":
        log.info("version %s of %s already registered for run key %s: reusing it", existing.version, name, run_key)
        if gate_passed:  # the earlier attempt may have died before its aliases were settled
            settle_aliases(client, name, moved)
        return _reused(client, name, existing)
    if existing is not None:  # an earlier attempt died between create and complete: remove it, then redo
        client.delete_model_version(name, existing.version)

    flavor = flavor or {".pt2": "pytorch", ".gguf": "gguf"}.get(model_path.suffix.lower(),
                                                                "transformers" if model_path.is_dir() else "onnx")
    is_program, is_checkpoint, is_gguf = flavor == "pytorch", flavor == "transformers", flavor == "gguf"
    copied = signature is not None
    if is_checkpoint or is_gguf:
        signature = model = input_example = None
    elif is_program:  # torchao targets: a torch.export program, logged with the pytorch flavor as pt2
        runner = TorchSession(model_path, compile=False)
        model = runner.module
        if not copied and example:  # real rows: the program's one input
            x = np.asarray(next(iter(example.values())), dtype=np.float32)
            signature, input_example = infer_signature(x, runner.run(None, {"x": x})[0]), x
    else:
        model = onnx.load(str(model_path))
        if not copied and example:
            sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
            outs = sess.run(None, example)  # the quantized model runs on real rows before anything is logged
            names = [o.name for o in sess.get_outputs()]
            if len(example) == 1 and len(names) == 1:  # one tensor in, one out: the plain tensor signature
                input_example = next(iter(example.values()))
                signature = infer_signature(input_example, outs[0])
            else:  # named inputs and outputs: a tensor spec per name (pyfunc predicts on a dict of arrays)
                signature, input_example = named_signature(sess, example, outs), dict(example)
        if not log_input_example and not copied:
            input_example = None
    if signature is None:
        log.warning("%s is logged without a signature: no source signature and no example rows were given", name)

    safe_tags = {k: redact(str(v)) for k, v in tags.items()}  # a tag never carries a credential
    safe_tags.update({"qops.run_key": run_key, "qops.gate": "passed" if gate_passed else "failed",
                      "qops.version": __version__})
    mlflow.set_experiment(experiment)
    version = None
    with (mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=f"register-{name}")) as run:
        try:
            mlflow.set_tags(safe_tags)
            if params:
                mlflow.log_params(params)
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            quant = prequantized(model_path) if is_checkpoint else None
            if is_gguf:
                reqs = gguf_requirements()
                info = log_gguf_model(model_path, reqs, kv_cache_type=(params or {}).get("kv_cache_type", "f16"))
            elif quant:
                reqs = serving_requirements(True, execution_providers, QUANT_DISTRIBUTIONS[quant])
                info = log_prequantized_transformers_model(model_path, reqs)
            elif is_checkpoint:
                info = log_transformers_model(model_path, serving_requirements(True, execution_providers))
            elif is_program:
                reqs = serving_requirements(True, execution_providers)
                info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=input_example,
                                                serialization_format="pt2", pip_requirements=reqs)
            else:
                reqs = serving_requirements(False, execution_providers)
                info = mlflow.onnx.log_model(model, name="model", signature=signature, input_example=input_example,
                                             pip_requirements=reqs,
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
            for f in extra_files or []:
                mlflow.log_artifact(str(f), artifact_path="files")
            served = serves(f"models:/{name}/{version}") if serves is not None else None
            if served is not None:
                client.set_model_version_tag(name, version, "qops.serves", "passed" if served["passed"] else "failed")
                mlflow.log_dict(served, "serves.json")
            files = card_files
            if finalize_card is not None:
                files = finalize_card({"run_id": run.info.run_id, "model_name": name, "model_version": version,
                                       **({"serves": served} if served is not None else {})})
            for f in files:
                mlflow.log_artifact(str(f), artifact_path="card")
            names = sorted(Path(f).name for f in files)
            card_md = next((n for n in names if n.endswith(".md")), names[0])
            card_uri = f"runs:/{run.info.run_id}/card/{card_md}"
            links = ", ".join(f"`runs:/{run.info.run_id}/card/{n}`" for n in names)
            client.update_model_version(
                name, version,
                description=f"Quantized by qops {__version__} for target `{tags.get('qops.target', '?')}`. "
                f"Gate: {'passed' if gate_passed else 'FAILED'}."
                + ("" if served is None else f" Serves: {'passed' if served['passed'] else 'FAILED'}.")
                + f" Model card: {links}.",
            )
            client.set_model_version_tag(name, version, "qops.card_uri", card_uri)
            client.set_model_version_tag(name, version, "qops.complete", "true")
            aliases = []
            if gate_passed and (served is None or served["passed"]):
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
    reason = "" if served is None or served["passed"] else f"serves failed: {served.get('error', served)}"
    return RegisterResult(True, name, version, sorted(aliases), f"models:/{name}/{version}", run.info.run_id,
                          reason=reason, serves=served)


# a pre-quantized Transformers folder's quant_method -> the distributions that load it
QUANT_DISTRIBUTIONS = {"bitsandbytes": ("bitsandbytes",), "compressed-tensors": ("compressed-tensors",)}


def quantization_config(folder: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a pre-quantized checkpoint folder (bitsandbytes, compressed-tensors), else
    None."""
    import json

    conf = Path(folder) / "config.json"
    quant = json.loads(conf.read_text()).get("quantization_config") if conf.is_file() else None
    return quant if quant and quant.get("quant_method") in QUANT_DISTRIBUTIONS else None


def prequantized(folder: str | os.PathLike) -> str | None:
    """The ``quant_method`` of a pre-quantized checkpoint folder (bitsandbytes, compressed-tensors), else None."""
    quant = quantization_config(folder)
    return quant["quant_method"] if quant else None


def gguf_requirements() -> list[str]:
    """A GGUF model's pyfunc needs MLflow and llama.cpp (``llama-cpp-python``, built from its sdist)."""
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}",
            f"llama-cpp-python=={version('llama-cpp-python')}"]


def providers_for(recipe: dict) -> list[str]:
    """The ONNX Runtime execution providers a target's model is served with (:func:`qops.runtime.provider_chain`)."""
    return provider_chain(recipe.get("execution_provider"))
