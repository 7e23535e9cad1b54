"""The EBM with average pooling folded into the convolution before it (DESIGN 6).

``avgpool2(conv3x3(h))`` is exactly one 4x4 stride-2 convolution whose kernel is the 3x3 kernel
averaged over the four 2x2 shifts, and ``avgpool2(conv1x1(h))`` (equally ``conv1x1(avgpool2(h))``)
is one 2x2 stride-2 convolution with the 1x1 kernel spread over the window. That computes the
pooled output directly instead of the full-resolution one: the folded convolutions cost 16/36 of
the 3x3 ones and the 1x1 shortcuts a quarter, about 1.6x fewer FLOPs for the whole EBM (forward
plus input gradient) at 32x32. The folded kernels are recomputed from the wrapped model's
parameters at every call (a few hundred KFLOP), so a model being trained stays in sync.

Same function as `EBMSNGAN32` up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from puregen_fast.models.ebm import EBMSNGAN32

__all__ = ["FoldedEBM", "fold_pool3x3", "fold_pool1x1"]


def fold_pool3x3(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) -> (O, I, 4, 4): conv3x3 (pad 1) then avgpool2 == conv4x4 (stride 2, pad 1)."""
    return sum(F.pad(w, (dj, 1 - dj, di, 1 - di)) for di in (0, 1) for dj in (0, 1)) / 4


def fold_pool1x1(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 1, 1) -> (O, I, 2, 2): conv1x1 then avgpool2 == conv2x2 (stride 2)."""
    return w.expand(-1, -1, 2, 2) / 4


class FoldedEBM(nn.Module):
    """Wraps an `EBMSNGAN32` (sharing its parameters) and evaluates it with folded pooling."""

    def __init__(self, ebm: EBMSNGAN32) -> None:
        super().__init__()
        self.ebm = ebm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.ebm
        if e.patch_size > 1:
            x = F.pixel_unshuffle(x, e.patch_size)
        b1, b2 = e.block1, e.block2
        # block1: avgpool(c2(relu(c1(x)))) + c_sc(avgpool(x))
        h = F.relu(b1.c1(x))
        h = F.conv2d(h, fold_pool3x3(b1.c2.weight), b1.c2.bias, stride=2, padding=1)
        h = h + F.conv2d(x, fold_pool1x1(b1.c_sc.weight), b1.c_sc.bias, stride=2)
        # block2: avgpool(c2(relu(c1(relu(h))))) + avgpool(c_sc(h))
        r = F.relu(b2.c1(F.relu(h)))
        r = F.conv2d(r, fold_pool3x3(b2.c2.weight), b2.c2.bias, stride=2, padding=1)
        h = r + F.conv2d(h, fold_pool1x1(b2.c_sc.weight), b2.c_sc.bias, stride=2)
        h = e.block4(e.block3(h))
        return e.l5(F.relu(h).mean(dim=(2, 3))).squeeze(1)
