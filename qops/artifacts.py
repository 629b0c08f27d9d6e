"""Artifact locations, atomic writes and hashing.

Every file qops writes goes to a temporary name in the same folder first and is renamed into place,
so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qops.locks import pid_alive

_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


TEMP_PREFIX = ".qops-tmp-"


def temp_prefix(what: str = "") -> str:
    """Name prefix of this process's temporary files and folders: ``.qops-tmp-<pid>-<what>``. They live beside
    their final location (same file system: the rename is atomic) and :func:`clean_stale_temps` removes those of
    processes that are gone (killed mid-write)."""
    return f"{TEMP_PREFIX}{os.getpid()}-{what}"


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove ``.qops-tmp-<pid>-*`` entries in ``folder`` whose process is no longer running; returns their names."""
    import shutil

    removed = []
    d = Path(folder)
    if not d.is_dir():
        return removed
    for p in d.glob(TEMP_PREFIX + "*"):
        pid = p.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final.name + "."), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    import shutil

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name + "."), suffix=".tmp", dir=final.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o777 & ~_UMASK)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and numpy scalars to plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    if isinstance(obj, float) and obj != obj:  # NaN -> null
        return None
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)

