"""One writer per output folder (data/lock.py): a second run while the first holds the folder is
refused naming the holder; a lock left by a dead process is taken over."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from puregen_fast.data.lock import LOCK, out_lock
from puregen_fast.errors import UsageError


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
