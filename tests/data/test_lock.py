"""One writer per output folder (data/lock.py): a second run while the first holds the folder is
refused naming the holder; a lock left by a dead process is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from puregen_fast.data.datasets import Dataset
from puregen_fast.data.lock import LOCK, out_lock
from puregen_fast.errors import UsageError
from puregen_fast.pipeline import purify_dataset
from puregen_fast.purifier import Purifier


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "o"
    with out_lock(out):
        holder = json.loads((out / LOCK).read_text())
        with pytest.raises(UsageError, match=rf"pid {holder['pid']} on .*another --out"):
            with out_lock(out):
                pass
    assert not (out / LOCK).exists()  # released
    with out_lock(out):  # and free again
        pass


def test_another_process_holding_the_lock_blocks_until_it_dies(tmp_path):
    out = tmp_path / "o"
    code = (
        "import sys, time\n"
        "from puregen_fast.data.lock import out_lock\n"
        f"with out_lock({str(out)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"pid {p.pid}"):
            with out_lock(out):
                pass
    finally:
        p.kill()  # dies holding it: no clean-up ran
        p.wait()
    assert (out / LOCK).exists()  # left behind, stale
    with out_lock(out):  # the kernel dropped the dead run's lock: taken over
        assert json.loads((out / LOCK).read_text())["pid"] != p.pid


def _planted(kind: str, out, victim):
    lock = out / LOCK
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(out.parent / "nowhere")
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "fifo", "folder"])
def test_a_link_or_fifo_at_the_lock_path_is_refused_and_nothing_is_written(tmp_path, kind):
    """Issue 22: the lock was opened following links and truncated, so a link planted at
    --out/.puregen-lock overwrote the file it points at; a FIFO there gave EINVAL (exit 1)."""
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    _planted(kind, out, victim)
    with pytest.raises(UsageError, match=rf"{LOCK} is .*remove it"):
        with out_lock(out):
            pass
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "nowhere").exists()  # a dangling link is not created through either
    assert os.path.lexists(out / LOCK)  # left for the user to look at


def test_purify_refuses_a_planted_lock_link(tmp_path):
    """The whole run through the pipeline: a UsageError (exit 2) naming the link."""
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (out / LOCK).symlink_to(victim)
    ds = Dataset("npz", "train", np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64),
                 ["a"], "memory")  # fmt: skip
    with pytest.raises(UsageError, match=f"{LOCK} is a symbolic link"):
        purify_dataset(ds, Purifier(method="none", device="cpu"), out, quiet=True)
    assert victim.read_text() == "keep me\n"
