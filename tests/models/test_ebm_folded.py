"""FoldedEBM equals EBMSNGAN32 (energies and input gradients) on odd shapes."""

import pytest
import torch

import puregen_fast as pg
from puregen_fast.cli.bench import flops_per_image_step
from puregen_fast.models.ebm_folded import FoldedEBM, fold_pool1x1, fold_pool3x3


@pytest.mark.parametrize("nf, patch, hw, b", [(8, 1, 32, 3), (12, 1, 20, 5), (8, 2, 24, 2)])
def test_folded_equals_unfolded(nf, patch, hw, b):
    torch.manual_seed(nf + hw)
    ebm = pg.EBMSNGAN32(nf=nf, patch_size=patch).double()
    with torch.no_grad():
        for n, p in ebm.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)  # the authors' init zeros them; make them count
    folded = FoldedEBM(ebm)
    x = (torch.rand(b, 3, hw, hw, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    e, ef = ebm(x), folded(x)
    assert torch.allclose(ef, e, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(e.sum(), x)
    (gf,) = torch.autograd.grad(ef.sum(), x)
    assert torch.allclose(gf, g, rtol=1e-10, atol=1e-12)
    # float32: within float rounding
    x32 = x.detach().float()
    ebm32 = ebm.float()
    assert torch.allclose(FoldedEBM(ebm32)(x32), ebm32(x32), rtol=1e-5, atol=1e-6)


def test_fold_kernels_by_hand():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)
    f = fold_pool3x3(w)[0, 0]
    assert f[0, 0] == w[0, 0, 0, 0] / 4 and f[3, 3] == w[0, 0, 2, 2] / 4
    assert f[1, 1] == w[0, 0, :2, :2].sum() / 4
    assert torch.equal(fold_pool1x1(torch.ones(2, 3, 1, 1)), torch.full((2, 3, 2, 2), 0.25))


def test_folding_cuts_flops_about_1_6x():
    ebm = pg.EBMSNGAN32(nf=128).requires_grad_(False)
    cpu = torch.device("cpu")
    plain = flops_per_image_step("ebm", ebm, 32, cpu)
    folded = flops_per_image_step("ebm", FoldedEBM(ebm), 32, cpu)
    print(f"EBM nf=128 32x32 GFLOP per image-step: {plain / 1e9:.3f} -> {folded / 1e9:.3f}")
    assert 1.5 < plain / folded < 1.8
