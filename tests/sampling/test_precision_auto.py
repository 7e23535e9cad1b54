"""``--precision auto`` (issue 24 item 5): fp32 or bf16, whichever runs a step faster here,
timed once per machine and model and kept in the project cache; each verdict forced through a
stand-in timer, and once for real on this CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.sampling import precision as P

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))


def _timer(fp32: float, bf16: float, calls: list):
    def timer(kind, model, shape, device):
        calls.append((kind, shape))
        return {"fp32": fp32, "bf16": bf16}

    return timer


def _engine(**kw) -> pg.Purifier:
    torch.manual_seed(0)
    return pg.Purifier("ebm", ebm=pg.EBMSNGAN32(nf=4), ebm_steps=2, device="cpu",
                       backend="reference", **kw)  # fmt: skip


@pytest.mark.parametrize("fp32, bf16, want", [(2.0, 1.0, "bf16"), (1.0, 1.0, "fp32"),
                                              (1.1, 1.0, "fp32")])  # fmt: skip
def test_auto_takes_bf16_only_when_clearly_faster_and_keeps_the_verdict(
        monkeypatch, fp32, bf16, want):  # fmt: skip
    monkeypatch.setattr(P, "cpu_bf16", lambda: (True, "stand-in units"))
    calls: list = []
    monkeypatch.setattr(P, "_time_steps", _timer(fp32, bf16, calls))
    p = _engine(precision="auto")
    assert p.config.precision == want and calls == [("ebm", (P.PROBE_BATCH, 3, 32, 32))]
    assert p.identity()["precision"] == want and "precision_reason" not in p.identity()
    assert f"bf16 {fp32 / bf16:.2f}x the speed of fp32" in p.describe()["precision_reason"]
    assert p.sampler.cfg.precision == want  # what the chain runs in
    # kept: the next engine on this machine does not time again
    monkeypatch.setattr(P, "_time_steps", lambda *a: pytest.fail("timed twice"))
    q = _engine(precision="auto")
    assert q.config.precision == want and "kept from an earlier run" in q.precision_reason
    kept = json.loads(P.cache_file().read_text())
    assert [v["precision"] for v in kept.values()] == [want]
    # a run left at the default fp32 hears of it only where bf16 was clearly faster
    note = _engine().precision_note()
    assert (note is not None) == (want == "bf16")
    if note:
        assert "bf16 ran 2.0x as fast as fp32" in note and "--precision auto" in note


def test_without_bf16_units_auto_is_fp32_untimed(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16", lambda: (False, "no AMX or AVX512-BF16"))
    monkeypatch.setattr(P, "_time_steps", lambda *a: pytest.fail("timed"))
    p = _engine(precision="auto")
    assert p.config.precision == "fp32" and "no bf16 matrix units" in p.precision_reason


def test_auto_gives_the_bytes_of_the_precision_it_chose(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16", lambda: (True, "stand-in units"))
    monkeypatch.setattr(P, "_time_steps", _timer(2.0, 1.0, []))
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    auto = _engine(precision="auto")(x, np.arange(3))
    assert np.array_equal(auto, _engine(precision="bf16")(x, np.arange(3)))


def test_auto_on_this_machine_times_once_and_info_shows_it(capsys):
    """For real: whichever it picks here, it picks by a measurement and says so."""
    p = _engine(precision="auto")
    assert p.config.precision in ("fp32", "bf16")
    if P.cpu_bf16()[0]:
        assert "measured now" in p.precision_reason
        assert main(["info", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)["precision_auto"]
        (v,) = info["verdicts"].values()
        assert v["precision"] == p.config.precision and set(v["seconds"]) == {"fp32", "bf16"}
    else:
        assert "no bf16 matrix units" in p.precision_reason


def test_auto_under_torchrun_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["purify", "--dataset", "npz", "--data-dir", str(tmp_path / "x.npz"),
               "--method", "ebm", "--precision", "auto", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "--precision auto under torchrun" in capsys.readouterr().err
