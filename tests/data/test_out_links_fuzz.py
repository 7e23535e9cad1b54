"""Property-based fuzz of planted links in ``--out`` (issue 22): symbolic links (to a file, to a
folder, dangling), hard links, FIFOs and folders placed at the lock, the class folders, the run
record, the manifest, a shard, a completion record and their temporary names, before a first
run or between a run and its ``--resume`` / ``--overwrite``. Whatever is planted: the run ends
in success or the project's own error (UsageError, exit 2), nothing outside ``--out`` changes
(a sentinel tree beside it is compared byte for byte, with modes and times), no case hangs, and
a successful run reads back the input's images.

The default run tries ``DEFAULT_EXAMPLES`` cases, ``-m slow`` tries ``SLOW_EXAMPLES``; each run
prints its counts (``-s``)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import FuzzHang, run_fuzz, tree_snapshot
from hypothesis import strategies as st

import puregen_fast as pg
from puregen_fast.data.datasets import Dataset
from puregen_fast.data.io import tmp_name
from puregen_fast.data.lock import LOCK
from puregen_fast.data.writer import MANIFEST, RUN_STATE
from puregen_fast.errors import UsageError
from puregen_fast.pipeline import FILTER_STATE, purify_dataset
from puregen_fast.purifier import Purifier

DEFAULT_EXAMPLES = 25
SLOW_EXAMPLES = 2_000
HANG_S = 20.0

_NAMES = [LOCK, "a", "b", RUN_STATE, MANIFEST, FILTER_STATE, "images-00000.npy",
          "labels-00001.npy", "shard-00000.tar", ".puregen-shard-00000.json"]  # fmt: skip
_PLANT = st.tuples(
    st.sampled_from(_NAMES),
    st.booleans(),  # at the temporary name instead
    st.sampled_from(["file-link", "dir-link", "dangling", "hard", "fifo", "dir"]),
)
_CASE = st.tuples(
    st.sampled_from(["npy", "png", "webdataset"]),
    st.lists(_PLANT, max_size=4),
    st.sampled_from(["before", "between"]),  # before the first run, or before the second
    st.sampled_from([(), ("resume",), ("overwrite",), ("resume", "overwrite")]),
)


def _outside(base: Path, out: Path) -> dict:
    """`tree_snapshot` of everything beside ``out``, without the link counts: a hard link
    planted in ``--out`` under one of the tool's own names may be removed there (which lowers
    the outside file's count); its content, mode and time may not change."""
    snap = tree_snapshot(base, out)
    return {k: v[:2] + v[3:] if v[0] == "file" else v for k, v in snap.items()}


def _plant(out: Path, box: Path, name: str, at_tmp: bool, kind: str) -> None:
    p = tmp_name(out / name) if at_tmp else out / name
    if os.path.lexists(p):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if kind == "file-link":
        p.symlink_to(box / "victim.txt")
    elif kind == "dir-link":
        p.symlink_to(box / "dir", target_is_directory=True)
    elif kind == "dangling":
        p.symlink_to(box / "nowhere")
    elif kind == "hard":
        os.link(box / "victim.txt", p)
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        p.mkdir()


def _run(out: Path, fmt: str, flags: tuple) -> str:
    x = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
    y = np.array([0, 1, 2, 0, 1, 2])
    ds = Dataset("npz", "train", x, y, ["a", "b", "c"], "memory")
    try:
        purify_dataset(ds, Purifier(method="none", device="cpu"), out, fmt=fmt, shard_size=3,
                       quiet=True, resume="resume" in flags,
                       overwrite="overwrite" in flags)  # fmt: skip
    except UsageError:
        return "clean error"
    d = pg.load_purified(out)
    assert np.array_equal(np.asarray(d.images), x) and np.array_equal(d.labels, y)
    return "written"


def _one(root: Path, case) -> str:
    fmt, plants, when, flags = case
    base = Path(tempfile.mkdtemp(dir=root))
    try:
        box = base / "box"
        (box / "dir").mkdir(parents=True)
        (box / "victim.txt").write_text("sentinel")
        (box / "dir" / "0.png").write_text("sentinel")
        out = base / "out"
        out.mkdir()
        if when == "between":
            assert _run(out, fmt, ()) == "written"
        for name, at_tmp, kind in plants:
            _plant(out, box, name, at_tmp, kind)
        before = _outside(base, out)
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
        try:
            outcome = _run(out, fmt, flags)
        except FuzzHang:
            outcome = "hang"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if _outside(base, out) != before:
            return "write outside"
        return outcome
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fuzz(tmp_path_factory, n: int) -> dict:
    root = tmp_path_factory.mktemp("linkfuzz")
    return run_fuzz("--out links", _CASE, lambda case: _one(root, case), n, success="written",
                    failures=("hang", "write outside"))  # fmt: skip


def test_out_links_fuzz(tmp_path_factory):
    _fuzz(tmp_path_factory, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_out_links_fuzz_long(tmp_path_factory):
    _fuzz(tmp_path_factory, SLOW_EXAMPLES)
