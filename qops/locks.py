"""File locks that a crash cannot leave behind.

:class:`FileLock` is an ``flock`` on a lock file: the kernel releases it when its process ends, however it ends
(SIGKILL included), so a lock is never stale. The holder writes who it is (pid, host, start time, what for) into
the file and empties it on a clean release; a new holder that finds the file non-empty knows its predecessor died
holding it and says so in a log line. Re-entrant within a process: a stage run inside ``qops run`` (which holds the
run folder) does not lock against itself.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from qops.errors import QopsError

log = logging.getLogger(__name__)

_HELD: dict[str, list] = {}  # path -> [mode, count] for the locks this process holds
_GUARD = threading.Lock()


class LockBusy(QopsError):
    """Another process holds the lock."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class FileLock:
    """``with FileLock(path, what=...)``: an exclusive (or ``shared``) lock on ``path``. ``timeout_s`` 0 fails at
    once when the lock is taken (:class:`LockBusy` naming the holder); otherwise it waits that long."""

    def __init__(self, path: str | os.PathLike, *, what: str, shared: bool = False, timeout_s: float = 0.0,
                 fix: str | None = None, note: dict | None = None):
        self.path, self.what, self.shared, self.timeout_s = Path(path), what, shared, timeout_s
        self.fix, self.note = fix, note or {}
        self._fd: int | None = None
        self._nested = False

    def __enter__(self) -> "FileLock":
        key = str(self.path.resolve())
        with _GUARD:
            held = _HELD.get(key)
            if held is not None and (held[0] == "exclusive" or self.shared):
                held[1] += 1
                self._nested = True
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read(fd)
                    for _ in range(5):  # the holder writes who it is right after it takes the lock
                        if holder or self.shared:
                            break
                        time.sleep(0.1)
                        holder = _read(fd)
                    os.close(fd)
                    who = (f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('what', '?')}, since "
                           f"{holder.get('since', '?')})" if holder else "another qops process")
                    raise LockBusy(f"The {self.what} is in use by {who}.",
                                   self.fix or "wait for it to finish, or use another location.") from None
                time.sleep(0.1)
        if not self.shared:
            previous = _read(fd)
            if previous and previous.get("pid") != os.getpid():
                log.warning("the %s was left locked by process %s on %s (%s, since %s), which is gone: taking it over",
                            self.what, previous.get("pid"), previous.get("host"), previous.get("what", "?"),
                            previous.get("since", "?"))
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                    "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), **self.note}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        with _GUARD:
            _HELD[key] = ["shared" if self.shared else "exclusive", 1]
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        with _GUARD:
            held = _HELD.get(key)
            if self._nested:
                if held is not None:
                    held[1] -= 1
                return
            _HELD.pop(key, None)
        if self._fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(self._fd, 0)  # a clean release: the next holder finds no predecessor
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}
