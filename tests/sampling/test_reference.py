"""The eager reference: Langevin update formula, fresh noise, combinations, filt, jpeg."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import puregen_fast as pg
from puregen_fast import reference


@pytest.fixture
def ebm():
    torch.manual_seed(0)
    return pg.EBMSNGAN32(nf=8).eval()


def test_ebm_purify_with_injected_noise_is_the_update_formula(ebm):
    steps, eps, temp = 3, 1.25e-2, 1e-4
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    z = torch.randn(steps, *x0.shape)
    got = reference.ebm_purify(ebm, x0, steps, eps, temp, noise=z)
    x = x0.clone()
    for i in range(steps):
        xv = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ebm(xv).sum() / temp, xv)
        x = x - (eps**2 / 2) * g + eps * z[i]
    assert torch.allclose(got, x, atol=1e-6, rtol=0)
    assert not torch.allclose(got, x0)  # the gradient term moved it
    # with zero noise, the step is the pure gradient step
    pure = reference.ebm_purify(ebm, x0, 1, eps, temp, noise=torch.zeros(1, *x0.shape))
    xv = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ebm(xv).sum() / temp, xv)
    assert torch.allclose(pure, x0 - eps**2 / 2 * g, atol=1e-7)


def test_ebm_purify_noise_none_is_fresh_each_call(ebm):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = reference.ebm_purify(ebm, x, 2)
    b = reference.ebm_purify(ebm, x, 2)
    assert not torch.equal(a, b)
    assert float((a - x).std()) == pytest.approx(1.25e-2 * 2**0.5, rel=0.2)


def test_ebm_purify_callable_noise_and_input_checks(ebm):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = torch.randn(2, *x.shape)
    assert torch.equal(
        reference.ebm_purify(ebm, x, 2, noise=z),
        reference.ebm_purify(ebm, x, 2, noise=z.__getitem__),
    )
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        reference.ebm_purify(ebm, x * 3, 1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        reference.ebm_purify(ebm, x[0], 1)
    with pytest.raises(ValueError, match="non-finite"):
        reference.ebm_purify(ebm, x * float("nan"), 1)
    with pytest.raises(ValueError, match="noise must have shape"):
        reference.ebm_purify(ebm, x, 3, noise=z)


class ShrinkEps(torch.nn.Module):
    def forward(self, x, t):
        return 0.1 * x


def test_combo_is_ebm_then_ddpm_on_keyed_streams(ebm):
    sched, unet = pg.DDPMSchedule(), ShrinkEps()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = torch.tensor([4, 9, 100])

    def keyed(stream, step):
        return pg.noise.randn(5, stream, step, ids, x.shape[1:])

    got = reference.combo_purify(
        x, ebm=ebm, unet=unet, sched=sched, ebm_steps=2, ddpm_steps=3, reps=2, noise=keyed
    )
    want = x
    for r in range(2):
        se, sd = (
            pg.noise.stream_id(pg.noise.STREAM_EBM, r),
            pg.noise.stream_id(pg.noise.STREAM_DDPM, r),
        )
        want = reference.ebm_purify(
            ebm, want, 2, noise=lambda i, s=se: keyed(s, i), check_range=False
        )
        want = reference.ddpm_purify(
            unet, sched, want, 3, noise=lambda i, s=sd: keyed(s, i), check_range=False
        )
    assert torch.equal(got, want)


def test_filter_mask_ranks_highest_energies():
    e = torch.tensor([0.5, 3.0, -1.0, 2.0, 2.0])
    assert reference.filter_mask(e, 0.4).tolist() == [False, True, False, True, False]
    assert reference.filter_mask(e, 1.0).all()
    assert reference.filter_mask(e, 0.5, threshold=2.0).tolist() == [False, True, False, True, True]
    with pytest.raises(ValueError, match="fraction"):
        reference.filter_mask(e, 0.0)


def test_jpeg_is_pillow_reencode():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = reference.jpeg(imgs, 50)
    buf = io.BytesIO()
    Image.fromarray(imgs[1]).save(buf, format="JPEG", quality=50)
    assert np.array_equal(out[1], np.asarray(Image.open(buf)))
    assert not np.array_equal(out, imgs)
    hi = np.abs(reference.jpeg(imgs, 95).astype(int) - imgs).mean()
    lo = np.abs(out.astype(int) - imgs).mean()
    assert hi < lo
    with pytest.raises(ValueError, match="quality"):
        reference.jpeg(imgs, 0)
