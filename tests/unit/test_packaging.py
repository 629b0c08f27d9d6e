"""Static checks of what cannot run here: docker files parse and refer to files that exist; pins hold."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_file_parses_and_services_use_the_built_image():
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "airflow-scheduler", "airflow-api-server", "airflow-init"} <= set(services)
    build = services["mlflow"]["build"]
    assert (REPO / "docker" / build["context"] / build["dockerfile"]).resolve().is_file()
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_dockerfile_copies_existing_paths_and_uses_constraints():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11" in text
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *srcs, _dst = line.split()
        for src in srcs:
            assert (REPO / src).exists(), src
    assert "-c constraints.txt" in text and "torch==2.13.0" in text


def test_torch_pinned_exactly_and_all_dependencies_constrained():
    cons = {l.split("==")[0].lower().replace("_", "-"): l.split("==")[1] for l in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in l and not l.startswith("#")}
    assert cons["torch"] == "2.13.0"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    deps = re.findall(r'^\s+"([A-Za-z0-9_.-]+)[<>=\[]', pyproject, flags=re.M)
    for dep in deps:
        assert dep.lower().replace("_", "-") in cons, f"{dep} is not pinned in constraints.txt"


def test_provider_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("qops_airflow")]
    assert eps, "qops_airflow provider entry point missing (reinstall with pip install -e .)"
    info = eps[0].load()()
    assert info["package-name"] == "qops" and "qops_airflow.operators" in info["operators"][0]["python-modules"]
