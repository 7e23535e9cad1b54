"""pytest-benchmark suite for the samplers: the authors' loop vs the fast path (medians).

    python -m pytest bench/bench_samplers.py --benchmark-columns=median,ops

On CPU it runs a small EBM and UNet; on CUDA the paper's sizes. Not part of the test suite.
"""

import pytest
import torch

import puregen_fast as pg
from puregen_fast.cli.bench import EBM_WIDTHS, UNET_MODELS
from puregen_fast.models.unet import UNET_PRESETS
from puregen_fast.sampling.backends import DDPMSampler, LangevinSampler

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
SIZE = "paper" if CUDA else "small"
B = 256 if CUDA else 8
EBM_STEPS, DDPM_STEPS = (150, 75) if CUDA else (10, 5)


def _sync(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.rand(B, 3, 32, 32, device=DEV) * 2 - 1


@pytest.fixture(scope="module")
def ebm():
    torch.manual_seed(0)
    return pg.EBMSNGAN32(nf=EBM_WIDTHS[SIZE]).to(DEV).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return (
        pg.UNet2D.from_config(UNET_PRESETS[UNET_MODELS[SIZE]]).to(DEV).eval().requires_grad_(False)
    )


@pytest.mark.benchmark(group="ebm")
def test_ebm_authors(benchmark, ebm, x):
    benchmark(_sync(lambda: pg.reference.ebm_purify(ebm, x, EBM_STEPS, check_range=False)))


@pytest.mark.benchmark(group="ebm")
def test_ebm_fast(benchmark, ebm, x):
    s = LangevinSampler(ebm, EBM_STEPS, device=DEV)
    ids = torch.arange(B, device=DEV)
    s(x, ids)  # warm-up: compile and capture, reported by `puregen-fast bench`
    benchmark(_sync(lambda: s(x, ids)))


@pytest.mark.benchmark(group="ddpm")
def test_ddpm_authors(benchmark, unet, x):
    sched = pg.DDPMSchedule()
    benchmark(_sync(lambda: pg.reference.ddpm_purify(unet, sched, x, DDPM_STEPS)))


@pytest.mark.benchmark(group="ddpm")
def test_ddpm_fast(benchmark, unet, x):
    s = DDPMSampler(unet, pg.DDPMSchedule(), DDPM_STEPS, device=DEV)
    ids = torch.arange(B, device=DEV)
    s(x, ids)
    benchmark(_sync(lambda: s(x, ids)))
