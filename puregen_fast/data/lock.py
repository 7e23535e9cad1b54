"""One writer per output folder: an exclusive lock held for a run's whole life.

``out_lock(DIR)`` takes an exclusive ``flock`` on ``DIR/.puregen-lock`` and writes the holder's
pid, host and start time into it. The kernel drops the lock when its process dies, so a lock left
by a killed run is stale by construction and the next run simply takes it. A second run while the
first is alive gets a UsageError naming the holder (exit 2). The file is removed on release; a
run that finds the path re-created under it (another run released and a third took it) tries
again, so two holders can never share one folder.

The lock file is opened without following links (``O_NOFOLLOW``) and must be a regular file with
no other hard link, since it is truncated and written: a link, a FIFO or a device planted at its
path is a UsageError naming it (exit 2), never a write into some other file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from puregen_fast.errors import UsageError

__all__ = ["LOCK", "out_lock"]

LOCK = ".puregen-lock"
# O_NONBLOCK: a FIFO opens at once (to be refused) instead of waiting for a reader
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _holder(fd: int) -> str:
    try:  # through the locked descriptor (bounded): the path may be anything by now
        h = json.loads(os.pread(fd, 4096, 0))
        return f"pid {h['pid']} on {h['host']}, since {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is still starting"


def _not_a_lock(path: Path, what: str) -> UsageError:
    return UsageError(
        f"--out {path.parent}: {path.name} is {what}, not a lock file of this tool; it is "
        f"truncated and written on every run, so nothing else may stand there: remove it (check "
        f"what put it there) and run again"
    )


def _open(path: Path) -> int:
    """``path`` opened for writing, refused unless it is (or is created as) a plain file."""
    try:
        fd = os.open(path, _FLAGS, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _not_a_lock(path, "a symbolic link") from None
        if e.errno in (errno.ENXIO, errno.EISDIR, errno.EOPNOTSUPP):  # socket, folder
            raise _not_a_lock(path, "not a regular file") from None
        raise
    st = os.fstat(fd)
    what = None
    if stat.S_ISFIFO(st.st_mode):
        what = "a FIFO"
    elif not stat.S_ISREG(st.st_mode):
        what = "not a regular file"
    elif st.st_nlink > 1:  # a hard link to a file elsewhere: truncating it would change that
        what = f"a file with {st.st_nlink - 1} other hard link(s)"
    if what is not None:
        os.close(fd)
        raise _not_a_lock(path, what)
    return fd


def _acquire(path: Path) -> int:
    """The locked descriptor of ``path``; UsageError when another live run holds it."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = _holder(fd)
            os.close(fd)
            raise UsageError(
                f"--out {path.parent} is being written by another run ({held_by}); wait "
                f"for it to finish or stop it, or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
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
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:  # ours, not what replaced it
                path.unlink()  # before the unlock: a waiting run then re-creates a fresh file
        os.close(fd)
