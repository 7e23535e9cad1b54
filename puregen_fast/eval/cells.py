"""The content-addressed store of `eval experiment`: names made from digests of the settings
that decide a result, and one record per cell (a victim trained with one seed on one defense's
training set), written atomically.

Two runs in one folder share the work instead of doing it twice: a cell is computed under an
exclusive lock on its own lock file; a run that finds a cell locked moves on to the next and
comes back to it at the end, by when the other run has written it (`CellStore.run`). Locks are
``flock``s, so a killed run's locks vanish with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from puregen_fast.data.io import atomic_write_json
from puregen_fast.errors import UsageError

__all__ = ["CELL_FORMAT", "CellStore", "array_digest", "digest", "held", "slug"]

CELL_FORMAT = "puregen-fast-experiment-cell"


def digest(obj: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of the sha256 of ``obj`` as sorted JSON."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def array_digest(x: np.ndarray) -> str:
    """The sha256 of an array's dtype, shape and bytes, read in slices (memory-mapped arrays
    stay on disk)."""
    h = hashlib.sha256()
    x = np.asarray(x)
    h.update(repr((x.dtype.str, x.shape)).encode())
    for s in range(0, len(x), 4096):
        h.update(np.ascontiguousarray(x[s : s + 4096]).tobytes())
    return h.hexdigest()


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


@contextlib.contextmanager
def held(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created, never through a link) for the body; yields
    False at once, holding nothing, when ``wait`` is False and another process holds it."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise UsageError(f"{path}: cannot open the lock file ({e.strerror}); is it a link or "
                         f"a folder? remove it") from e  # fmt: skip
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the lock


class CellStore:
    """Cell records in ``folder``, named by their key's digest, with a lock file each under
    ``folder/.locks``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.locks = folder / ".locks"
        self.locks.mkdir(parents=True, exist_ok=True)
        self.reused = 0  # records found finished, over this store's life

    def path(self, key: dict[str, Any]) -> Path:
        name = f"{slug(key['defense'])}__{slug(key['classifier']['name'])}__t{key['target']}"
        return self.folder / f"{name}__s{key['seed']}__{digest(key)}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The finished record for ``key``, or None (none yet, or a damaged one)."""
        path = self.path(key)
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        want = json.loads(json.dumps(key, default=str))
        if isinstance(rec, dict) and rec.get("format") == CELL_FORMAT and rec.get("key") == want:
            return rec
        return None

    def _try(self, key: dict[str, Any], compute: Callable[[], dict[str, Any]], wait: bool
             ) -> tuple[dict[str, Any], bool] | None:  # fmt: skip
        rec = self.get(key)
        if rec is not None:
            return rec, True
        with held(self.locks / (self.path(key).stem + ".lock"), wait=wait) as got:
            if not got:
                return None
            rec = self.get(key)  # written by another run while this one waited
            if rec is not None:
                return rec, True
            rec = {"format": CELL_FORMAT, "key": key, **compute()}
            atomic_write_json(self.path(key), rec, sort_keys=False)
            return rec, False

    def run(
        self,
        jobs: Sequence[tuple[dict[str, Any], Callable[[], dict[str, Any]]]],
        done: Callable[[dict[str, Any], bool], None] = lambda rec, reused: None,
    ) -> list[dict[str, Any]]:
        """Every job's record, in the jobs' order: reused when finished, else computed. A cell
        another run is computing is left for last, then waited for. ``done(record, reused)``
        is called as each one is ready."""
        out: dict[int, dict[str, Any]] = {}
        later = []
        for i, (key, compute) in enumerate(jobs):
            got = self._try(key, compute, wait=False)
            if got is None:
                later.append(i)
                continue
            out[i] = got[0]
            self.reused += got[1]
            done(*got)
        for i in later:
            got = self._try(*jobs[i], wait=True)
            assert got is not None  # a waiting lock always returns
            out[i] = got[0]
            self.reused += got[1]
            done(*got)
        return [out[i] for i in range(len(jobs))]
