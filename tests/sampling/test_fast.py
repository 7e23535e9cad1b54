"""The fast path on CPU (compiled models + eager update twins) against the reference on the same
keyed noise (DESIGN 2.3: relative L2 < 1e-4 after 150 EBM and 75 DDPM steps, fp32)."""

import numpy as np
import pytest
import torch
from helpers import rel_l2

import puregen_fast as pg
from puregen_fast import runtime
from puregen_fast.models.unet import UNET_PRESETS
from puregen_fast.sampling.backends import DDPMSampler, LangevinSampler


@pytest.fixture(scope="module")
def ebm():
    torch.manual_seed(0)
    return pg.EBMSNGAN32(nf=8).eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    cfg = {**UNET_PRESETS["tiny"], "sample_size": 16}
    model = pg.UNet2D.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights everywhere (conv_out starts at zero)
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(3, 3, 16, 16) * 2 - 1


IDS = torch.tensor([5, (1 << 33) + 1, 7])


def _ebm_compiled_equals_reference(ebm, x, steps):
    ref = LangevinSampler(ebm, steps, backend="reference")(x, IDS)
    fast = LangevinSampler(ebm, steps, compile=True)
    out = fast(x, IDS)
    assert rel_l2(out, ref) < 1e-4
    assert rel_l2(out, x) > 1e-2  # it moved
    # the sampler differentiates w.r.t. x only and leaves no parameter gradients behind
    assert all(p.grad is None for p in ebm.parameters())
    # same ids, same result; other ids or a step offset draw other noise
    assert torch.equal(fast(x, IDS), out)
    assert not torch.equal(fast(x, IDS + 1), out)
    assert not torch.equal(fast(x, IDS, step_offset=steps), out)


def test_ebm_10_compiled_equals_reference(ebm, x):
    _ebm_compiled_equals_reference(ebm, x, 10)


@pytest.mark.slow
def test_ebm_150_compiled_equals_reference(ebm, x):
    """DESIGN 2.3 at the paper's step count."""
    _ebm_compiled_equals_reference(ebm, x, 150)


def test_compile_modes(ebm, unet, x, monkeypatch):
    modes = []
    real = torch.compile

    def spy(*a, **k):
        modes.append(k.get("mode"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "compile", spy)
    ref = LangevinSampler(ebm, 5, backend="reference")(x, IDS)
    tuned = LangevinSampler(ebm, 5, compile_mode="max-autotune-no-cudagraphs")
    assert modes[-1] == "max-autotune-no-cudagraphs"
    assert tuned.config.compile_mode == "max-autotune-no-cudagraphs"
    assert rel_l2(tuned(x, IDS), ref) < 1e-5
    # reduce-overhead would capture CUDA graphs inside the samplers' own capture
    with pytest.raises(ValueError, match="reduce-overhead"):
        LangevinSampler(ebm, 5, compile=False, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="compile mode"):
        DDPMSampler(unet, pg.DDPMSchedule(), 5, compile=False, compile_mode="max-autotune")


def test_ebm_sampler_on_a_trainable_model_is_the_reference(x):
    torch.manual_seed(2)
    model = pg.EBMSNGAN32(nf=4).train()  # parameters require grad, as in training
    ref = LangevinSampler(model, 5, backend="reference")(x, IDS, stream=3, step_offset=10)
    out = LangevinSampler(model, 5, compile=False)(x, IDS, stream=3, step_offset=10)
    assert rel_l2(out, ref) < 1e-6
    assert all(p.grad is None for p in model.parameters())


def _ddpm_fast_equals_reference(unet, x, steps):
    sched = pg.DDPMSchedule()
    ref = DDPMSampler(unet, sched, steps, backend="reference")(x, IDS)
    out = DDPMSampler(unet, sched, steps, compile=False)(x, IDS)
    assert rel_l2(out, ref) < 1e-4
    assert rel_l2(out, x) > 1e-2


def test_ddpm_10_fast_equals_reference(unet, x):
    _ddpm_fast_equals_reference(unet, x, 10)


@pytest.mark.slow
def test_ddpm_75_fast_equals_reference(unet, x):
    """DESIGN 2.3 at the paper's step count."""
    _ddpm_fast_equals_reference(unet, x, 75)


def test_samplers_take_channels_last_input(ebm, unet, x):
    """The Purifier hands over NHWC-backed tensors; the in-place kernels need dense NCHW rows."""
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert not xcl.is_contiguous()
    for s in (
        LangevinSampler(ebm, 3, compile=False),
        DDPMSampler(unet, pg.DDPMSchedule(), 3, compile=False),
    ):
        out = s(xcl, IDS)
        assert out.is_contiguous()
        torch.testing.assert_close(out, s(x, IDS), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_ddpm_75_compiled_equals_reference(unet, x):
    sched = pg.DDPMSchedule()
    ref = DDPMSampler(unet, sched, 75, backend="reference")(x, IDS)
    out = DDPMSampler(unet, sched, 75, compile=True)(x, IDS)
    assert rel_l2(out, ref) < 1e-4


@pytest.mark.slow
def test_purifier_fast_backend_matches_reference_end_to_end(ebm, unet):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    kw = dict(ebm=ebm, ddpm=unet, ebm_steps=10, ddpm_steps=5, seed=1, device="cpu")
    fast = pg.Purifier("ebm+ddpm", backend="fast", **kw)
    assert fast.backend == "fast" and "CPU" in fast.backend_reason
    a = fast(imgs, range(4))
    b = pg.Purifier("ebm+ddpm", backend="reference", **kw)(imgs, range(4))
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_auto_backend_says_what_it_picked(ebm, monkeypatch):
    p = pg.Purifier("ebm", ebm=ebm, device="cpu", backend="auto")
    assert p.backend == "fast" and p.backend_reason
    d = p.describe()
    assert d["backend"] == "fast" and d["backend_requested"] == "auto"
    # a CPU without bf16 matrix units (tests/sampling/test_cpu_path.py has those that have them)
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: {"flags": "avx2 fma"})
    with pytest.raises(ValueError, match="bf16"):
        pg.Purifier("ebm", ebm=ebm, device="cpu", backend="fast", precision="bf16")
    r = pg.Purifier("ebm", ebm=ebm, device="cpu", backend="auto", precision="bf16")
    assert r.backend == "reference" and "bf16" in r.backend_reason
