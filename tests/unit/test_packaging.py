"""Static checks of what cannot run here: docker files parse and refer to files that exist; pins hold."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_file_is_the_distributed_stack():
    """What the compose file starts: PostgreSQL, Redis, S3 with its bucket, MLflow with S3 artifacts, every Airflow
    service with the CeleryExecutor sharing one JWT secret and execution API URL, cpu and gpu workers (distinct
    hostnames, the GPU reservation on the gpu one), images built from Dockerfiles that exist."""
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "s3", "s3-bucket", "mlflow", "airflow-init", "airflow-api-server",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "worker-cpu", "worker-gpu"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        if "build" in svc:
            assert (REPO / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file(), name
    airflow = {n: s for n, s in services.items() if n.startswith(("airflow-", "worker-"))}
    envs = [s["environment"] for s in airflow.values()]
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__OPERATORS__DEFAULT_QUEUE"):
        assert len({e[key] for e in envs}) == 1, key  # the same in every Airflow process
    assert envs[0]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and envs[0]["AIRFLOW__CELERY__BROKER_URL"].startswith(
        "redis://redis:")
    queues = {n: s["command"][s["command"].index("--queues") + 1] for n, s in services.items() if n.startswith("worker-")}
    assert queues == {"worker-cpu": "cpu", "worker-gpu": "gpu"}
    assert services["worker-cpu"]["hostname"] != services["worker-gpu"]["hostname"]
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and services["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    mlflow = services["mlflow"]["command"]
    assert mlflow[mlflow.index("--artifacts-destination") + 1].startswith("s3://")
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:9000"
    pod = yaml.safe_load((REPO / "docker" / "k8s" / "gpu-pod-template.yaml").read_text())
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_gpu_dockerfile_installs_the_cuda_torch_of_the_pinned_release():
    text = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert "torch==2.13.0" in text and "onnxruntime-gpu==" in text and "-c constraints.txt" in text
    assert '"--queues", "gpu"' in text
    # the worker stack (cpu extra) on the Python its base image ships (Ubuntu 24.04: 3.12, no python3.11 package)
    assert "ARG QOPS_EXTRAS=cpu,production" in text and '".[${QOPS_EXTRAS}]"' in text
    assert "ubuntu24.04" in text and "python3.11" not in text and "python3 -m venv" in text
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *srcs, _dst = line.split()
        for src in srcs:
            assert (REPO / src).exists(), src


def test_dockerfile_copies_existing_paths_and_uses_constraints():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11" in text
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *srcs, _dst = line.split()
        for src in srcs:
            assert (REPO / src).exists(), src
    assert "-c constraints.txt" in text and "torch==2.13.0" in text
    # installed as the wheel test installs it: built from pyproject.toml + setup.py, never editable
    assert "setup.py" in text and "pip install -e" not in text
    # two targets (docs/deployment.md): the light `airflow` image (scheduler, dag-processor, api-server) installs the
    # Airflow side only, without torch; the `worker` image adds the CPU worker stack and the CPU build of torch
    light, worker = text.split("\nFROM airflow AS worker\n")
    assert "\nFROM python:3.11-slim-bookworm AS airflow\n" in light
    assert 'pip install --no-cache-dir -c constraints.txt ".[production]"' in light and "torch" not in light.split(
        "FROM python")[1]
    assert "ARG QOPS_EXTRAS=cpu,production" in worker and '".[${QOPS_EXTRAS}]"' in worker and "whl/cpu" in worker
    services = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())["services"]
    target = {n: s.get("build", {}).get("target") for n, s in services.items()}
    images = {n: s.get("image") for n, s in services.items()}
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-api-server"):
        assert target[name] == "airflow" and images[name] == "qops:airflow", name
    assert images["airflow-init"] == "qops:airflow"
    for name in ("worker-cpu", "airflow-triggerer", "qops-webhook", "mlflow"):  # engines / the MLflow client
        assert target[name] == "worker" and images[name] == "qops:cpu", name


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _closure(project: dict, extras: list[str]) -> list:
    """The requirements of the base plus ``extras``, self-references (``qops[cpu]``) expanded."""
    from packaging.requirements import Requirement

    out, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if r.name == "qops":
                todo += sorted(r.extras)
            else:
                out.append(r)
    return out


def test_torch_pinned_exactly_in_constraints_and_every_dependency_constrained():
    """Library metadata states ranges (installable on 3.11 to 3.13, beside other pins); the tested versions, torch
    2.13.0 exactly (the CPU build on disk), are pinned in constraints.txt, which make install and the images use."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    cons = {l.split("==")[0].lower().replace("_", "-"): l.split("==")[1] for l in lines
            if "==" in l and not l.startswith("#")}
    assert cons["torch"] == "2.13.0" and cons["torchao"] == "0.18.0"
    project = _pyproject()
    assert project["requires-python"] == ">=3.11"
    every = _closure(project, list(project["optional-dependencies"]))
    for r in every:
        assert r.name.lower().replace("_", "-") in cons, f"{r.name} is not pinned in constraints.txt"
        if r.name in ("torch", "torchao"):
            assert not any(s.operator == "==" for s in r.specifier), f"{r}: a range here, the pin in constraints"


