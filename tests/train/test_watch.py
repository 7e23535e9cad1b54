"""The divergence watch (its spike, trend and sample rules), the Pillow plots, the checkpoint
directory and the flag generation of `puregen-fast train`."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from puregen_fast.train.config import DDPMConfig, EBMConfig, add_config_arguments, recipe_of
from puregen_fast.train.plots import SampleRangeError, save_curves, save_grid
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
    with Image.open(tmp_path / "g.png") as im:  # closed: no ResourceWarning in the suite
        assert im.size == ((5 * 10 + 2) * 2, (2 * 10 + 2) * 2)
    save_curves(
        {"loss": ([1, 2, 3, 4], [1.0, math.nan, 0.5, -0.2]), "grad_norm": ([1], [3.0])},
        tmp_path / "c.png",
        title="t",
    )
    with Image.open(tmp_path / "c.png") as im:
        assert im.size[0] == 640
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


# -- the slow blow-up (trend) rule -------------------------------------------------------------


def _lognormal(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    return np.exp(rng.normal(0.0, sigma, n))


def _ramp(seed: int, plateau: bool) -> tuple[np.ndarray, int]:
    """A noisy flat grad norm for 500 steps, then a geometric 9x rise over 200 steps (the real
    run's), then either still rising or flat at 9x: (values, the first step of the rise)."""
    rng = np.random.default_rng(seed)
    base, rise = 500, np.arange(1, 401)
    level = 9.0 ** (np.minimum(rise, 200) / 200) if plateau else 9.0 ** (rise / 200)
    return np.concatenate([np.ones(base), level]) * _lognormal(rng, base + 400, 0.3), base + 1


def _run_watch(w: DivergenceWatch, series: dict[str, np.ndarray]) -> tuple[int | None, float]:
    """Feed the series step by step: (the step it fired at or None, the largest trend ratio)."""
    top = 0.0
    for i in range(len(next(iter(series.values())))):
        reason = w.check(i + 1, {k: float(v[i]) for k, v in series.items()})
        for k in w.trend_keys:
            r = w.trend_ratio(k)
            top = max(top, r[0] if r else 0.0)
        if reason is not None:
            return i + 1, top
    return None, top


@pytest.mark.parametrize("plateau", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_trend_rule_fires_on_a_slow_9x_rise(seed, plateau):
    x, start = _ramp(seed, plateau)
    # the spike rule alone never sees it: no step is 100x its running median
    old = DivergenceWatch(WatchConfig(trend_window=0), ["grad_norm"])
    assert _run_watch(old, {"grad_norm": x})[0] is None
    w = DivergenceWatch(WatchConfig(), ["grad_norm"])
    fired, _ = _run_watch(w, {"grad_norm": x})
    # by the time it has grown 9x, give or take the noise (9x at start + 200, 10x at + 210)
    assert fired is not None and start + 100 < fired < start + 210, fired
    assert "grad_norm grew" in w.fired[1] and "--watch-trend-factor 6" in w.fired[1]
    # the rollback goes to a checkpoint from before the rise, not one from the ramp
    assert w.suspect_from is not None and w.suspect_from <= start


def _healthy(seed: int, n: int = 4000) -> dict[str, np.ndarray]:
    """A decaying loss with realistic noise and spikes; a flat noisy grad norm with rarer,
    larger spikes; a second grad norm that rises 3.5x over 150 steps and settles (as a small EBM
    run at 10x the paper's learning rate did while it learned)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = (0.05 + np.exp(-t / 600)) * _lognormal(rng, n, 0.25)
    loss[rng.random(n) < 0.01] *= 3
    gn = 2.0 * _lognormal(rng, n, 0.5)
    gn[rng.random(n) < 0.005] *= 10
    settle = np.interp(t, [0, 300, 450, n], [1.0, 1.0, 3.5, 3.5]) * _lognormal(rng, n, 0.4)
    return {"loss": loss, "grad_norm": gn, "gn_settle": settle}


@pytest.mark.parametrize("seed", range(5))
def test_trend_rule_is_quiet_on_healthy_runs(seed):
    s = _healthy(seed)
    w = DivergenceWatch(WatchConfig(), ["loss", "grad_norm", "gn_settle"])
    fired, top = _run_watch(w, s)
    assert fired is None, w.fired
    assert 3.0 < top < 0.85 * WatchConfig().trend_factor, top  # the settling rise is seen


def test_trend_rule_off_and_its_state_round_trips():
    x, _ = _ramp(0, plateau=False)
    off = DivergenceWatch(WatchConfig(trend_window=0), ["grad_norm"])
    assert _run_watch(off, {"grad_norm": x})[0] is None
    cfg = WatchConfig(trend_window=8, trend_factor=2.0, patience=2)
    a, b = DivergenceWatch(cfg, ["grad_norm"]), DivergenceWatch(cfg, ["grad_norm"])
    for i, v in enumerate([1.0] * 8 + [3.0] * 2):
        a.check(i + 1, {"grad_norm": v})
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain data, as in state.pt
    assert list(b.trend["grad_norm"]) == list(a.trend["grad_norm"]) and b.pending
    assert a.check(11, {"grad_norm": 3.0}) == b.check(11, {"grad_norm": 3.0}) is not None
    assert a.suspect_from == b.suspect_from == 2  # the end of the baseline
    assert "--watch-trend-window must be >= 0" in WatchConfig(trend_window=-1).problems()[0]
    assert "--watch-trend-factor" in WatchConfig(trend_factor=1.0).problems()[0]


def test_trend_flags_are_run_control():
    p = argparse.ArgumentParser()
    add_config_arguments(p, EBMConfig)
    args = p.parse_args(["--out", "x", "--watch-trend-window", "0", "--watch-trend-factor", "8"])
    cfg = EBMConfig(**vars(args))
    w = WatchConfig.from_config(cfg)
    assert (w.trend_window, w.trend_factor, w.sample_margin) == (0, 8.0, 4.0)
    assert "watch_trend_window" not in recipe_of(cfg)  # free to change on --resume
    assert (EBMConfig().watch_trend_window, EBMConfig().watch_trend_factor) == (200, 6.0)


# -- training samples are checked like purified output (DESIGN 2.4) ---------------------------


def test_samples_out_of_range_or_non_finite_fire_at_once():
    w = DivergenceWatch(WatchConfig(patience=5), ["energy_abs"])
    assert w.check(1, {"energy_abs": 1.0, "sample_abs_max": 4.9}) is None
    reason = w.check(2, {"energy_abs": 1.0, "sample_abs_max": 5.5})
    assert reason is not None and "--watch-sample-margin 4" in reason
    assert w.suspect_from == 1  # the weights that drew them
    w = DivergenceWatch(WatchConfig(sample_margin=0.5), ["energy_abs"])
    assert "training samples left" in (w.check(1, {"sample_abs_max": 1.6}) or "")
    w = DivergenceWatch(WatchConfig(), ["energy_abs"])
    assert "non-finite" in (w.check(1, {"sample_abs_max": math.inf}) or "")


def test_grid_refuses_nan_and_diverged_samples(tmp_path):
    ok = torch.rand(4, 3, 8, 8) * 2 - 1
    nan = ok.clone()
    nan[1, 0, 2, 2] = math.nan
    with pytest.raises(SampleRangeError, match="row 1: 1 of 4 image"):
        save_grid([ok, nan], tmp_path / "g.png")
    far = ok * 6
    with pytest.raises(SampleRangeError, match="margin m = 4"):
        save_grid([ok, far], tmp_path / "g.png")
    save_grid([ok, far], tmp_path / "g.png", margin=None)  # range unchecked: drawn clamped
    with pytest.raises(SampleRangeError):
        save_grid([nan], tmp_path / "h.png", margin=None)  # never a NaN drawn black
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]
