"""The light install on Python 3.12 and 3.13: what a scheduler or dag-processor gets with ``pip install
"qops[airflow]" -c constraints.txt`` (docs/deployment.md).

For each interpreter: a fresh virtual environment, the built wheel installed with the ``airflow`` extra only and
the pinned versions; torch, ONNX Runtime and MLflow are then not importable, every example DAG in dags/ loads in
Airflow's DagBag without an import error and survives serialization (what the dag-processor stores), with the
same DAG ids, task ids and queues as in this (3.11, full) environment, and ``qops targets`` prints the same
table. The install time and the size of the light site-packages are printed. It builds its own environments, so
any pytest runs it (`make test-light`; `.ci/run`). Skipped, saying which, where python3.12 or python3.13 is not on
this machine. One to two minutes per interpreter with a warm pip cache on 2 cores.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
HEAVY = ("torch", "torchao", "onnxruntime", "onnx", "mlflow", "numpy", "pandas", "sklearn", "great_expectations")

# run by the light venv and by this one: the DagBag of dags/ as {dag_id: {task_id: queue}}, its import errors, where
# qops came from, and which heavy modules the parse imported
# the DAGs go through JSON and back as the dag-processor stores them and the scheduler reads them (extra links included)
DAGBAG_CHECK = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.serialized_objects import DagSerialization
bag = DagBag(dag_folder=sys.argv[1])
import qops
dags = {}
for d, dag in sorted(bag.dags.items()):
    back = DagSerialization.from_dict(json.loads(json.dumps(DagSerialization.to_dict(dag))))
    dags[d] = {t.task_id: t.queue for t in back.tasks}
    assert dags[d] == {t.task_id: t.queue for t in dag.tasks}, d
print(json.dumps({"errors": {k: str(v)[-1500:] for k, v in bag.import_errors.items()}, "dags": dags,
                  "qops": qops.__file__, "loaded": sorted(m for m in sys.argv[2].split(",") if m in sys.modules)}))
"""


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` that runs (a pyenv shim for a version not selected does not), or None."""
    candidates = [shutil.which(f"python{version}"), f"/usr/bin/python{version}", f"/usr/local/bin/python{version}",
                  *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))]
    for c in filter(None, candidates):
        if not os.access(c, os.X_OK):
            continue
        r = subprocess.run([c, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                           text=True)
        if r.returncode == 0 and r.stdout.strip() == version:
            return c
    return None


def clean_env(home: Path) -> dict:
    """No PYTHONPATH or active venv (the checkout must not leak in), a throwaway AIRFLOW_HOME."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(DAGS))
    return env


def dagbag(python: str, home: Path, extra_path: str | None = None) -> dict:
    env = clean_env(home)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    r = subprocess.run([python, "-c", DAGBAG_CHECK, str(DAGS), ",".join(HEAVY)], capture_output=True, text=True,
                       cwd=home, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def site_size(venv: Path) -> int:
    (sp,) = glob.glob(str(venv / "lib" / "python3.*" / "site-packages"))
    return sum(f.stat().st_size for f in Path(sp).rglob("*") if f.is_file() and not f.is_symlink())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a clean copy of the tracked sources."""
    from builds import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict:
    """The reference: this interpreter's full install (the checkout first on the path), its DagBag and targets."""
    home = tmp_path_factory.mktemp("full")
    bag = dagbag(sys.executable, home, extra_path=str(REPO))
    assert not bag["errors"], bag["errors"]
    env = clean_env(home) | {"PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "qops.cli", "targets"], capture_output=True, text=True, cwd=home,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return {"dagbag": bag, "targets": r.stdout}


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_light_install_parses_every_dag(version, wheel, full, tmp_path, capsys):
    python = find_python(version)
    if python is None:
        pytest.skip(f"python{version} is not installed here: the light install is tested on 3.12 and 3.13 only "
                    f"where those interpreters exist")
    venv = tmp_path / f"light{version}"
    r = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    py = venv / "bin" / "python"
    t0 = time.perf_counter()
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                        str(REPO / "constraints.txt"), f"{wheel}[airflow]"], capture_output=True, text=True,
                       cwd=tmp_path, env=clean_env(tmp_path), timeout=1200)
    install_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    size = site_size(venv)

    # the heavy stacks are not there at all
    probe = "import importlib.util, sys; print(','.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    r = subprocess.run([str(py), "-c", probe, *HEAVY], capture_output=True, text=True, cwd=tmp_path,
                       env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"the light install has {r.stdout.strip()}"

    bag = dagbag(str(py), tmp_path)
    assert bag["qops"].startswith(str(venv)), bag["qops"]  # the wheel, not the checkout
    assert not bag["errors"], bag["errors"]
    assert bag["loaded"] == []
    assert bag["dags"] == full["dagbag"]["dags"]  # same DAG ids, task ids, queues
    assert len(bag["dags"]) == len(list(DAGS.glob("*.py")))

    r = subprocess.run([str(venv / "bin" / "qops"), "targets"], capture_output=True, text=True, cwd=tmp_path,
                       env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == full["targets"] and "x86_64_vnni_int8" in r.stdout

    with capsys.disabled():
        print(f"\nlight install (qops[airflow], constraints.txt) on Python {version}: pip install {install_s:.0f} s, "
              f"site-packages {size / 2**20:.0f} MiB, {len(bag['dags'])} DAGs parsed")
