"""One writer per output folder: an exclusive lock held for a run's whole life.

``out_lock(DIR)`` takes an exclusive ``flock`` on ``DIR/.puregen-lock`` and writes the holder's
pid, host and start time into it. The kernel drops the lock when its process dies, so a lock left
by a killed run is stale by construction and the next run simply takes it. A second run while the
first is alive gets a UsageError naming the holder (exit 2). The file is removed on release; a
run that finds the path re-created under it (another run released and a third took it) tries
again, so two holders can never share one folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from puregen_fast.errors import UsageError

__all__ = ["LOCK", "out_lock"]

LOCK = ".puregen-lock"


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, since {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is still starting"


def _acquire(path: Path) -> int:
    """The locked descriptor of ``path``; UsageError when another live run holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"--out {path.parent} is being written by another run ({_holder(path)}); wait "
                f"for it to finish or stop it, or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # released and removed by its last holder meanwhile: take the new file


@contextlib.contextmanager
def out_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``out``'s writer lock (creating ``out``) for the body of the ``with``."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {folder}: cannot create the folder ({e})") from e
    path = folder / LOCK
    try:
        fd = _acquire(path)
    except OSError as e:
        raise UsageError(f"--out {folder}: cannot create {LOCK} ({e}); is it writable?") from e
    try:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(me) + "\n").encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a waiting run then re-creates a fresh file
        os.close(fd)
