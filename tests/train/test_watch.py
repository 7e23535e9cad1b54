"""The divergence watch, the Pillow plots, the checkpoint directory and the flag generation of
`puregen-fast train`."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from PIL import Image

from puregen_fast.train.config import DDPMConfig, EBMConfig, add_config_arguments, recipe_of
from puregen_fast.train.plots import save_curves, save_grid
from puregen_fast.train.state import RunDir
from puregen_fast.train.watch import DivergenceWatch, WatchConfig


def _feed(w: DivergenceWatch, values: list[float], start: int = 1) -> list[str | None]:
    return [w.check(start + i, {"energy_abs": v, "grad_norm": 1.0}) for i, v in enumerate(values)]


def test_watch_fires_on_growth_after_patience():
    w = DivergenceWatch(WatchConfig(factor=10, patience=3, window=20, warmup=5), ["energy_abs"])
    assert _feed(w, [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]) == [None] * 6
    assert w.check(7, {"energy_abs": 50.0}) is None and w.pending  # one spike: wait
    assert w.check(8, {"energy_abs": 1.0}) is None and not w.pending  # it recovered
    assert _feed(w, [60.0, 70.0], start=9) == [None, None]
    reason = w.check(11, {"energy_abs": 80.0})
    assert reason is not None and "since step 9" in reason and "energy_abs" in reason


def test_watch_nonfinite_fires_at_once_and_absolute_limits():
    w = DivergenceWatch(WatchConfig(), ["energy_abs"])
    assert "non-finite" in (w.check(1, {"loss": math.nan, "energy_abs": 1.0}) or "")
    w = DivergenceWatch(WatchConfig(patience=1, max_energy=10.0), ["energy_abs"])
    assert w.check(1, {"energy_abs": 5.0}) is None
    assert "--watch-max-energy" in (w.check(2, {"energy_abs": 11.0}) or "")
    off = DivergenceWatch(WatchConfig(enabled=False), ["energy_abs"])
    assert off.check(1, {"energy_abs": math.inf}) is None


def test_watch_state_round_trips():
    cfg = WatchConfig(factor=10, patience=3, window=4, warmup=2)
    a = DivergenceWatch(cfg, ["energy_abs"])
    _feed(a, [1.0, 2.0, 3.0, 4.0, 5.0, 100.0])
    b = DivergenceWatch(cfg, ["energy_abs"])
    b.load_state_dict(a.state_dict())
    assert list(b.history["energy_abs"]) == [2.0, 3.0, 4.0, 5.0] and b.pending
    assert a.check(7, {"energy_abs": 200.0}) == b.check(7, {"energy_abs": 200.0})


def test_plots_write_pngs(tmp_path):
    rows = [torch.rand(5, 3, 8, 8) * 2 - 1, torch.rand(3, 3, 8, 8) * 4 - 2]
    save_grid(rows, tmp_path / "g.png", scale=2)
    im = Image.open(tmp_path / "g.png")
    assert im.size == ((5 * 10 + 2) * 2, (2 * 10 + 2) * 2)
    save_curves(
        {"loss": ([1, 2, 3, 4], [1.0, math.nan, 0.5, -0.2]), "grad_norm": ([1], [3.0])},
        tmp_path / "c.png",
        title="t",
    )
    assert Image.open(tmp_path / "c.png").size[0] == 640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "g.png"]  # no temporaries


def test_a_checkpoint_counts_once_its_state_is_written(tmp_path):
    run = RunDir(tmp_path / "run", "ebm")
    cut = run.ckpt_root / "step_00000002"
    cut.mkdir(parents=True)
    (cut / "model.safetensors").write_bytes(b"half")  # a write cut by a kill
    assert run.checkpoints() == []

    def write_weights(d):
        (d / "w.bin").write_bytes(b"w")

    for step in (1, 2):
        run.save_checkpoint(step, {"x": torch.ones(1)}, write_weights, keep=5)
    assert [k for k, _ in run.checkpoints()] == [1, 2]
    assert sorted(p.name for p in cut.iterdir()) == ["state.pt", "w.bin"]
    assert (run.path / "w.bin").read_bytes() == b"w"
    latest = json.loads((run.ckpt_root / "latest.json").read_text())
    assert latest == {"step": 2, "dir": "step_00000002"}
    assert not list(run.path.rglob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("cls", [EBMConfig, DDPMConfig])
def test_every_field_is_a_flag_with_the_paper_default(cls):
    p = argparse.ArgumentParser()
    add_config_arguments(p, cls)
    args = p.parse_args(["--out", "x"])
    cfg = cls(**vars(args))
    assert cfg == cls(out="x")
    recipe = recipe_of(cfg)
    assert "out" not in recipe and "steps" not in recipe and "lr" in recipe


def test_paper_defaults():
    e = EBMConfig()
    assert (e.bank_size, e.rejuvenation, e.mcmc_steps, e.mcmc_eps, e.mcmc_temp) == (
        10000,
        0.05,
        100,
        1.25e-2,
        1e-4,
    )
    assert (e.data_noise, e.lr, e.batch_size, e.epochs, e.lr_milestones) == (
        1.5e-2,
        1e-4,
        128,
        120,
        "40,75,100",
    )
    assert (e.grad_clip, e.energy_reg, e.warmup_steps, e.hflip) == (0.0, 0.0, 0, False)
    d = DDPMConfig()
    assert (d.max_timestep, d.lr, d.warmup_steps, d.batch_size, d.epochs, d.unet) == (
        250,
        1e-4,
        500,
        256,
        150,
        "paper",
    )
    assert d.ema and d.save_weights == "ema" and not d.hflip
