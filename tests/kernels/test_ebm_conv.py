"""The EBM conv-block kernels (issue 13; DESIGN 6) against ``F.conv2d`` and autograd's input
gradient in float64, by the 2x-eager-error rule (DESIGN 2.3), into NaN-poisoned outputs.

Shapes: batch 1, 3, 5; channels 3, 8, 24; spatial 4, 8, 16; the four kernel shapes of the EBM;
with and without the ReLU prologue (the input gradient's mask) and the residual. On CPU the
kernels run in the Triton interpreter (about 10 ms per program and loop iteration), so the
default suite runs a covering subset (every value of every parameter at least once, with tiles
small enough that channels and pixels straddle tile edges) and the full grid is ``-m slow``.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import DEV, gpu, padded, pads_untouched, require_kernels

from puregen_fast.kernels import ebm_conv as kc

SHAPES = kc.CONV_SHAPES  # name -> (kernel, stride, padding)
SMALL = (16, 16, 16)  # tiles: 24 channels straddle two, 3 and 8 fill part of one


@pytest.fixture(autouse=True, scope="module")
def _kernels_usable():
    require_kernels()


def _case(shape, b, cin, cout, hw, relu, res, seed=0):
    """Inputs of one forward and one input-gradient run, float32 on the device."""
    k, s, p = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    ho, wo = kc.conv_out_hw(hw, hw, (k, k), s, p)

    def r(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(DEV)

    return {
        "x": r(b, hw, hw, cin),
        "w": r(cout, cin, k, k, scale=(cin * k * k) ** -0.5),
        "bias": r(cout),
        "res_out": r(b, ho, wo, cout) if res else None,
        "dy": r(b, ho, wo, cout),
        # exact zeros too: relu'(0) = 0, as torch's
        "mask": _with_zeros(r(b, hw, hw, cin)) if relu else None,
        "res_in": r(b, hw, hw, cin) if res else None,
        "stride": s,
        "pad": p,
        "relu": relu,
    }


def _with_zeros(t):
    return torch.where(t.abs() < 0.3, 0.0, t)  # about a quarter exact zeros


def _d(t):
    return None if t is None else t.double()


def _within_twice_eager(got: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor) -> None:
    """DESIGN 2.3: the kernel's max error against float64 is at most twice the eager float32
    op's (floor: one float32 rounding of the largest value)."""
    assert not got.isnan().any(), "unwritten (NaN) output elements"
    err_k = (got.double() - truth).abs().max().item()
    err_e = (eager.double() - truth).abs().max().item()
    floor = 2.0**-24 * truth.abs().max().item()
    assert err_k <= 2 * max(err_e, floor), (err_k, err_e, floor)


def _check_forward(c, blocks):
    wp = kc.pack_weight(c["w"])
    kw = {"stride": c["stride"], "padding": c["pad"], "relu_in": c["relu"]}
    truth = kc.conv2d_nhwc_eager(
        _d(c["x"]), _d(wp), _d(c["bias"]), residual=_d(c["res_out"]), **kw
    )
    eager = kc.conv2d_nhwc_eager(c["x"], wp, c["bias"], residual=c["res_out"], **kw)
    buf, out = padded(tuple(truth.shape), torch.full(truth.shape, float("nan"), device=DEV))
    got = kc.conv2d_nhwc(c["x"], wp, c["bias"], residual=c["res_out"], blocks=blocks, out=out, **kw)
    assert got.data_ptr() == out.data_ptr()
    assert pads_untouched(buf, out.numel())
    _within_twice_eager(got, eager, truth)


def _check_input_grad(c, blocks):
    wp = kc.pack_weight(c["w"])
    hw = tuple(c["x"].shape[1:3])
    kw = {"stride": c["stride"], "padding": c["pad"]}
    # the truth is autograd's input gradient of the forward in float64
    xin = (c["x"] if c["mask"] is None else c["mask"]).double().requires_grad_(True)
    y = F.conv2d(
        (F.relu(xin) if c["relu"] else xin).permute(0, 3, 1, 2),
        c["w"].double(), stride=c["stride"], padding=c["pad"],
    )  # fmt: skip
    (truth,) = torch.autograd.grad(y, xin, c["dy"].double().permute(0, 3, 1, 2))
    if c["res_in"] is not None:
        truth = truth + c["res_in"].double()
    args = {"mask": c["mask"], "residual": c["res_in"], **kw}
    eager = kc.conv2d_input_grad_nhwc_eager(c["dy"], wp, hw, **args)
    buf, out = padded(tuple(truth.shape), torch.full(truth.shape, float("nan"), device=DEV))
    got = kc.conv2d_input_grad_nhwc(c["dy"], wp, hw, blocks=blocks, out=out, **args)
    assert pads_untouched(buf, out.numel())
    _within_twice_eager(got, eager, truth)


# every batch, channel count, size, kernel shape and flag at least once; SMALL tiles where the
# grid stays small (the interpreter's cost is per program)
COVER = [  # shape, batch, cin, cout, hw, relu, residual, blocks
    ("3x3", 1, 3, 24, 4, False, True, SMALL),
    ("1x1", 3, 24, 8, 8, True, False, SMALL),
    ("4x4s2", 5, 8, 3, 16, True, True, None),
    ("4x4s2", 1, 24, 8, 8, True, True, SMALL),
    ("2x2s2", 3, 24, 24, 8, False, False, None),
    ("2x2s2", 1, 3, 8, 4, True, True, SMALL),
]


