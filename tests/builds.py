"""The wheel `pip install .` builds, for the packaging and light-install tests. Importable from any test (pytest
puts tests/ on sys.path for its conftest)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_wheel(dest: Path) -> Path:
    """The wheel, built into ``dest`` from a clean copy of the tracked sources: a stale build/ folder in the checkout
    would hide a missing package."""
    src = dest / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("qops", "operators"):
        shutil.copytree(REPO / part, src / part, ignore=ignore)
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dest), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dest.glob("qops-*-py3-none-any.whl")
    return wheel
