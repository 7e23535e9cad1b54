"""The one atomic-write helper: every file the project writes goes through it.

A file is written under a temporary name beside its final one (``.<name>.tmp-<pid><suffix>``: the
leading dot hides it, the pid keeps two processes apart, the suffix keeps the extension that
writers such as PIL and ``np.savez`` go by), flushed to disk, renamed over the final name, and
the folder is flushed too, so after a crash a reader finds either the old file or the whole new
one, never a torn one. A failed write removes its temporary file.

`read_json` and `file_digest` (the sha256 of shards and weights, an archive's published
checksum) read back what is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "file_digest",
    "fsync_dir",
    "read_json",
    "tmp_name",
]

_CHUNK = 1 << 20


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
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """The hex digest (``algo``, a `hashlib` name) of a file, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
