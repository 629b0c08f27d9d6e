"""Install llama.cpp's Hugging Face -> GGUF converter beside the llama-cpp-python this environment built.

llama-cpp-python ships the llama.cpp library (its quantizer and runtime) but not ``convert_hf_to_gguf.py``; its
sdist vendors the matching llama.cpp tree. This script downloads that same sdist (the installed version, pinned in
constraints.txt), and copies ``convert_hf_to_gguf.py``, its ``conversion/`` package and the matching ``gguf-py``
(newer than PyPI's ``gguf`` of the same version number) into ``<venv>/share/qops/llama.cpp/`` — atomically (a
temporary folder beside it, then a rename), so a rerun or an interrupted run leaves a complete copy or none.

Usage: python scripts/llama_cpp_converter.py   (make install runs it)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def main() -> int:
    dest = Path(sys.prefix) / "share" / "qops" / "llama.cpp"
    ver = version("llama-cpp-python")
    if (dest / "VERSION").is_file() and (dest / "VERSION").read_text().strip() == ver:
        print(f"llama.cpp converter {ver} already in {dest}")
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as td:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "-d", td, f"llama-cpp-python=={ver}"], check=True)
        sdist = next(Path(td).glob("llama_cpp_python-*.tar.gz"))
        tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
        try:
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    parts = m.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rel>
                    if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                        continue
                    rel = parts[3]
                    if not any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in WANTED):
                        continue
                    if not (m.isfile() or m.isdir()):
                        continue  # no links or devices from an archive
                    m.name = rel
                    tar.extract(m, tmp, filter="data")
            (tmp / "VERSION").write_text(ver + "\n")
            old = dest.with_name(dest.name + ".old")
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"llama.cpp converter {ver} installed in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
