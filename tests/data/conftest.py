"""Set-up for the data tests."""

import pytest


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A fresh cache per test, and download addresses that never reach the network."""
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))
    for name in ("CIFAR10", "CINIC10", "TINYIMAGENET"):
        monkeypatch.setenv(f"PUREGEN_FAST_URL_{name}", "http://127.0.0.1:9/none")