@pytest.mark.parametrize("shape, b, cin, cout, hw, relu, res, blocks", COVER)
def test_kernels_cover(shape, b, cin, cout, hw, relu, res, blocks):
    c = _case(shape, b, cin, cout, hw, relu, res)
    _check_forward(c, blocks)
    _check_input_grad(c, blocks)


FULL = list(itertools.product(
    SHAPES, (1, 3, 5), ((3, 8), (8, 24), (24, 3)), (4, 8, 16), (False, True), (False, True)
))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("shape, b, ch, hw, relu, res", FULL)
def test_kernels_full_grid(shape, b, ch, hw, relu, res):
    """The whole grid of the issue (432 cases, several minutes in the interpreter)."""
    c = _case(shape, b, *ch, hw, relu, res, seed=hw + b)
    _check_forward(c, None)
    _check_input_grad(c, None)


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernels_many_tiles(shape):
    """Many programs along every grid axis: 24 channels in 16-wide tiles, pixels over 64-row
    tiles, both K loops crossing channel blocks (slow: hundreds of interpreted programs)."""
    c = _case(shape, 3, 24, 24, 16, True, True, seed=3)
    _check_forward(c, (64, 16, 16))
    _check_input_grad(c, (64, 16, 16))


def test_bad_arguments_are_named():
    x = torch.zeros(1, 4, 4, 3, device=DEV)
    wp = kc.pack_weight(torch.zeros(8, 3, 3, 3, device=DEV))
    with pytest.raises(ValueError, match="channels"):
        kc.conv2d_nhwc(x[..., :2], wp, padding=1)
    with pytest.raises(ValueError, match="stride"):
        kc.conv2d_nhwc(x, wp, stride=3, padding=1)
    with pytest.raises(ValueError, match="sizes must divide"):
        kc.conv2d_nhwc(x, wp, stride=2, padding=1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        kc.conv2d_nhwc(x.double(), wp.double(), padding=1)
    with pytest.raises(TypeError, match="pack it"):
        kc.conv2d_nhwc(x, wp.bfloat16(), padding=1)
    with pytest.raises(ValueError, match="residual"):
        kc.conv2d_nhwc(x, wp, padding=1, residual=torch.zeros(1, 4, 4, 3, device=DEV))
    with pytest.raises(ValueError, match="out must be"):
        kc.conv2d_nhwc(x, wp, padding=1, out=torch.zeros(1, 4, 4, 3, device=DEV))
    with pytest.raises(ValueError, match="not the output"):
        kc.conv2d_input_grad_nhwc(torch.zeros(1, 3, 3, 8, device=DEV), wp, (4, 4), padding=1)
    with pytest.raises(ValueError, match="mask"):
        kc.conv2d_input_grad_nhwc(
            torch.zeros(1, 4, 4, 8, device=DEV), wp, (4, 4), padding=1, mask=x[..., :1]
        )
    with pytest.raises(ValueError, match="blocks"):
        kc.conv2d_nhwc(x, wp, padding=1, blocks=(16, 16, 8))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_reduced_precision_within_twice_the_eager_error(shape, precision):
    """bf16 operands (and tf32 products) against float64 from the same rounded operands: at most
    twice the error of cuDNN's own convolution in that precision (DESIGN 2.3)."""
    c = _case(shape, 5, 128, 128, 16, True, True, seed=7)
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    x, wp = c["x"].to(dt), kc.pack_weight(c["w"], dt)
    kw = {"stride": c["stride"], "padding": c["pad"]}
    tf32 = precision == "tf32"
    truth = kc.conv2d_nhwc_eager(
        _d(x), _d(wp), _d(c["bias"]), relu_in=True, residual=_d(c["res_out"]), **kw
    )
    b = torch.backends
    old = b.cudnn.allow_tf32
    b.cudnn.allow_tf32 = tf32
    try:
        eager = kc.conv2d_nhwc_eager(x, wp, c["bias"], relu_in=True, residual=c["res_out"], **kw)
        dy = c["dy"].to(dt)
        hw = tuple(x.shape[1:3])
        gtruth = kc.conv2d_input_grad_nhwc_eager(_d(dy), _d(wp), hw, mask=c["mask"], **kw)
        geager = kc.conv2d_input_grad_nhwc_eager(dy, wp, hw, mask=c["mask"], **kw)
    finally:
        b.cudnn.allow_tf32 = old
    got = kc.conv2d_nhwc(x, wp, c["bias"], relu_in=True, residual=c["res_out"], tf32=tf32, **kw)
    ggot = kc.conv2d_input_grad_nhwc(dy, wp, hw, mask=c["mask"], tf32=tf32, **kw)
    # cuDNN may run a tf32 request with IEEE products: then tf32's own rounding is the floor
    unit = 2.0**-10 if tf32 else 2.0**-24
    for g, e, t in ((got, eager, truth), (ggot, geager, gtruth)):
        assert not g.isnan().any()
        err_k = (g.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        assert err_k <= 2 * max(err_e, unit * t.abs().max().item()), (err_k, err_e)


@pytest.mark.slow
def test_conv_kernels_build_for_sm90_without_spills():
    """Triton's real compiler, sm_90, through the real launchers at the paper's shapes (batch
    512, nf 128): no local memory, and the bf16/tf32 builds use matrix instructions (slow: about
    a minute of compiling; `bench/kernel_asm.py --only conv`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip(f"this triton ships no {cuobjdump.name}")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run(
        [sys.executable, str(root / "bench" / "kernel_asm.py"), "--only", "conv"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "conv kernel" not in ln]
    assert len(rows) == 14
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[5] == "0", row  # LOCAL: no spills
        if "fp32" not in cells[0]:
            assert int(cells[7]) + int(cells[8]) > 0, row  # HGMMA or HMMA
