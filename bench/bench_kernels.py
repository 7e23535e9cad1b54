"""pytest-benchmark suite for the fused kernels: the elementwise ones' achieved GB/s vs the
device's copy bandwidth, and the EBM conv-block kernels' TFLOP/s vs cuDNN's.

    python -m pytest bench/bench_kernels.py --benchmark-columns=median,ops

GPU only (skips on CPU with a reason; importable anywhere). Each kernel is timed with CUDA events
(median over many launches) and compared with ``torch.empty_like(x).copy_(x)`` on the same
tensor, measured in the same run on the same device. Bytes per element: Langevin 12 (10 with a
bf16 grad), DDPM forward noise 8, DDPM posterior step 12 (10 with bf16 eps). The table is printed
at the end of the module and stored in each benchmark's ``extra_info``.

Conv-block kernels (`puregen_fast.kernels.ebm_conv`): every convolution shape of the paper's
folded EBM (nf 128, 32x32 images) at batch 512, forward (ReLU prologue, bias, residual) and input
gradient (ReLU mask, residual), in bf16 and fp32 (IEEE), against ``F.conv2d`` and
``torch.nn.grad.conv2d_input`` on the same channels-last tensors (cuDNN, ``cudnn.benchmark`` on;
the unfused residual and mask added as torch ops, as the compiled torch path would do them at
best). TFLOP/s count the convolution's 2 * MACs only, the same for both.
"""

import statistics
from collections.abc import Callable

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="kernel bandwidth needs a CUDA GPU"),
]

BATCH = 4096  # CIFAR-size images: 12.6M elements, ~50 MB per fp32 tensor (beyond H100's L2)
IMAGE = (3, 32, 32)
ROWS: list[tuple[str, float, float, float]] = []  # name, median us, GB/s, fraction of copy
CONV_ROWS: list[tuple[str, float, float, float, float]] = []  # name, us, TFLOP/s, cuDNN's both
# (kernel shape, input channels, input size) of the folded paper EBM at 32x32, nf 128
CONV_LAYERS = [
    ("3x3", 3, 32), ("2x2s2", 3, 32), ("4x4s2", 128, 32), ("2x2s2", 128, 16),
    ("3x3", 128, 16), ("4x4s2", 128, 16), ("3x3", 128, 8),
]  # fmt: skip
NF, CONV_BATCH = 128, 512


