"""The one atomic-write helper: every file the project writes goes through it.

A file is written under a temporary name beside its final one (``.<name>.tmp-<pid><suffix>``: the
leading dot hides it, the pid keeps two processes apart, the suffix keeps the extension that
writers such as PIL and ``np.savez`` go by), flushed to disk, renamed over the final name, and
the folder is flushed too, so after a crash a reader finds either the old file or the whole new
one, never a torn one. A failed write removes its temporary file.

Nothing is written through a link: whatever sits at the temporary name (a link planted there, a
file a killed run left) is removed, and the temporary file is created anew with ``O_EXCL |
O_NOFOLLOW`` before the writer opens it; the rename then replaces a link at the final name
itself, never the file it points at. Reads (`read_json`, `file_digest`) take regular files only,
so a FIFO or a device where a file should be is an error, not a hang.

`read_json` and `file_digest` (the sha256 of shards and weights, an archive's published
checksum) read back what is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "file_digest",
    "fsync_dir",
    "open_regular",
    "read_json",
    "tmp_name",
]

_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def tmp_name(path: str | os.PathLike[str]) -> Path:
    """The temporary name `atomic_path` writes ``path`` under."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}{p.suffix}")


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_file(path: Path) -> None:
    """An empty regular file of our own at ``path``: a link (or a killed run's file) there is
    removed, not written through; O_EXCL | O_NOFOLLOW refuse anything that appears meanwhile."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666))


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (links to one are
    followed): a FIFO or device is OSError(EINVAL) at once, instead of a read that never ends."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK)  # a FIFO opens without waiting for a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    tmp: str | os.PathLike[str] | None = None,
    *,
    sync_dir: bool = True,
) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: the file appears under ``p`` whole, or not at
    all (see the module doc). ``tmp`` replaces `tmp_name` where the temporary name must differ,
    e.g. be unique per call when threads of one process may write the same file. ``sync_dir``
    False leaves flushing the folder to the caller, once after many files (`fsync_dir`)."""
    final = Path(path)
    tmp_path = Path(tmp) if tmp is not None else tmp_name(final)
    try:
        _fresh_file(tmp_path)
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(final.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, sync_dir: bool = True) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (``sync_dir``: as in
    `atomic_path`)."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path, sync_dir=sync_dir) as tmp:
        tmp.write_bytes(raw)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON (one trailing newline) in ``path``, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike[str]) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """The hex digest (``algo``, a `hashlib` name) of a file, read in chunks."""
    h = hashlib.new(algo)
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
