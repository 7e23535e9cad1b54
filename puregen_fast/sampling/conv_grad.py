"""The EBM's energy gradient through the conv-block kernels, without autograd (DESIGN 6).

``ConvEnergyGrad(ebm, temp)(x) = d(sum E(x) / temp) / dx`` for an `EBMSNGAN32`, the same
contract as the compiled ``torch.func.grad`` path of `langevin.FastLangevin` (float32 x in,
float32 gradient of x's shape out), computed as:

* forward, channels-last, pooling folded into the convolutions (`FoldedEBM`'s function), each
  block as its convolutions only: ReLU prologues and residual sums live inside the kernels; it
  keeps the pre-activations the backward masks with (a_k, the first convolution's output of
  block k, and h_k, the block's output);
* the global mean and the linear head in plain torch: ``dE/dh4 = (h4 > 0) * w5 / (H4 W4)``
  (the energy itself is never needed);
* backward through the blocks with the input-gradient kernel: each convolution's transposed
  product with the ReLU mask of its input applied in the same pass, and the shortcut's gradient
  (the identity's, or a folded 2x2 convolution's) added in the epilogue.

Ten forward and ten input-gradient launches per call, every shape static and nothing read
back to the host, so it runs inside the sampler's CUDA graph. The folded kernels are recomputed
from the model's parameters at every call (a few hundred KFLOP), so a model being trained stays in
sync. ``precision``: fp32 (IEEE products), tf32 (TF32 products), bf16 (activations, gradients and
weights in bf16, fp32 accumulation; the returned gradient is fp32).
``impl="eager"`` runs the same sequence with the kernels' eager twins (any device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from puregen_fast.kernels import ebm_conv as kc
from puregen_fast.kernels.availability import triton_available
from puregen_fast.models.ebm import EBMSNGAN32
from puregen_fast.models.ebm_folded import fold_pool1x1, fold_pool3x3
from puregen_fast.runtime import check_precision

__all__ = ["ConvEnergyGrad", "conv_kernels_usable"]

# (packed weight, bias) of one convolution
_Conv = tuple[torch.Tensor, torch.Tensor]


def conv_kernels_usable(
    ebm: object, device: torch.device, precision: str
) -> tuple[bool, str]:
    """``(ok, why)``: whether `ConvEnergyGrad` can run ``ebm`` on ``device`` in ``precision``."""
    if not isinstance(ebm, EBMSNGAN32):
        return False, f"the kernels run the EBMSNGAN32 architecture, not {type(ebm).__name__}"
    ok, why = triton_available(device)
    if not ok:
        return False, why
    if device.type != "cuda" and precision == "bf16":
        # DESIGN 8: the interpreter mishandles bf16 arithmetic and bf16 tl.dot
        return False, "the Triton CPU interpreter cannot run bf16 products; use fp32 on CPU"
    return True, why


class ConvEnergyGrad:
    """``ConvEnergyGrad(ebm, temp, precision, impl)(x)``: see the module doc. ``ebm`` must be an
    `EBMSNGAN32` (the block structure is the kernels' schedule)."""

    def __init__(
        self, ebm: EBMSNGAN32, temp: float, precision: str = "fp32", impl: str = "triton"
    ) -> None:
        if not isinstance(ebm, EBMSNGAN32):
            raise TypeError(
                f"the conv-block kernels run the EBMSNGAN32 architecture; got {type(ebm).__name__}"
            )
        if ebm.block3.learnable_sc or ebm.block4.learnable_sc:
            raise ValueError("blocks 3 and 4 must have identity shortcuts (nf -> nf)")
        if impl not in ("triton", "eager"):
            raise ValueError(f"impl must be 'triton' or 'eager'; got {impl!r}")
        if not temp > 0:
            raise ValueError(f"temp must be > 0; got {temp}")
        self.ebm, self.temp = ebm, float(temp)
        self.precision = check_precision(precision)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.tf32 = precision == "tf32"
        self.impl = impl
        if impl == "triton":
            self._fwd: Callable = kc.conv2d_nhwc
            self._bwd: Callable = kc.conv2d_input_grad_nhwc
        else:
            self._fwd, self._bwd = kc.conv2d_nhwc_eager, kc.conv2d_input_grad_nhwc_eager

    def _weights(self) -> dict[str, _Conv]:
        """Every convolution's packed (folded where pooled) kernel and bias, from the model's
        current parameters."""
        e, dt = self.ebm, self.dtype

        def conv(w: torch.Tensor, b: torch.Tensor) -> _Conv:
            return kc.pack_weight(w.detach(), dt), b.detach().float()

        out = {}
        for k, blk in enumerate((e.block1, e.block2, e.block3, e.block4), start=1):
            out[f"{k}.c1"] = conv(blk.c1.weight, blk.c1.bias)
            if k <= 2:  # downsampling: avgpool folded into c2 and the shortcut
                out[f"{k}.c2"] = conv(fold_pool3x3(blk.c2.weight), blk.c2.bias)
                out[f"{k}.sc"] = conv(fold_pool1x1(blk.c_sc.weight), blk.c_sc.bias)
            else:
                out[f"{k}.c2"] = conv(blk.c2.weight, blk.c2.bias)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``d(sum E(x) / temp) / dx``, float32, x's shape; x: (B, 3, H, W) float32."""
        e = self.ebm
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W); got shape {tuple(x.shape)}")
        p = e.patch_size
        h0 = F.pixel_unshuffle(x, p) if p > 1 else x
        w = self._weights()
        fwd, bwd, tf32 = self._fwd, self._bwd, self.tf32
        x0 = h0.permute(0, 2, 3, 1).to(self.dtype).contiguous()

        def conv(name, inp, stride, pad, relu, res=None):
            wp, b = w[name]
            return fwd(inp, wp, b, stride=stride, padding=pad, relu_in=relu, residual=res,
                       tf32=tf32)  # fmt: skip

        def dgrad(name, dy, like, stride, pad, mask=None, res=None, out_dtype=None):
            return bwd(dy, w[name][0], like.shape[1:3], stride=stride, padding=pad, mask=mask,
                       residual=res, out_dtype=out_dtype, tf32=tf32)  # fmt: skip

        # forward: keep the inputs of every ReLU prologue
        a1 = conv("1.c1", x0, 1, 1, False)
        h1 = conv("1.c2", a1, 2, 1, True, conv("1.sc", x0, 2, 0, False))
        a2 = conv("2.c1", h1, 1, 1, True)
        h2 = conv("2.c2", a2, 2, 1, True, conv("2.sc", h1, 2, 0, False))
        a3 = conv("3.c1", h2, 1, 1, True)
        h3 = conv("3.c2", a3, 1, 1, True, h2)
        a4 = conv("4.c1", h3, 1, 1, True)
        h4 = conv("4.c2", a4, 1, 1, True, h3)
        # head: E = l5 . mean_hw relu(h4), so dE/dh4 = (h4 > 0) * w5 / (H4 W4); / temp
        w5 = e.l5.weight.detach().float().reshape(-1)
        scale = 1.0 / (h4.shape[1] * h4.shape[2] * self.temp)
        g = torch.where(h4 > 0, w5 * scale, 0.0).to(self.dtype)
        # backward: blocks 4 and 3 (identity shortcuts: the residual is the block's gradient)
        for k, a, h_in in ((4, a4, h3), (3, a3, h2)):
            da = dgrad(f"{k}.c2", g, a, 1, 1, mask=a)
            g = dgrad(f"{k}.c1", da, h_in, 1, 1, mask=h_in, res=g)
        # block 2: folded c2 and shortcut, both stride 2
        da = dgrad("2.c2", g, a2, 2, 1, mask=a2)
        g = dgrad("2.c1", da, h1, 1, 1, mask=h1, res=dgrad("2.sc", g, h1, 2, 0))
        # block 1: no ReLU on the image
        da = dgrad("1.c2", g, a1, 2, 1, mask=a1)
        sc = dgrad("1.sc", g, x0, 2, 0, out_dtype=torch.float32)
        gx = dgrad("1.c1", da, x0, 1, 1, res=sc, out_dtype=torch.float32)
        gx = gx.permute(0, 3, 1, 2)
        gx = F.pixel_shuffle(gx, p) if p > 1 else gx
        return gx.contiguous()
