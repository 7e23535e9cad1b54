"""The paper's energy-based model: an SNGAN-discriminator-style ResNet (Miyato et al. 2018, via
the mimicry library, as adapted by the PureGen authors).

Parameter names and shapes equal the authors' published checkpoints (`block1.c1` ... `l5`), so
their `model.safetensors` loads unchanged. Differences from the SNGAN discriminator that the
authors made and we keep: no spectral norm, global *average* pooling (not sum), `l5` without bias,
optional `pixel_unshuffle` by `patch_size` in front (block1 then takes 3 * patch_size**2 channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EBMSNGAN32"]


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, 1, k // 2)
    nn.init.xavier_uniform_(conv.weight)  # the authors match TF2's default init
    nn.init.zeros_(conv.bias)
    return conv


class DBlockOptimized(nn.Module):
    """First block: conv3x3 -> ReLU -> conv3x3 -> avgpool2, plus conv1x1(avgpool2(x))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = _conv(cin, cout, 3)
        self.c2 = _conv(cout, cout, 3)
        self.c_sc = _conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class DBlock(nn.Module):
    """ReLU -> conv3x3 -> ReLU -> conv3x3 [-> avgpool2], plus a shortcut that is learnt (conv1x1
    then avgpool2) when the block downsamples or changes width, else the identity."""

    def __init__(self, cin: int, cout: int, downsample: bool = False) -> None:
        super().__init__()
        self.downsample = downsample
        self.c1 = _conv(cin, cout, 3)
        self.c2 = _conv(cout, cout, 3)
        self.learnable_sc = downsample or cin != cout
        if self.learnable_sc:
            self.c_sc = _conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        sc = self.c_sc(x) if self.learnable_sc else x
        if self.downsample:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
        return h + sc


class EBMSNGAN32(nn.Module):
    """E(x) for x in [-1, 1], shape (B, 3, H, W) with H, W divisible by 4 * patch_size.

    Returns energies of shape (B,) (the authors' module returns (B, 1); the values are the same).
    About 1.1M parameters at nf=128.
    """

    def __init__(self, nf: int = 128, patch_size: int = 1) -> None:
        super().__init__()
        if nf < 1 or patch_size < 1:
            raise ValueError(
                f"nf and patch_size must be >= 1; got nf={nf}, patch_size={patch_size}"
            )
        self.nf = nf
        self.patch_size = patch_size
        self.block1 = DBlockOptimized(3 * patch_size**2, nf)
        self.block2 = DBlock(nf, nf, downsample=True)
        self.block3 = DBlock(nf, nf)
        self.block4 = DBlock(nf, nf)
        self.l5 = nn.Linear(nf, 1, bias=False)
        nn.init.xavier_uniform_(self.l5.weight)

    @property
    def config(self) -> dict[str, int]:
        return {"nf": self.nf, "patch_size": self.patch_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x
        h = self.block4(self.block3(self.block2(self.block1(h))))
        h = F.relu(h).mean(dim=(2, 3))
        return self.l5(h).squeeze(1)