def _median_ms(fn: Callable[[], object], iters: int = 100, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    from puregen_fast.kernels._launch import kernels_interpreted

    if kernels_interpreted():
        pytest.skip("TRITON_INTERPRET=1: kernels were built for the CPU interpreter")
    torch.manual_seed(0)
    shape = (BATCH, *IMAGE)
    x = torch.rand(shape, device="cuda") * 2 - 1
    g = torch.randn(shape, device="cuda")
    return {
        "x": x,
        "g": g,
        "g_bf16": g.bfloat16(),
        "ids": torch.arange(BATCH, dtype=torch.int64, device="cuda"),
        "seed": torch.tensor(0, dtype=torch.int64, device="cuda"),
        "step": torch.tensor(1, dtype=torch.int64, device="cuda"),
        "t": torch.tensor(40, dtype=torch.int64, device="cuda"),
    }


@pytest.fixture(scope="module")
def copy_gbs(data: dict[str, torch.Tensor]) -> float:
    x = data["x"]
    ms = _median_ms(lambda: torch.empty_like(x).copy_(x))
    gbs = 2 * x.nbytes / ms / 1e6  # read + write
    ROWS.append(("copy (empty_like + copy_)", ms * 1e3, gbs, 1.0))
    return gbs


@pytest.fixture(scope="module", autouse=True)
def _print_table(request: pytest.FixtureRequest):
    yield
    if not ROWS:
        return
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    name = torch.cuda.get_device_name(0)
    lines = [
        "",
        f"kernel bandwidth on {name}, {BATCH} x {IMAGE} fp32 state (CUDA-event medians)",
        f"{'kernel':<34}{'median us':>12}{'GB/s':>10}{'of copy':>10}",
    ]
    lines += [f"{n:<34}{us:>12.1f}{gbs:>10.0f}{frac:>10.0%}" for n, us, gbs, frac in ROWS]
    if CONV_ROWS:
        lines += [
            "",
            f"EBM conv-block kernels on {name}, batch {CONV_BATCH}, nf {NF} (CUDA-event medians)",
            f"{'convolution':<40}{'triton us':>11}{'TFLOP/s':>9}{'cuDNN us':>10}{'TFLOP/s':>9}"
            f"{'speed-up':>10}",
        ]
        lines += [
            f"{n:<40}{us:>11.1f}{tf:>9.1f}{cus:>10.1f}{ctf:>9.1f}{cus / us:>9.2f}x"
            for n, us, tf, cus, ctf in CONV_ROWS
        ]
    for line in lines:
        if tr is not None:
            tr.write_line(line)
        else:
            print(line)


def _measure(benchmark, name: str, fn: Callable[[], object], nbytes: float, copy: float) -> None:
    ms = _median_ms(fn)
    gbs = nbytes / ms / 1e6
    ROWS.append((name, ms * 1e3, gbs, gbs / copy))
    benchmark.extra_info.update(
        {
            "median_us": ms * 1e3,
            "GB_per_s": gbs,
            "copy_GB_per_s": copy,
            "fraction_of_copy": gbs / copy,
        }
    )

    def synced() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=30, iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("grad_dtype", ["fp32", "bf16"])
def test_langevin_step(benchmark, data, copy_gbs, grad_dtype):
    from puregen_fast.kernels.langevin import langevin_step_

    x, g = data["x"], data["g" if grad_dtype == "fp32" else "g_bf16"]
    kw = {"seed": data["seed"], "step": data["step"], "sample_ids": data["ids"]}

    def fn():
        return langevin_step_(x, g, grad_scale=7.8e-5, noise_scale=1.25e-2, **kw)

    per_elem = 8 + g.element_size()
    _measure(benchmark, f"langevin_step_ (grad {grad_dtype})", fn, per_elem * x.numel(), copy_gbs)


def test_ddpm_add_noise(benchmark, data, copy_gbs):
    from puregen_fast.kernels.ddpm import ddpm_add_noise_

    x = data["x"]
    kw = {"seed": data["seed"], "step": data["step"], "sample_ids": data["ids"]}
    _measure(
        benchmark, "ddpm_add_noise_", lambda: ddpm_add_noise_(x, data["t"], **kw),
        8 * x.numel(), copy_gbs,
    )  # fmt: skip


@pytest.mark.parametrize("eps_dtype", ["fp32", "bf16"])
def test_ddpm_step(benchmark, data, copy_gbs, eps_dtype):
    from puregen_fast.kernels.ddpm import ddpm_step_

    x, e = data["x"], data["g" if eps_dtype == "fp32" else "g_bf16"]
    kw = {"seed": data["seed"], "step": data["step"], "sample_ids": data["ids"]}
    per_elem = 8 + e.element_size()
    _measure(
        benchmark, f"ddpm_step_ (eps {eps_dtype})", lambda: ddpm_step_(x, e, data["t"], **kw),
        per_elem * x.numel(), copy_gbs,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("direction", ["fwd", "dgrad"])
@pytest.mark.parametrize("layer", CONV_LAYERS, ids=lambda v: f"{v[0]}-{v[1]}ch-{v[2]}px")
def test_ebm_conv(benchmark, data, layer, direction, dtype):
    import torch.nn.functional as F

    from puregen_fast.kernels import ebm_conv as kc

    shape, cin, hw = layer
    k, stride, pad = kc.CONV_SHAPES[shape]
    ho, wo = kc.conv_out_hw(hw, hw, (k, k), stride, pad)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, device="cuda", generator=g).to(dt)

    x, w = rnd(CONV_BATCH, hw, hw, cin), rnd(NF, cin, k, k) * (cin * k * k) ** -0.5
    wp, bias = kc.pack_weight(w), torch.randn(NF, device="cuda")
    y_res, dy = rnd(CONV_BATCH, ho, wo, NF), rnd(CONV_BATCH, ho, wo, NF)
    xc = x.permute(0, 3, 1, 2)  # channels-last NCHW views: cuDNN's NHWC kernels
    dyc, resc = dy.permute(0, 3, 1, 2), y_res.permute(0, 3, 1, 2)
    b = torch.backends
    old = b.cudnn.benchmark, b.cudnn.allow_tf32
    b.cudnn.benchmark, b.cudnn.allow_tf32 = True, False
    try:
        if direction == "fwd":
            def triton_fn():
                return kc.conv2d_nhwc(x, wp, bias, stride=stride, padding=pad, relu_in=True,
                                      residual=y_res)  # fmt: skip

            def cudnn_fn():
                return F.conv2d(F.relu(xc), w, bias.to(dt), stride=stride, padding=pad) + resc
        else:
            def triton_fn():
                return kc.conv2d_input_grad_nhwc(dy, wp, (hw, hw), stride=stride, padding=pad,
                                                 mask=x, residual=x)  # fmt: skip

            def cudnn_fn():
                gi = torch.nn.grad.conv2d_input(xc.shape, w, dyc, stride=stride, padding=pad)
                return gi * (xc > 0) + xc
        flop = 2 * CONV_BATCH * ho * wo * NF * cin * k * k
        ms, cms = _median_ms(triton_fn, iters=50), _median_ms(cudnn_fn, iters=50)
    finally:
        b.cudnn.benchmark, b.cudnn.allow_tf32 = old
    tf, ctf = flop / ms / 1e9, flop / cms / 1e9
    CONV_ROWS.append((f"{direction} {shape} {cin}->{NF} @{hw}px {dtype}", ms * 1e3, tf,
                      cms * 1e3, ctf))  # fmt: skip
    benchmark.extra_info.update(
        {"median_us": ms * 1e3, "tflops": tf, "cudnn_median_us": cms * 1e3, "cudnn_tflops": ctf}
    )

    def synced() -> None:
        triton_fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
