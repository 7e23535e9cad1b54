"""DDPMSchedule / reference.ddpm_step / ddpm_purify against diffusers' DDPMScheduler."""

import pytest
import torch
from torch import nn

import puregen_fast as pg

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference for the schedule")


def scheduler():
    return diffusers.DDPMScheduler(num_train_timesteps=1000)


def test_schedule_tables_equal_diffusers():
    s, d = pg.DDPMSchedule(), scheduler()
    assert torch.equal(s.betas, d.betas)
    assert torch.equal(s.alphas_cumprod, d.alphas_cumprod)
    assert d.config.variance_type == "fixed_small" and d.config.clip_sample
    assert d.config.prediction_type == "epsilon" and d.config.beta_schedule == "linear"


def test_ddpm_step_equals_diffusers_for_every_t():
    s, d = pg.DDPMSchedule(), scheduler()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g) * 1.5
    eps = torch.randn(2, 3, 5, 7, generator=g)
    worst = 0.0
    for t in range(1000):
        gd = torch.Generator().manual_seed(t)
        want = d.step(eps, t, x, generator=gd).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        got = pg.reference.ddpm_step(s, eps, t, x, z if t > 0 else None)
        worst = max(worst, float((got - want).abs().max()))
    assert worst < 1e-6, worst


def test_ddpm_step_refuses_bad_t_and_missing_noise():
    s = pg.DDPMSchedule()
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="timestep 1000"):
        pg.reference.ddpm_step(s, x, 1000, x, x)
    with pytest.raises(ValueError, match="noise is required"):
        pg.reference.ddpm_step(s, x, 5, x, None)


class TinyEps(nn.Module):
    """A small time-dependent epsilon model that records the timesteps it sees and answers both
    our call convention and diffusers'."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.seen: list[int] = []

    def forward(self, x, timestep, return_dict=False):
        t = int(timestep)
        self.seen.append(t)
        return self.conv(x) * (1 + t / 1000.0)


def test_ddpm_purify_noises_at_steps_and_denoises_from_steps_minus_one():
    torch.manual_seed(0)
    steps, shape = 75, (2, 3, 8, 8)
    x = torch.rand(shape) * 2 - 1
    model = TinyEps()
    d = scheduler()
    # the authors' loop: add_noise at t=steps, then step over timesteps[-steps:]
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(shape, generator=g)
    want = d.add_noise(x, z0, torch.LongTensor([steps]))
    with torch.no_grad():
        for t in d.timesteps[-steps:]:
            want = d.step(model(want, t), t, want, generator=g).prev_sample
    authors_seen = list(model.seen)
    assert authors_seen == list(range(steps - 1, -1, -1))
    # the same draws, injected: [0] forward, [i] reverse step i (t = steps - i)
    g2 = torch.Generator().manual_seed(3)
    noise = torch.stack(
        [torch.randn(shape, generator=g2) for _ in range(steps)] + [torch.zeros(shape)]
    )
    model.seen.clear()
    got = pg.reference.ddpm_purify(model, pg.DDPMSchedule(), x, steps, noise=noise)
    assert model.seen == authors_seen
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_ddpm_purify_checks_inputs():
    s, model = pg.DDPMSchedule(), TinyEps()
    with pytest.raises(ValueError, match="noise must have shape"):
        pg.reference.ddpm_purify(
            model, s, torch.zeros(1, 3, 4, 4), 5, noise=torch.zeros(5, 1, 3, 4, 4)
        )
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pg.reference.ddpm_purify(model, s, torch.full((1, 3, 4, 4), 2.0), 5)
    with pytest.raises(ValueError, match="steps"):
        pg.reference.ddpm_purify(model, s, torch.zeros(1, 3, 4, 4), 1000)
