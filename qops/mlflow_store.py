"""MLflow's SQLite store, initialised once and safely.

MLflow creates and migrates a fresh SQLite database in place on first use, without a lock: two processes starting
at once both migrate (``duplicate column name``), and a process killed mid-migration leaves a database that every
later run fails on (``table datasets already exists``). qops does the first migration itself, under a file lock
beside the database, into a temporary file that is renamed onto the database only when complete — so the
database is either absent or fully migrated. A database that is found half-migrated is repaired when it holds no
runs, experiments or models (it is moved aside, named in a log line, and created anew); otherwise qops stops with
an error that names the file and the fix.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from qops.errors import RegistryError
from qops.locks import FileLock, pid_alive

log = logging.getLogger(__name__)

_READY: set[str] = set()
_USER_DATA = ("SELECT COUNT(*) FROM runs", "SELECT COUNT(*) FROM registered_models",
              "SELECT COUNT(*) FROM model_versions", "SELECT COUNT(*) FROM experiments WHERE name != 'Default'")


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other stores and in-memory databases)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest if rest.startswith("/") else os.path.abspath(rest))


def _tables(path: Path) -> set[str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def _revision(path: Path) -> str | None:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
        return rows[0][0] if len(rows) == 1 else None
    except sqlite3.DatabaseError:
        return None
    finally:
        con.close()


def _holds_user_data(path: Path) -> bool:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        for q in _USER_DATA:
            try:
                if con.execute(q).fetchone()[0]:
                    return True
            except sqlite3.DatabaseError:
                continue  # that table was never created
        return False
    finally:
        con.close()


def _expected() -> tuple[str, set[str]]:
    """MLflow's head schema revision and the tables its ORM defines."""
    import mlflow.store.model_registry.dbmodels.models  # noqa: F401 - registers the registry tables on Base
    import mlflow.store.tracking.dbmodels.models  # noqa: F401 - registers the tracking tables on Base
    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision(), set(Base.metadata.tables)


def _create(path: Path) -> None:
    """Migrate a new database to MLflow's head schema in a temporary file, then rename it into place."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    tmp = path.with_name(f".{path.name}.qops-tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(tmp, path)


def _clean_stale_temps(path: Path) -> None:
    for p in path.parent.glob(f".{path.name}.qops-tmp-*"):  # the database and its -journal
        pid = p.name.split(".qops-tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def ensure_sqlite_store(uri: str | None) -> None:
    """Make sure the SQLite database of ``uri`` exists and is fully migrated before MLflow opens it (no-op for
    other stores, and after the first check in a process)."""
    path = sqlite_path(uri)
    if path is None or str(path) in _READY:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with FileLock(path.with_name(path.name + ".qops-lock"), what=f"MLflow database {path}", timeout_s=300):
        _clean_stale_temps(path)
        if not path.exists() or path.stat().st_size == 0 or not _tables(path) - {"alembic_version"}:
            log.info("creating MLflow's SQLite store %s", path)
            _create(path)
        else:
            head, wanted = _expected()
            rev, have = _revision(path), _tables(path)
            if rev != head or not wanted <= have:
                what = (f"at schema revision {rev or 'none'} (this MLflow expects {head})" if rev != head
                        else f"missing table(s) {sorted(wanted - have)[:5]}")
                if not _holds_user_data(path):
                    aside = path.with_name(f"{path.name}.broken-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}")
                    os.replace(path, aside)
                    log.warning("MLflow's SQLite store %s was half-migrated (%s; an earlier run was killed while "
                                "creating it) and held no runs or models: moved aside to %s and created anew",
                                path, what, aside.name)
                    _create(path)
                else:
                    raise RegistryError(
                        f"MLflow's SQLite store {path} is {what}: a migration was interrupted, or another MLflow "
                        "version wrote it.",
                        f"back it up, then run `mlflow db upgrade sqlite:///{path}`; if that fails on a table that "
                        "already exists, restore the backup you had before the interrupted run, or point "
                        "mlflow.tracking_uri at a new database file.")
    _READY.add(str(path))
    log.debug("MLflow SQLite store %s checked in %.2f s", path, time.perf_counter() - t0)
