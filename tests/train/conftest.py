"""Set-up for the training tests: every module runs on one intra-op thread (tests/conftest.py)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield
