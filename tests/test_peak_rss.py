"""`peak_rss.peak_rss_mib` in a fresh interpreter counts its own memory, not its parent's: CI's
slow stage failed two memory-cap tests when ru_maxrss carried a pytest worker's 1.4 GB into the
child it forked."""

from __future__ import annotations

import subprocess
import sys

from peak_rss import SOURCE


def test_a_child_of_a_grown_parent_reports_its_own_peak():
    grown = bytearray(400 * 2**20)
    grown[:: 4096] = b"\1" * len(grown[:: 4096])  # touch every page: resident in the parent
    code = SOURCE + (
        "import resource\n"
        "print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    # preexec_fn makes subprocess fork (not vfork/posix_spawn), as the tests' memory caps do
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       preexec_fn=lambda: None, timeout=60, check=True)  # fmt: skip
    own, inherited = map(float, r.stdout.split())
    # an interpreter without torch: tens of MB; ru_maxrss (printed second) says 400+ on Linux
    assert own < 200, r.stdout
    del grown
