"""Never hand back garbage (issue 11), in real (tiny) training runs: diverged training samples
and sample grids roll the run back to weights from before the fault; an interrupt exits 130;
`--resume` survives a damaged newest checkpoint, a killed run's leftovers and its metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import run_train, shapes, weights, write_npz

import puregen_fast as pg
from puregen_fast.train import EBMConfig, TrainingDiverged, train_ebm
from puregen_fast.train import ebm as train_ebm_mod
from puregen_fast.train import loop as loop_mod
from puregen_fast.train.state import RunDir

TINY = [
    "--nf", "8", "--bank-size", "64", "--batch-size", "16", "--mcmc-steps", "2",
    "--backend", "reference", "--device", "cpu", "--no-progress", "--log-every", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("recdata") / "shapes.npz", shapes(64, seed=0))


def _train(data: Path, out: Path, *extra: str) -> int:
    return run_train("ebm", data, out, *TINY, *extra)


def _cfg(data: Path, out: Path, **kw) -> EBMConfig:
    base = dict(
        dataset="npz", data_dir=str(data), out=str(out), nf=8, bank_size=64, batch_size=16,
        mcmc_steps=2, backend="reference", device="cpu", progress=False, log_every=1,
    )  # fmt: skip
    return EBMConfig(**{**base, **kw})


def _steps(out: Path) -> list[int]:
    return [k for k, _ in RunDir(out, "ebm").checkpoints()]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# -- item 2: training samples are checked like purified output -------------------------------


def test_negatives_out_of_range_roll_back_before_the_weights_that_drew_them(
    data, tmp_path, monkeypatch
):
    real = train_ebm_mod.EBMTrainer._negatives

    def negatives(self, step, n):  # the chains leave the image range at update index 5
        x, rejuv = real(self, step, n)
        return (x * 10 if step >= 5 else x), rejuv

    monkeypatch.setattr(train_ebm_mod.EBMTrainer, "_negatives", negatives)
    out = tmp_path / "far"
    with pytest.raises(TrainingDiverged) as ei:
        train_ebm(_cfg(data, out, ckpt_every=1, steps=12))
    e = ei.value
    # update 5 sampled with the weights of step 5: that checkpoint is suspect, step 4 is not
    assert (e.step, e.good_step) == (6, 4), str(e)
    assert "training samples left [-5, 5]" in e.reason and "--watch-sample-margin 4" in str(e)
    assert _steps(out) == [3, 4]  # step 5 (kept with 3, 4) is set aside, not resumable
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert _same_weights(out, out / "checkpoints" / "step_00000004")
    aside = json.loads((out / "divergence.json").read_text())["set_aside"]
    assert (Path(aside) / "step_00000005" / "state.pt").is_file()
    bank = torch.load(out / "checkpoints/step_00000004/state.pt", weights_only=True)["bank"]
    assert bank.abs().max() <= 5  # the saved chains are in range


def test_nan_grid_rolls_back_and_is_never_drawn(data, tmp_path, monkeypatch, capsys):
    def rows(self):  # the final weights' samples are NaN
        x = torch.zeros(2, 3, 16, 16)
        return [x, x * float("nan")]

    monkeypatch.setattr(train_ebm_mod.EBMTrainer, "sample_rows", rows)
    out = tmp_path / "grid"
    assert _train(data, out, "--steps", "3", "--ckpt-every", "1") == 2
    err = capsys.readouterr().err
    assert "diverged at step 3: the sample grid row 1: 2 of 2 image(s) hold non-finite" in err
    assert _steps(out) == [1, 2]  # the final weights were not saved
    assert not list((out / "samples").glob("*.png"))
    # without the watch the run goes on, without the grid
    out = tmp_path / "nowatch"
    assert _train(data, out, "--steps", "3", "--no-watch") == 0
    assert "no grid at step 3" in capsys.readouterr().err
    assert not list((out / "samples").glob("*.png")) and _steps(out) == [0, 3]


# -- item 3: interrupts, the last line, damaged checkpoints, leftovers, metrics -------------


def test_interrupt_saves_and_exits_130(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop_mod.Loop, "_stop_requested", lambda self: self.step >= 3)
    out = tmp_path / "int"
    assert _train(data, out, "--steps", "8") == 130
    last = _last_line(capsys.readouterr().err)
    assert "stopped after 3 of" in last and "an interrupt" in last and "--resume" in last
    assert _steps(out) == [0, 3]


def test_last_line_of_a_finished_run(data, tmp_path, capsys):
    out = tmp_path / "fin"
    assert _train(data, out, "--epochs", "1") == 0  # 64 images / 16: 4 steps
    last = _last_line(capsys.readouterr().err)
    assert "finished, 4 of 4 steps" in last and "--resume" not in last
    assert f"purify --ebm {out}" in last and "pg.load_ebm" in last
    assert _train(data, tmp_path / "part", "--steps", "2") == 0
    assert "--resume" in _last_line(capsys.readouterr().err)  # --steps: there is more to do


def _damage(ckpt: Path, what: str) -> None:
    if what == "state.pt":
        b = (ckpt / "state.pt").read_bytes()
        (ckpt / "state.pt").write_bytes(b[: len(b) // 2])
    elif what == "config.json":
        (ckpt / "config.json").write_text('{"nf": 8,')
    else:
        b = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(b[: len(b) // 2])


@pytest.fixture(scope="module")
def full6(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    assert _train(data, out, "--steps", "6", "--ckpt-every", "2") == 0
    return out


@pytest.mark.parametrize("what", ["state.pt", "config.json", "model.safetensors"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(data, tmp_path, full6, capsys, what):
    out = tmp_path / "run"
    assert _train(data, out, "--steps", "4", "--ckpt-every", "2") == 0
    _damage(out / "checkpoints" / "step_00000004", what)
    capsys.readouterr()
    assert _train(data, out, "--steps", "6", "--ckpt-every", "2", "--resume") == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step_00000004" in err and "damaged" in err
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["from"] for r in rows if r.get("event") == "resume"][-1].endswith("step_00000002")
    assert _same_weights(out, full6)  # resumed exactly from step 2
    assert _steps(out) == [2, 4, 6]  # the damaged step 4 was set aside, then re-made


def test_resume_with_every_checkpoint_damaged_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, "--steps", "2", "--ckpt-every", "2") == 0
    for k in (0, 2):
        _damage(out / "checkpoints" / f"step_{k:08d}", "state.pt")
    assert _train(data, out, "--steps", "4", "--resume") == 2
    assert "every checkpoint is damaged" in capsys.readouterr().err
    # a checkpoint named explicitly is not replaced by another
    named = str(out / "checkpoints" / "step_00000002")
    assert _train(data, out, "--steps", "4", "--resume", named) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_resume_cleans_leftovers_and_truncates_metrics(data, tmp_path, full6, capsys, request):
    out = tmp_path / "run"
    assert _train(data, out, "--steps", "6", "--ckpt-every", "4") == 0  # checkpoints 0, 4, 6
    # a kill after step 6 was logged but before its checkpoint was complete
    ck = out / "checkpoints"
    (ck / "step_00000006" / "state.pt").unlink()
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "input()"], stdin=-1)
    request.addfinalizer(lambda: (live.kill(), live.wait()))
    leftovers = [
        out / f".model.safetensors.tmp-{dead}.safetensors",
        ck / "step_00000004" / f".state.pt.tmp-{dead}.pt",
        out / "samples" / f".step_00000004.png.tmp-{dead}.png",
        ck / f".latest.json.tmp-{dead}.json",
    ]
    kept = out / f".model.safetensors.tmp-{live.pid}.safetensors"  # another process writing
    for p in [*leftovers, kept]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # a line cut by the kill
    assert _train(data, out, "--steps", "6", "--ckpt-every", "4", "--resume") == 0
    assert "removed 5 leftover(s)" in capsys.readouterr().err  # 4 files + step_00000006/
    assert not any(p.exists() for p in leftovers) and kept.exists()
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # 5 and 6 once each: the rows after step 4 were dropped
    assert [r["event"] for r in rows if "event" in r] == ["resume"]
    assert _same_weights(out, full6) and _steps(out) == [0, 4, 6]


# -- the default watch stays quiet on a healthy run that learns ------------------------------


@pytest.mark.slow
def test_default_watch_is_quiet_on_a_learning_run(tmp_path):
    """600 updates of a small EBM at 10x the paper's learning rate: its grad norm rises about
    3.6x within 150 updates while it learns, and settles. The default watch must not fire."""
    data = write_npz(tmp_path / "s.npz", shapes(320, seed=0))
    out = tmp_path / "run"
    extra = ["--bank-size", "256", "--batch-size", "32", "--mcmc-steps", "10", "--lr", "1e-3",
             "--epochs", "60", "--steps", "600", "--ckpt-every", "100000"]  # fmt: skip
    assert _train(data, out, *extra) == 0
    assert not (out / "divergence.json").exists()
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["sample_abs_max"] for r in rows if "sample_abs_max" in r) < 5
    ebm = pg.load_ebm(out)
    p = pg.Purifier(method="ebm", ebm=ebm, ebm_steps=10, device="cpu", backend="reference")
    assert p(shapes(2, seed=3), np.arange(2)).shape == (2, 16, 16, 3)
