"""Helpers shared by the tests (importable by name: pyproject puts tests/ on the path)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from puregen_fast.kernels.availability import triton_available

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAD = 31  # NaN elements on each side of a kernel's buffer

# A wall-clock budget for a test run (unix seconds), set by CI's slow stage: tests not started by
# then are skipped, and fuzz runs stop drawing cases (`budget_spent`, `skip_if_cut`).
DEADLINE_ENV = "PUREGEN_TEST_DEADLINE"


def budget_spent() -> bool:
    """True once the run's time budget (``$PUREGEN_TEST_DEADLINE``) has passed."""
    deadline = os.environ.get(DEADLINE_ENV)
    return deadline is not None and time.time() > float(deadline)


def skip_if_cut(label: str, done: int, asked: int) -> None:
    """After a fuzz run that raised nothing: skip, saying how far it got, if the time budget
    ended during it (its count checks would fail on a run cut short)."""
    if budget_spent():
        pytest.skip(f"{label}: ${DEADLINE_ENV} ended the run after {done} of {asked} cases; "
                    "none of them failed")  # fmt: skip


def padded(shape: tuple[int, ...], fill: torch.Tensor, pad: int = PAD) -> tuple:
    """A contiguous view of ``fill``'s values inside a NaN-poisoned buffer (``pad`` elements on
    both sides), so a kernel that writes out of bounds, or leaves an element unwritten, shows."""
    n = fill.numel()
    buf = torch.full((n + 2 * pad,), float("nan"), dtype=fill.dtype, device=fill.device)
    view = buf[pad : pad + n].view(shape)
    view.copy_(fill)
    return buf, view


def pads_untouched(buf: torch.Tensor, n: int, pad: int = PAD) -> bool:
    return bool(buf[:pad].isnan().all() and buf[pad + n :].isnan().all())


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    """Max abs error within ``tol`` times the larger of 1 and the reference's magnitude."""
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def require_kernels() -> None:
    """Skip, with the reason, where the Triton kernels cannot run."""
    ok, why = triton_available(DEV)
    if not ok:
        pytest.skip(f"Triton kernels cannot run here: {why}")


def tree_snapshot(root: Path, skip: Path) -> dict:
    """Everything under ``root`` except ``skip``'s subtree, links not followed: each file's type,
    mode, link count, mtime and content digest, each link's target, each folder's listing (to
    prove that nothing outside a target folder changed)."""
    out: dict = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if d / n != skip)
        out[str(d)] = ("dir", sorted(n for n in os.listdir(d) if d / n != skip))
        for n in filenames:
            p = d / n
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p)] = ("file", st.st_mode, st.st_nlink, st.st_mtime_ns, digest)
            else:
                out[str(p)] = ("other", st.st_mode)
    return out


class FuzzHang(BaseException):
    """Raised by the alarm inside a fuzz case that runs past its time (`run_fuzz`); a
    BaseException, so the code under test cannot swallow it."""


def run_fuzz(label: str, strategy, one, n: int, *, success: str, failures: tuple[str, ...] = (
        "hang",), deadline_ms: int | None = None, min_cases: float = 0.0) -> dict[str, int]:
    """Run ``one(case)`` on ``n`` cases drawn from the hypothesis ``strategy`` and tally the
    outcome names it returns (``"unbuildable"``: the case is rejected, not counted). An exception
    out of ``one`` counts as ``"other exception"``; it and every outcome in ``failures`` fail
    the test, with the first five cases shown. SIGALRM raises `FuzzHang` for ``one`` to turn
    into ``"hang"``. Prints the tally and the process's peak RSS; asserts that both a clean error
    and ``success`` occurred and that at least ``min_cases`` x ``n`` cases were built."""
    import signal
    import time
    import traceback
    from collections import Counter

    from hypothesis import HealthCheck, given, reject, settings
    from peak_rss import peak_rss_mib

    seen: Counter[str] = Counter()
    bad: list[str] = []

    def on_alarm(signum, frame):
        raise FuzzHang

    @settings(max_examples=n, deadline=deadline_ms, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def check(case):
        if budget_spent() and not bad:  # after a failure, run on: it is shrunk and reported
            return
        try:
            outcome = one(case)
        except Exception:
            outcome = "other exception"
            bad.append(f"{case!r}\n{traceback.format_exc()}")
        if outcome in failures:
            bad.append(f"{outcome}: {case!r}")
        seen[outcome] += 1
        if outcome == "unbuildable":
            reject()

    old = signal.signal(signal.SIGALRM, on_alarm)
    t0 = time.perf_counter()
    try:
        check()
    finally:
        signal.signal(signal.SIGALRM, old)
        cases = sum(seen.values()) - seen["unbuildable"]
        peak = peak_rss_mib()
        tally = ", ".join(f"{v} {k}" for k, v in sorted(seen.items()))
        print(f"\n{label} fuzz ({n} asked, {time.perf_counter() - t0:.0f} s): {cases} cases: "
              f"{tally}; peak RSS of the process {peak:.0f} MB")  # fmt: skip
    assert not bad, "\n\n".join(bad[:5])
    skip_if_cut(f"{label} fuzz", cases, n)
    assert cases >= n * min_cases and seen["clean error"] > 0 and seen[success] > 0, dict(seen)
    return dict(seen)


@contextlib.contextmanager
def memory_cap(extra: int) -> Iterator[None]:
    """Fail an allocation of more than ``extra`` bytes beyond what the process maps now
    (RLIMIT_AS), for the body."""
    import resource

    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

