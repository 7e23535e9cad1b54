"""bf16 on a CPU with bf16 matrix units (issue 14; DESIGN 2.3), for a trained small EBM and DDPM:
per-image mean |purified - input| and the EBM energy of the outputs differ between bf16 and fp32
(same seed) by less than the seed-to-seed spread of fp32; the model outputs the samplers use
(the EBM's input gradient, the UNet's noise prediction) obey the 2x-eager-error rule.
Slow (13 minutes on a shared 2-core CPU, 7 of them training): it trains both models and
compiles each sampler in both precisions. Skips on CPUs without AMX or AVX512-BF16, where bf16
is refused."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_l2
from train_helpers import run_train, shapes, to_x, write_npz

import puregen_fast as pg
from puregen_fast.runtime import cpu_bf16, precision_context
from puregen_fast.sampling.backends import DDPMSampler, LangevinSampler

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cpu_bf16()[0], reason=f"bf16 refused here: {cpu_bf16()[1]}"),
]
CPU = torch.device("cpu")
SEEDS = range(4)
N = 32

EBM = ["--nf", "8", "--backend", "reference", "--device", "cpu", "--no-progress",
       "--bank-size", "256", "--batch-size", "32", "--mcmc-steps", "10", "--lr", "1e-3",
       "--epochs", "25", "--steps", "250", "--ckpt-every", "100000",
       "--log-every", "50"]  # fmt: skip
DDPM = ["--unet", "tiny", "--device", "cpu", "--no-progress", "--batch-size", "32",
        "--lr", "2e-3", "--warmup-steps", "20", "--epochs", "20", "--steps", "200",
        "--ckpt-every", "100000", "--log-every", "50", "--purify-steps", "20"]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    data = write_npz(root / "shapes.npz", shapes(320, seed=0))
    assert run_train("ebm", data, root / "ebm", *EBM) == 0
    assert run_train("ddpm", data, root / "ddpm", *DDPM) == 0
    return pg.load_ebm(root / "ebm"), pg.load_ddpm(root / "ddpm")


@pytest.fixture(scope="module")
def x():
    return to_x(shapes(N, seed=1))  # held out: another draw of the training family


def _stats(ebm, x, out):
    """Per image: mean |out - x| and the EBM energy of the output (fp32, eager)."""
    with torch.no_grad():
        return (out - x).abs().mean(dim=(1, 2, 3)), ebm(out).float()


def _within_spread(run, ebm, x):
    """bf16 vs fp32 on seed 0 against the spread of fp32 over seeds: for the batch means, and
    for nearly every image."""
    fp32 = [_stats(ebm, x, run("fp32", s)) for s in SEEDS]
    low = _stats(ebm, x, run("bf16", 0))
    for k, what in enumerate(("mean |purified - input|", "energy")):
        per_seed = torch.stack([f[k] for f in fp32])  # (seeds, images)
        means = per_seed.mean(1)
        spread = float(means.max() - means.min())
        diff = abs(float(low[k].mean() - means[0]))
        assert diff < spread, f"{what}: bf16 - fp32 = {diff:.3g}, seed spread {spread:.3g}"
        img_spread = per_seed.max(0).values - per_seed.min(0).values
        inside = ((low[k] - per_seed[0]).abs() < img_spread).float().mean()
        assert inside >= 0.9, f"{what}: only {inside:.0%} of images within their seed spread"


def test_ebm_bf16_is_statistically_fp32(models, x):
    ebm, _ = models
    ids = torch.arange(N)
    temp = 1e-4

    def eager_grad(prec):
        with precision_context(prec, CPU), torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(ebm(xg).float().sum() / temp, [xg])
        return g

    g32 = eager_grad("fp32")
    g_fast = LangevinSampler(ebm, 1, temp=temp, device=CPU, precision="bf16").fast.grad(x)
    assert g_fast.dtype == torch.float32 and torch.isfinite(g_fast).all()
    err_fast, err_eager = rel_l2(g_fast, g32), rel_l2(eager_grad("bf16"), g32)
    assert 1e-6 < err_fast <= 2 * err_eager, (err_fast, err_eager)  # bf16 really ran

    def run(prec, seed):
        return LangevinSampler(ebm, 50, seed=seed, device=CPU, precision=prec)(x, ids)

    _within_spread(run, ebm, x)


def test_ddpm_bf16_is_statistically_fp32(models, x):
    ebm, unet = models
    ids = torch.arange(N)
    sched = pg.DDPMSchedule()
    t = torch.tensor(10)
    noised = sched.add_noise(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)),
                             10)  # fmt: skip

    def eager_eps(prec):
        with torch.no_grad(), precision_context(prec, CPU):
            return unet(noised, t).float()

    eps32 = eager_eps("fp32")
    fast = DDPMSampler(unet, sched, 20, device=CPU, precision="bf16").fast
    with torch.no_grad():
        eps_fast = fast._eps(noised, t).float()
    err_fast, err_eager = rel_l2(eps_fast, eps32), rel_l2(eager_eps("bf16"), eps32)
    assert 1e-6 < err_fast <= 2 * err_eager, (err_fast, err_eager)

    def run(prec, seed):
        return DDPMSampler(unet, sched, 20, seed=seed, device=CPU, precision=prec)(x, ids)

    _within_spread(run, ebm, x)
