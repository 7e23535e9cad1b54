"""Shared test setup.

Without a GPU, Triton kernels run in the CPU interpreter (DESIGN 8). ``TRITON_INTERPRET`` is read
when a ``@triton.jit`` function is defined, i.e. when `puregen_fast.kernels` is first imported,
which any test module may do at collection; so it is set here, before any test module loads. On
a CUDA machine it is left alone so the kernels compile for the GPU. Helpers shared by test modules
live in ``helpers.py`` (and ``fixtures_data.py``, ``train_helpers.py``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on a 2-core machine: one core per worker, not two threads each contending
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

from helpers import DEADLINE_ENV, budget_spent  # noqa: E402

from puregen_fast import runtime  # noqa: E402  (after TRITON_INTERPRET, like every import here)

# inductor fixes its cache folder at the first compile; pin it now to the user's compile cache,
# before tests point $PUREGEN_FAST_CACHE at temporary folders, so compiled code outlives a run
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(runtime.compile_cache_dir()))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its nets are tiny, so extra threads only contend, and it matches the subprocess runs."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # what the command line, run in-process, then keeps
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def pytest_runtest_setup(item: pytest.Item) -> None:
    """CI's slow stage runs in what is left of its time budget: a test not started by then is
    skipped, saying so, rather than killed midway (a killed test's subprocesses read as failures).
    """
    if budget_spent():
        pytest.skip(f"not started: the run's time budget (${DEADLINE_ENV}) had ended")
