"""The fused kernels compile for Hopper (sm_90) in Triton's real compiler, not only in the
interpreter the other CPU tests use, with 16-byte state accesses and no local memory
(`bench/kernel_asm.py`; ahead of time, no GPU needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the kernels are Triton kernels")
ROOT = Path(__file__).resolve().parents[2]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason=f"this triton ships no {CUOBJDUMP.name}")
def test_kernels_build_for_sm90_with_wide_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns unless the default is named
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_asm.py"), "--only", "update"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "|---" not in line]
    assert len(rows) == 8  # the header and seven kernels
    assert all("| 16 |" in row for row in rows[1:])
