"""Registration against a real MLflow store (SQLite + local artifacts in a temp folder)."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from qops.errors import RegistryError
from qops.quantize import quantize
from qops.registry import fetch_source_model, promote, register


@pytest.fixture(scope="module")
def qmodel(fp32_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rq") / "model.onnx"
    quantize(fp32_model, "x86_64_int8_dynamic", out)
    return out


@pytest.fixture
def card_files(tmp_path):
    md, js = tmp_path / "card.md", tmp_path / "card.json"
    md.write_text("# card\n")
    js.write_text("{}\n")
    return [md, js]


def _register(qmodel, card_files, **kw):
    args = dict(model_path=qmodel, name="m-x86", run_key="p|run1|x86|abc", gate_passed=True, card_files=card_files,
                tags={"qops.target": "x86_64_int8_dynamic", "qops.precision": "int8", "qops.source_version": "1",
                      "qops.calibration_sha256": "none"})
    args.update(kw)
    return register(**args)


def test_register_passing_model(mlflow_uri, qmodel, card_files, features):
    res = _register(qmodel, card_files)
    assert res.registered and res.version == "1" and res.aliases == ["candidate", "champion"]
    client = MlflowClient()
    mv = client.get_model_version_by_alias("m-x86", "champion")
    assert str(mv.version) == "1"
    assert mv.tags["qops.gate"] == "passed" and mv.tags["qops.target"] == "x86_64_int8_dynamic"
    assert mv.tags["qops.complete"] == "true" and mv.tags["qops.card_uri"].endswith("/card/card.md")
    assert "Model card: `runs:/" in mv.description and "card.md" in mv.description
    # card attached to the version's run
    arts = {a.path for a in client.list_artifacts(mv.run_id, "card")}
    assert arts == {"card/card.md", "card/card.json"}
    # the serving requirements are the versions that produced and checked it
    reqs = Path(mlflow.artifacts.download_artifacts(f"models:/m-x86/{mv.version}/requirements.txt")).read_text()
    import onnxruntime

    assert f"onnxruntime=={onnxruntime.__version__}" in reqs.split() and f"mlflow=={mlflow.__version__}" in reqs
    # load the registered quantized model back and run it
    model = mlflow.pyfunc.load_model("models:/m-x86@champion")
    out = model.predict(np.zeros((3, len(features)), dtype=np.float32))
    assert np.asarray(list(out.values())[0] if isinstance(out, dict) else out).shape[0] == 3


def test_retry_is_idempotent(mlflow_uri, qmodel, card_files):
    first = _register(qmodel, card_files)
    again = _register(qmodel, card_files)
    assert again.reused and again.version == first.version
    assert len(MlflowClient().search_model_versions("name = 'm-x86'")) == 1


def test_failed_gate_is_not_registered(mlflow_uri, qmodel, card_files):
    res = _register(qmodel, card_files, gate_passed=False)
    assert not res.registered and "register_failed" in res.reason
    assert MlflowClient().search_registered_models() == []


def test_failed_gate_registered_on_request_without_aliases(mlflow_uri, qmodel, card_files):
    res = _register(qmodel, card_files, gate_passed=False, register_failed=True)
    assert res.registered and res.aliases == []
    mv = MlflowClient().get_model_version("m-x86", res.version)
    assert mv.tags["qops.gate"] == "failed"
    assert MlflowClient().get_registered_model("m-x86").aliases == {}
    with pytest.raises(RegistryError, match="did not pass its gates"):
        promote("m-x86", res.version)


def test_failure_mid_registration_rolls_back(mlflow_uri, qmodel, card_files, monkeypatch):
    """Fault injection: the alias call fails after the version exists; the version must be removed."""

    def boom(self, *a, **k):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", boom)
    with pytest.raises(RegistryError, match="rolled back"):
        _register(qmodel, card_files)
    monkeypatch.undo()
    assert MlflowClient().search_model_versions("name = 'm-x86'") == []
    # and a retry then succeeds cleanly
    assert _register(qmodel, card_files).version is not None


def test_missing_card_is_rejected_before_anything_is_written(mlflow_uri, qmodel, tmp_path):
    with pytest.raises(RegistryError, match="card file"):
        _register(qmodel, [tmp_path / "missing.md"])
    assert MlflowClient().search_registered_models() == []


def test_fetch_source_model_by_alias(mlflow_uri, fp32_model, tmp_path):
    import onnx

    with mlflow.start_run():
        mlflow.onnx.log_model(onnx.load(str(fp32_model)), name="model", registered_model_name="src")
    MlflowClient().set_registered_model_alias("src", "champion", "1")
    src = fetch_source_model("models:/src@champion", tmp_path)
    assert src.version == "1" and src.name == "src" and src.flavor == "onnx"
    # weights folded into one file: same size class as the original
    import os

    assert os.path.getsize(src.path) > 0.9 * os.path.getsize(fp32_model)


def test_fetch_unknown_model(mlflow_uri, tmp_path):
    from qops.errors import ModelError

    with pytest.raises(ModelError, match="not found in the MLflow registry"):
        fetch_source_model("models:/nope@champion", tmp_path)


def test_fetch_pytorch_pt2_source_is_exported_to_onnx(mlflow_uri, tmp_path):
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)).eval()
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    with mlflow.start_run():
        mlflow.pytorch.log_model(net, name="model", input_example=x, serialization_format="pt2",
                                 registered_model_name="torchsrc")
    src = fetch_source_model("models:/torchsrc/1", tmp_path)
    assert src.flavor == "pytorch"
    sess = ort.InferenceSession(src.path)
    batch = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)  # batch size is dynamic
    out = sess.run(None, {sess.get_inputs()[0].name: batch})[0]
    np.testing.assert_allclose(out, net(torch.from_numpy(batch)).detach().numpy(), atol=1e-5)


def test_pickled_pytorch_source_is_refused(mlflow_uri, tmp_path):
    import torch

    from qops.errors import ModelError

    net = torch.nn.Linear(3, 2)
    with mlflow.start_run():
        mlflow.pytorch.log_model(net, name="model", serialization_format="pickle",
                                 registered_model_name="pickled")
    with pytest.raises(ModelError, match="does not unpickle"):
        fetch_source_model("models:/pickled/1", tmp_path)


def test_registered_onnx_models_declare_their_targets_providers():
    from qops.registry import providers_for
    from qops.targets import get_target

    assert providers_for(get_target("x86_64_vnni_int8").to_dict()) == ["CPUExecutionProvider"]
    assert providers_for(get_target("nvidia_fp16").to_dict()) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for(get_target("nvidia_tensorrt_int8").to_dict()) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_promotion_policy_gates_approval_and_metrics(mlflow_uri, qmodel, card_files):
    """A serving alias moves only by policy; the replaced version is tagged; promoting the holder is a no-op."""
    v1 = _register(qmodel, card_files, run_key="p|r1|x86|a", metrics={"quantized_accuracy": 0.80,
                                                                      "latency_p50_ms": 1.0}).version
    v2 = _register(qmodel, card_files, run_key="p|r2|x86|b", metrics={"quantized_accuracy": 0.78,
                                                                      "latency_p50_ms": 0.5}).version
    v3 = _register(qmodel, card_files, run_key="p|r3|x86|c", metrics={"quantized_accuracy": 0.82,
                                                                      "latency_p50_ms": 0.9}).version
    first = promote("m-x86", v1, "production", by="dag run 1")
    assert first["promoted"] and first["previous"] is None
    with pytest.raises(RegistryError, match="needs a manual approval"):
        promote("m-x86", v3, "production", require_approval=True)
    with pytest.raises(RegistryError, match=r"not better than version 1.*quantized_accuracy 0.78 vs 0.8 \(max\)"):
        promote("m-x86", v2, "production", better_on={"quantized_accuracy": "max", "latency_p50_ms": "min"})
    # the CLI: a refusal by policy is exit 4 (a decision), not exit 2 (bad input)
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "qops.cli", "promote", "--name", "m-x86", "--version", v3, "--alias",
                        "production", "--require-approval", "--tracking-uri", mlflow_uri], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 4 and "promotion refused" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("m-x86", "production").version) == v1  # refusals moved nothing
    # a person's approval on the command line is recorded on the version, as the Airflow approval task does
    r = subprocess.run([sys.executable, "-m", "qops.cli", "promote", "--name", "m-x86", "--version", v3, "--alias",
                        "production", "--require-approval", "--approve", "--by", "dag run 3", "--reason",
                        "slices hold", "--better-on", "quantized_accuracy:max", "--better-on", "latency_p50_ms:min",
                        "--tracking-uri", mlflow_uri, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1000:]
    res = json.loads(r.stdout)
    assert res["promoted"] and res["previous"] == v1
    tags = client.get_model_version("m-x86", v3).tags
    assert (tags["qops.approval"], tags["qops.approval.by"], tags["qops.approval.reason"],
            tags["qops.approval.alias"]) == ("approved", "dag run 3", "slices hold", "production")
    assert str(client.get_model_version_by_alias("m-x86", "production").version) == v3
    assert "by version 3 (dag run 3)" in client.get_model_version("m-x86", v1).tags["qops.replaced.production"]
    assert client.get_model_version("m-x86", v3).tags["qops.promoted.production"].endswith("by dag run 3")
    again = promote("m-x86", v3, "production")  # a retried task: nothing changes
    assert not again["promoted"] and "already holds" in again["reason"]


def test_a_registration_that_lost_the_race_removes_its_own_version(mlflow_uri, qmodel, card_files, monkeypatch):
    """The race window, made deterministic: a second attempt whose look-up ran before the first attempt's version
    existed (``_find_version`` sees nothing) creates its own version, then finds the lower one for its run key,
    deletes its own and returns the first — never two live versions for one run key."""
    import qops.registry.registration as registry

    first = _register(qmodel, card_files)
    monkeypatch.setattr(registry, "_find_version", lambda client, name, key: None)
    second = _register(qmodel, card_files)
    assert second.version == first.version and second.reused
    versions = MlflowClient().search_model_versions("name = 'm-x86'")
    assert [str(v.version) for v in versions] == [first.version]
    runs = mlflow.search_runs(experiment_names=["qops"], output_format="list")
    assert any(r.data.tags.get("qops.registration", "").startswith("superseded by version") for r in runs)


def test_promote_against_a_server_that_is_down_fails_fast_without_credentials(monkeypatch):
    import time

    from servers import free_port

    from qops.registry import configure_mlflow

    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # restored when the test ends
        monkeypatch.setenv(k, "")
    port = free_port()
    configure_mlflow(f"http://bob:Hunter2-secret@127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as e:
        promote("m", "1", "champion")
    assert time.monotonic() - t0 < 40
    assert "did not answer" in str(e.value) and "Hunter2-secret" not in str(e.value) and "bob" not in str(e.value)
    assert mlflow.get_tracking_uri() == f"http://127.0.0.1:{port}"  # the credential left the URI for the env
    import os

    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "Hunter2-secret"


def test_a_models_uri_source_on_a_server_that_is_down_is_unavailable_not_missing(tmp_path):
    import time

    from servers import free_port

    from qops.errors import RegistryUnavailable
    from qops.registry import configure_mlflow

    configure_mlflow(f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable) as e:
        fetch_source_model("models:/german-credit@champion", tmp_path)
    assert time.monotonic() - t0 < 40 and "did not answer" in str(e.value) and "not found" not in str(e.value)
