"""The EBM's convolution blocks as implicit-GEMM Triton kernels (DESIGN 6): forward and input
gradient, channels-last.

Every convolution of `EBMSNGAN32` / `FoldedEBM` is one of four shapes: 3x3 stride 1 pad 1, 1x1,
and the pooled ones folded into a single convolution, 4x4 stride 2 pad 1 and 2x2 stride 2. Both
kernels are matrix products tiled over (pixels x channels) with ``tl.dot``; K runs over kernel
taps x input channels as one flat loop, so the compiler pipelines it however few channels a tap
has.

* `conv2d_nhwc`: ``y = conv(relu?(x), w) + bias [+ residual]``. The ReLU is applied to the input
  tile as it is loaded (the blocks' ReLU prologues), bias and residual are added to the fp32
  accumulator before the store (the blocks' sums): a block's forward is its convolutions and
  nothing between them.
* `conv2d_input_grad_nhwc`: ``dx = convT(dy, w) * (mask > 0) [+ residual]``, the transposed
  convolution of the upstream gradient. ``mask`` is the saved pre-activation the forward applied
  its ReLU to (relu'(0) = 0, as torch's), ``residual`` the gradient of the block's other branch.
  For stride 2 the input pixels are split into the four parity classes (one grid axis), so each
  program loops only over the taps that reach its pixels (4 of the 16 of a 4x4 kernel), never
  multiplying by structural zeros. No weight gradients: Langevin needs d/dx only.

Layouts: activations (B, H, W, C) contiguous (channels-last), weights packed once by
`pack_weight` as (KH, KW, Cin, Cout) contiguous; both kernels read that one packing. Operands are
float32 or bfloat16 (the tensors' dtype; ``tf32=True`` lets float32 products use TF32 tensor
cores); accumulation, bias, residual and mask are float32, the store takes the output's dtype.

Each wrapper has an eager twin (`conv2d_nhwc_eager`, `conv2d_input_grad_nhwc_eager`: plain torch
``F.conv2d`` and ``torch.nn.grad.conv2d_input``, same arguments), which the tests compare against
and which runs where Triton does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import check_launchable, device_guard, kernels_interpreted, tl, triton

__all__ = [
    "CONV_SHAPES",
    "pack_weight",
    "conv_out_hw",
    "conv2d_nhwc",
    "conv2d_nhwc_eager",
    "conv2d_input_grad_nhwc",
    "conv2d_input_grad_nhwc_eager",
]

# (kernel size, stride, padding) of every convolution the EBM runs (DESIGN 6)
CONV_SHAPES = {"3x3": (3, 1, 1), "1x1": (1, 1, 0), "4x4s2": (4, 2, 1), "2x2s2": (2, 2, 0)}
_DTYPES = (torch.float32, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, w, acc, BF16: tl.constexpr, TF32: tl.constexpr):
    """acc += a @ w in fp32: bf16 operands, or fp32 ones (IEEE, or TF32 tensor cores)."""
    if BF16:
        acc = tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), acc)
    elif TF32:
        acc = tl.dot(a, w, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, H, W, CIN, HO, WO, COUT,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    RELU_IN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BF16: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # tile: BLOCK_M output pixels (b, oh, ow) x BLOCK_N output channels
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < COUT
    ow = offs_m % WO
    oh = (offs_m // WO) % HO
    bh = (offs_m // (WO * HO)) * H
    c_blocks = tl.cdiv(CIN, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K = taps x input channels, one flat loop (pipelined as one)
    for i in range(KH * KW * c_blocks):
        tap = i // c_blocks
        c = (i % c_blocks) * BLOCK_K + offs_k
        c_ok = c < CIN
        ih = oh * STRIDE - PAD + tap // KW
        iw = ow * STRIDE - PAD + tap % KW
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = ((bh + ih) * W + iw) * CIN
        a = tl.load(x_ptr + pix[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        if RELU_IN:
            a = tl.maximum(a, 0.0)
        w = tl.load(
            w_ptr + (tap * CIN + c)[:, None] * COUT + offs_n[None, :],
            mask=c_ok[:, None] & n_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = _mma(a, w, acc, BF16, TF32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = offs_m[:, None] * COUT + offs_n[None, :]
    ok2 = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + out, mask=ok2, other=0.0).to(tl.float32)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok2)


@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, w_ptr, m_ptr, r_ptr, dx_ptr,
    B, H, W, CIN, HO, WO, COUT, HC, WC,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr,
    BF16: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # tile: BLOCK_M input pixels of one parity class (ih % STRIDE, iw % STRIDE) = (ph, pw) x
    # BLOCK_N input channels; K = the taps that reach that class x output channels
    cls = tl.program_id(2)
    ph = cls // STRIDE
    pw = cls % STRIDE
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # the class's pixels: ih = ph + STRIDE * i for i < cdiv(H - ph, STRIDE), likewise iw
    j = offs_m % WC
    i = (offs_m // WC) % HC
    b = offs_m // (WC * HC)
    ih = ph + STRIDE * i
    iw = pw + STRIDE * j
    m_ok = (b < B) & (ih < H) & (iw < W)
    n_ok = offs_n < CIN
    # taps kh with (ih + PAD - kh) % STRIDE == 0: kh = kh0 + STRIDE * u
    kh0 = (ph + PAD) % STRIDE
    kw0 = (pw + PAD) % STRIDE
    TH: tl.constexpr = KH // STRIDE
    TW: tl.constexpr = KW // STRIDE
    c_blocks = tl.cdiv(COUT, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(TH * TW * c_blocks):
        tap = t // c_blocks
        co = (t % c_blocks) * BLOCK_K + offs_k
        co_ok = co < COUT
        kh = kh0 + STRIDE * (tap // TW)
        kw = kw0 + STRIDE * (tap % TW)
        # exact multiples of STRIDE, so truncating division is floor division here
        oh = (ih + PAD - kh) // STRIDE
        ow = (iw + PAD - kw) // STRIDE
        ok = m_ok & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
        pix = ((b * HO + oh) * WO + ow) * COUT
        a_ok = ok[:, None] & co_ok[None, :]
        a = tl.load(dy_ptr + pix[:, None] + co[None, :], mask=a_ok, other=0.0)
        # w[kh, kw, ci, co] as a [co, ci] tile: the forward packing, read transposed
        wt = w_ptr + ((kh * KW + kw) * CIN + offs_n[None, :]) * COUT + co[:, None]
        w = tl.load(wt, mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, w, acc, BF16, TF32)
    out = (((b * H + ih) * W + iw) * CIN)[:, None] + offs_n[None, :]
    ok2 = m_ok[:, None] & n_ok[None, :]
    if HAS_MASK:
        pre = tl.load(m_ptr + out, mask=ok2, other=0.0)
        acc = tl.where(pre > 0, acc, 0.0)
    if HAS_RES:
        acc += tl.load(r_ptr + out, mask=ok2, other=0.0).to(tl.float32)
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=ok2)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def pack_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch's (Cout, Cin, KH, KW) -> the kernels' (KH, KW, Cin, Cout), contiguous, in ``dtype``
    (default: the weight's). One small copy; the forward reads it as [K, Cout] rows, the input
    gradient as [Cout, Cin] tiles."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be (Cout, Cin, KH, KW); got shape {tuple(weight.shape)}")
    return weight.detach().to(dtype or weight.dtype).permute(2, 3, 1, 0).contiguous()


def conv_out_hw(h: int, w: int, k: tuple[int, int], stride: int, padding: int) -> tuple[int, int]:
    """Output height and width of a convolution with kernel ``k`` on an ``h`` x ``w`` input."""
    return (h + 2 * padding - k[0]) // stride + 1, (w + 2 * padding - k[1]) // stride + 1


def _check_geometry(wp: torch.Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    if wp.dim() != 4:
        raise ValueError(f"packed weight must be (KH, KW, Cin, Cout); got {tuple(wp.shape)}")
    kh, kw, cin, cout = wp.shape
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2; got {stride}")
    if kh % stride or kw % stride:
        raise ValueError(f"a {kh}x{kw} kernel with stride {stride}: the sizes must divide")
    if not 0 <= padding < min(kh, kw):
        raise ValueError(f"padding {padding} for a {kh}x{kw} kernel")
    return kh, kw, cin, cout


def _check_dtype(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32 or bfloat16; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the input on {device}")


def _check_side(name: str, t: torch.Tensor | None, shape: tuple, device: torch.device) -> None:
    """A residual or mask: the output's shape, on its device, any supported dtype."""
    if t is None:
        return
    _check_dtype(name, t, device)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, the output {tuple(shape)}")


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _out(
    out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be {dtype} {tuple(shape)} on {device}; got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def _blocks(
    m: int, n: int, k: int, bf16: bool, blocks: tuple[int, int, int] | None
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); ``blocks`` (powers of two >= 16) for tests."""
    if blocks is not None:
        bm, bn, bk = blocks
        if any(v < 16 or v & (v - 1) for v in blocks):
            raise ValueError(f"blocks must be powers of two >= 16; got {blocks}")
    else:
        bn = min(128, max(16, triton.next_power_of_2(n)))
        bk = min(64 if bf16 else 32, max(16, triton.next_power_of_2(k)))
        bm = 128 if m >= 128 * 64 else 64
        if kernels_interpreted():  # the interpreter's cost is per program and per op: few, big
            bm = min(1024, max(16, triton.next_power_of_2(m)))
    warps = 8 if bm * bn >= 128 * 128 else 4
    return bm, bn, bk, warps, 3


def _dot_flags(x: torch.Tensor, wp: torch.Tensor, tf32: bool) -> tuple[bool, bool]:
    if x.dtype != wp.dtype:
        raise TypeError(f"input is {x.dtype}, the packed weight {wp.dtype}: pack it in the input's")
    return x.dtype == torch.bfloat16, bool(tf32) and x.dtype == torch.float32


def conv2d_nhwc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    padding: int = 0,
    relu_in: bool = False,
    residual: torch.Tensor | None = None,
    tf32: bool = False,
    blocks: tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``conv(relu(x) if relu_in else x, weight, stride, padding) + bias [+ residual]`` in one
    Triton pass. ``x``: (B, H, W, Cin) float32 or bf16; ``weight``: `pack_weight`'s (KH, KW, Cin,
    Cout) in x's dtype; ``bias`` (Cout,) and ``residual`` (B, Ho, Wo, Cout) any float dtype.
    Returns (B, Ho, Wo, Cout) in x's dtype, written into ``out`` when given (contiguous, that
    shape and dtype). ``blocks``: (BLOCK_M, BLOCK_N, BLOCK_K), for tests."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, W, Cin); got shape {tuple(x.shape)}")
    kh, kw, cin, cout = _check_geometry(weight, stride, padding)
    _check_dtype("x", x, x.device)
    _check_dtype("weight", weight, x.device)
    bsz, h, w, c = x.shape
    if c != cin:
        raise ValueError(f"x has {c} channels, the weight takes {cin}")
    ho, wo = conv_out_hw(h, w, (kh, kw), stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {h}x{w} input")
    out_shape = (bsz, ho, wo, cout)
    _check_side("residual", residual, out_shape, x.device)
    if bias is not None:
        _check_dtype("bias", bias, x.device)
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({cout},)")
    if max(x.numel(), bsz * ho * wo * cout) >= 1 << 31:
        raise ValueError("the kernels index with int32: split the batch")
    check_launchable(x.device)
    x, weight = x.contiguous(), weight.contiguous()
    bias, residual = _contig(bias), _contig(residual)
    y = _out(out, out_shape, x.dtype, x.device)
    m = bsz * ho * wo
    if m == 0:
        return y
    bf16, tf = _dot_flags(x, weight, tf32)
    bm, bn, bk, warps, stages = _blocks(m, cout, cin, bf16, blocks)
    grid = (triton.cdiv(m, bm), triton.cdiv(cout, bn))
    with device_guard(x.device):
        _conv_fwd_kernel[grid](
            x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
            m, h, w, cin, ho, wo, cout,
            STRIDE=stride, PAD=padding, KH=kh, KW=kw, RELU_IN=bool(relu_in),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, BF16=bf16, TF32=tf,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return y


def conv2d_input_grad_nhwc(
    dy: torch.Tensor,
    weight: torch.Tensor,
    in_hw: tuple[int, int],
    *,
    stride: int = 1,
    padding: int = 0,
    mask: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tf32: bool = False,
    blocks: tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The input gradient of `conv2d_nhwc` in one Triton pass: ``convT(dy, weight)``, zeroed
    where ``mask <= 0`` (``mask``: the pre-activation the forward's ReLU prologue saw), plus
    ``residual``. ``dy``: (B, Ho, Wo, Cout); ``in_hw``: the forward input's (H, W); ``mask`` and
    ``residual``: (B, H, W, Cin), any float dtype. Returns (B, H, W, Cin) in ``out_dtype``
    (default dy's), written into ``out`` when given."""
    if dy.dim() != 4:
        raise ValueError(f"dy must be (B, Ho, Wo, Cout); got shape {tuple(dy.shape)}")
    kh, kw, cin, cout = _check_geometry(weight, stride, padding)
    _check_dtype("dy", dy, dy.device)
    _check_dtype("weight", weight, dy.device)
    bsz, ho, wo, c = dy.shape
    h, w = (int(v) for v in in_hw)
    if c != cout:
        raise ValueError(f"dy has {c} channels, the weight gives {cout}")
    if conv_out_hw(h, w, (kh, kw), stride, padding) != (ho, wo):
        raise ValueError(f"dy is {ho}x{wo}, not the output of a {h}x{w} input")
    out_shape = (bsz, h, w, cin)
    _check_side("mask", mask, out_shape, dy.device)
    _check_side("residual", residual, out_shape, dy.device)
    if max(dy.numel(), bsz * h * w * cin) >= 1 << 31:
        raise ValueError("the kernels index with int32: split the batch")
    check_launchable(dy.device)
    dy, weight = dy.contiguous(), weight.contiguous()
    mask, residual = _contig(mask), _contig(residual)
    dx = _out(out, out_shape, out_dtype or dy.dtype, dy.device)
    hc, wc = -(-h // stride), -(-w // stride)  # the largest parity class
    m = bsz * hc * wc
    if m == 0 or cin == 0:
        return dx
    bf16, tf = _dot_flags(dy, weight, tf32)
    bm, bn, bk, warps, stages = _blocks(m, cin, cout, bf16, blocks)
    grid = (triton.cdiv(m, bm), triton.cdiv(cin, bn), stride * stride)
    with device_guard(dy.device):
        _conv_dgrad_kernel[grid](
            dy, weight, mask if mask is not None else dx, residual if residual is not None else dx,
            dx, bsz, h, w, cin, ho, wo, cout, hc, wc,
            STRIDE=stride, PAD=padding, KH=kh, KW=kw,
            HAS_MASK=mask is not None, HAS_RES=residual is not None, BF16=bf16, TF32=tf,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return dx


# --------------------------------------------------------------------------------------------
# eager twins
# --------------------------------------------------------------------------------------------
def _into(out: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    return t if out is None else out.copy_(t)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).contiguous()


def conv2d_nhwc_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    padding: int = 0,
    relu_in: bool = False,
    residual: torch.Tensor | None = None,
    tf32: bool = False,
    blocks: tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager twin of `conv2d_nhwc` (``F.conv2d``; any float dtype, any device); ``tf32`` and
    ``blocks`` are accepted and ignored."""
    w = weight.permute(3, 2, 0, 1)  # back to (Cout, Cin, KH, KW)
    xi = F.relu(x) if relu_in else x
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(_nchw(xi), w.to(x.dtype), b, stride=stride, padding=padding)
    if residual is not None:
        y = y + _nchw(residual).to(y.dtype)
    return _into(out, _nhwc(y))


def conv2d_input_grad_nhwc_eager(
    dy: torch.Tensor,
    weight: torch.Tensor,
    in_hw: tuple[int, int],
    *,
    stride: int = 1,
    padding: int = 0,
    mask: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tf32: bool = False,
    blocks: tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager twin of `conv2d_input_grad_nhwc` (``torch.nn.grad.conv2d_input``, the op
    autograd runs for a convolution's input); ``tf32`` and ``blocks`` are ignored."""
    w = weight.permute(3, 2, 0, 1).to(dy.dtype)
    bsz, cin = dy.shape[0], weight.shape[2]
    g = torch.nn.grad.conv2d_input(
        (bsz, cin, *in_hw), w, _nchw(dy), stride=stride, padding=padding
    )
    if mask is not None:
        g = g * (_nchw(mask) > 0)
    if residual is not None:
        g = g + _nchw(residual).to(g.dtype)
    return _into(out, _nhwc(g).to(out_dtype or dy.dtype))
