"""The run's time budget (``$PUREGEN_TEST_DEADLINE``, set by CI's slow stage): tests not started
by then are skipped, saying so, and a fuzz run stops drawing cases and says how far it got."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DEADLINE_ENV, run_fuzz
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


def test_a_test_not_started_by_the_deadline_is_skipped_with_the_reason():
    env = {**os.environ, DEADLINE_ENV: str(time.time() - 1)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_design.py", "-q", "-rs",
         "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:]
    assert " passed" not in run.stdout and " skipped" in run.stdout, run.stdout[-2000:]
    assert f"the run's time budget (${DEADLINE_ENV}) had ended" in run.stdout


def test_a_fuzz_run_cut_by_the_deadline_says_how_far_it_got(monkeypatch):
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 0.5))

    def one(case: int) -> str:
        time.sleep(0.05)
        return "read" if case % 2 else "clean error"

    cut = r"after \d+ of 1000 cases; none of them failed"
    with pytest.raises(pytest.skip.Exception, match=cut):
        run_fuzz("sleepy", st.integers(0, 10**6), one, 1000, success="read")


def test_a_failure_before_the_deadline_still_fails(monkeypatch):
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 0.2))
    calls = []

    def one(case: int) -> str:
        calls.append(case)
        if len(calls) == 1:  # the first case fails, and the deadline passes while it is shrunk
            time.sleep(0.3)
        return "hang"

    with pytest.raises(AssertionError, match="hang"):
        run_fuzz("hanging", st.integers(0, 10**6), one, 1000, success="read")
