"""Training's progress bar moves within an update (issue 24 item 3): PCD's chain steps tick it
(the `LangevinSampler` progress callback), the update completes it exactly, it shows updates to
a tenth with an ETA, and a run with the bar off trains the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import tqdm
from train_helpers import run_train, shapes, write_npz

import puregen_fast as pg

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = [
    "--nf", "8", "--bank-size", "32", "--batch-size", "16", "--mcmc-steps", "3",
    "--backend", "reference", "--device", "cpu", "--log-every", "1", "--steps", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("progress") / "shapes.npz", shapes(48, seed=0))


def test_pcd_chain_steps_move_the_bar_and_change_no_weight(data, tmp_path, monkeypatch, capsys):
    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.moves = []
            bars.append(self)

        def update(self, n=1):
            self.moves.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    assert run_train("ebm", data, tmp_path / "a", *TINY) == 0
    (bar,) = bars
    assert bar.total == 2 * 4  # 2 updates of 3 chain steps and the update itself
    assert bar.moves == [1, 1, 1, 1] * 2  # moved within each update
    err = capsys.readouterr().err
    assert "train ebm" in err and "1.0/2 [" in err  # updates, to a tenth
    assert run_train("ebm", data, tmp_path / "b", *TINY, "--no-progress") == 0
    assert len(bars) == 1  # no bar, no callback
    a, b = pg.load_ebm(tmp_path / "a").state_dict(), pg.load_ebm(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