def test_the_base_is_the_parse_time_install_and_dev_the_whole_stack():
    """The base distribution holds what DAG parsing, spec loading and `qops targets` import; the heavy stacks are
    extras; dev (make install) installs every extra's requirements, so the full install is the whole stack."""
    project = _pyproject()
    base = {r.name.lower() for r in _closure(project, [])}
    assert base == {"pydantic", "pyyaml"}
    assert {r.name for r in _closure(project, ["airflow"])} == {"pydantic", "pyyaml", "apache-airflow"}
    cpu = {r.name for r in _closure(project, ["cpu"])}
    assert {"torch", "torchao", "onnx", "onnxruntime", "mlflow", "great-expectations", "fairlearn", "matplotlib",
            "scikit-learn", "boto3", "numpy", "pandas"} <= cpu
    assert cpu <= {r.name for r in _closure(project, ["llm"])}
    dev = {str(r) for r in _closure(project, ["dev"])}
    every = {str(r) for r in _closure(project, [e for e in project["optional-dependencies"] if e != "dev"])}
    assert every <= dev


def test_parse_time_imports_stay_light():
    """What a DAG file imports at parse time (the DAG factory, the stage table, spec loading, the targets), what the
    extra links import on the api-server, and `qops targets` pull in none of the worker stacks: the light install
    (qops[airflow]) has none of them. Run in a fresh interpreter, so that modules other tests imported do not count."""
    import subprocess
    import sys

    heavy = ["numpy", "pandas", "pyarrow", "torch", "torchao", "onnx", "onnxruntime", "mlflow", "sklearn",
             "great_expectations", "fairlearn", "matplotlib", "boto3", "jinja2", "tqdm", "jsonschema"]
    code = f"""
import contextlib, io, json, sys
from pathlib import Path
from qops.pipeline.table import STAGES, plan
from qops.spec import load_spec
from qops.cli import main
from qops.artifacts import read_json  # the Airflow UI's extra links (operators/links.py), on the api-server
from qops.pipeline import registered_name
from qops.run_folder import RunLayout
specs = [load_spec(p) for p in sorted(Path(sys.argv[1]).glob("*.yaml"))]
steps = sum(len(plan(s)) for s in specs)
with contextlib.redirect_stdout(io.StringIO()) as out:
    rc = main(["targets"])
print(json.dumps({{"steps": steps, "rc": rc, "x86": "x86_64_vnni_int8" in out.getvalue(),
                  "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "dags" / "specs")], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] in (0, None) and out["x86"] and out["steps"] > 0
    assert out["loaded"] == [], f"parse-time imports pulled in {out['loaded']}"


def test_the_stage_table_imports_its_functions_on_use():
    from qops.pipeline import per_target, prepare, publish, summary
    from qops.pipeline.table import STAGES, stage

    assert stage("quantize").fn is per_target.stage_quantize and stage("source").fn is prepare.stage_source
    assert stage("register").fn is publish.stage_register and stage("summary").fn is summary.stage_summary
    # options() reads the imported function's signature
    assert stage("source").options() == {"source_uri"} and stage("promote").options() == {"approved"}
    assert stage("summary").options() == {"dag_id"}
    assert all(callable(s.fn) for s in STAGES)


def test_provider_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("qops_airflow")]
    assert eps, "qops_airflow provider entry point missing (reinstall with pip install -e .)"
    info = eps[0].load()()
    assert info["package-name"] == "qops" and "qops_airflow.operators" in info["operators"][0]["python-modules"]


def test_compose_runs_what_the_native_stack_runs():
    """Every process the system test starts natively (scripts/native_stack.py) is a compose service with the same
    command, so the tested stack and the shipped one do not drift apart."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from native_stack import COMPOSE_COMMANDS

    services = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())["services"]
    for name, cmd in COMPOSE_COMMANDS.items():
        assert name in services, f"the native stack runs {cmd}, the compose file has no service {name}"
        assert services[name]["command"][:len(cmd)] == cmd, (name, services[name]["command"])
    assert services["postgres"]["image"].startswith("postgres") and services["redis"]["image"].startswith("redis")
    hook = services["qops-webhook"]
    assert hook["command"][hook["command"].index("--airflow-url") + 1] == "http://airflow-api-server:8080"
    assert services["mlflow"]["environment"]["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https"


def build_wheel(tmp_path) -> Path:
    from builds import build_wheel as build

    return build(tmp_path)


def test_the_wheel_holds_every_package_and_its_data(tmp_path):
    """Every directory of qops/ and operators/ with Python files is in the built wheel (packages are discovered,
    not listed), with the card templates, schema and datasets."""
    import zipfile

    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    for root, pkg in ((REPO / "qops", "qops"), (REPO / "operators", "qops_airflow")):
        for d in {p.parent for p in root.rglob("*.py") if "__pycache__" not in p.parts}:
            assert f"{pkg}/{d.relative_to(root).as_posix()}/__init__.py".replace("/./", "/") in names, d
    assert {"qops_airflow/__init__.py", "qops_airflow/operators.py", "qops_airflow/dag_factory.py"} <= names
    for data in ("qops/cards/templates/card.md.j2", "qops/cards/schema/card-1.0.schema.json"):
        assert data in names, data
    assert any(n.startswith("qops/datasets/data/") and n.endswith(".csv") for n in names)


INSTALLED_CHECK = """
import importlib, json, pkgutil, sys
from pathlib import Path
import qops, qops_airflow
from qops.spec import load_spec
out = {"qops": qops.__file__, "qops_airflow": qops_airflow.__file__, "modules": 0, "specs": []}
for pkg in (qops, qops_airflow):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name.endswith("__main__"):
            continue
        importlib.import_module(m.name)
        out["modules"] += 1
for spec in sorted(Path(sys.argv[1]).glob("*.yaml")):
    out["specs"].append(load_spec(spec).name)
print(json.dumps(out))
"""


def test_the_built_wheel_installs_and_works_outside_the_checkout(tmp_path):
    """The wheel installed non-editable into a fresh virtual environment (the pinned dependencies reused from this
    environment's site-packages, as a path after its own) imports every module from its own site-packages, loads
    every example spec and runs `qops targets` — what docker/Dockerfile's `pip install .` gives a worker."""
    import json
    import os
    import site
    import subprocess
    import sys
    import venv

    wheel = build_wheel(tmp_path)
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    own = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    # dependencies from here, after the fresh site-packages; .pth files there (the editable qops) are not run
    (Path(own) / "pinned_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(py), "-c", INSTALLED_CHECK, str(REPO / "dags" / "specs")], capture_output=True, text=True,
                       cwd=tmp_path, env=clean)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["qops"].startswith(own) and out["qops_airflow"].startswith(own), out  # the wheel, not the checkout
    assert out["modules"] >= 80 and len(out["specs"]) == len(list((REPO / "dags" / "specs").glob("*.yaml")))
    r = subprocess.run([str(env_dir / "bin" / "qops"), "targets"], capture_output=True, text=True, cwd=tmp_path,
                       env=clean)
    assert r.returncode == 0 and "x86_64_vnni_int8" in r.stdout, r.stderr[-2000:]
