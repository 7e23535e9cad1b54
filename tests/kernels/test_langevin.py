"""Fused Langevin update kernel vs its eager twin (issue 4; DESIGN 2.2, 2.3).

On CPU the kernel runs in the Triton interpreter: small shapes, large blocks, few launches.
"""

import pytest
import torch
from helpers import DEV, assert_rel, gpu, padded, pads_untouched, require_kernels

from puregen_fast import noise
from puregen_fast.kernels import langevin as kl
from puregen_fast.kernels._noise import randn_triton

EPS = 1.25e-2
KW = {"grad_scale": 0.05, "noise_scale": EPS}  # O(1) grads: both terms visible in fp32

# (batch, image shape, block): element counts per image are not multiples of the block
CASES = [
    (3, (3, 32, 32), 4096),  # 3072 < 4096: one masked program per image
    (5, (3, 64, 64), 8192),  # 12288 = 1.5 blocks
    (17, (3, 5, 7), 64),  # 105: partial Philox counter at the end of each row
]


@pytest.fixture(autouse=True, scope="module")
def _kernels_usable():
    require_kernels()



def _expected(x, g, seed, step, ids, stream=noise.STREAM_EBM, **kw):
    """The eager twin on the keyed stream; on the GPU on the kernel's own normals, whose
    transcendentals may differ from torch's by float rounding (checked in test_kernels_noise)."""
    z = None
    if DEV == "cuda":
        z = randn_triton(seed, stream, step, ids, x.shape[1:])
    kw = {**KW, **kw}
    return kl.langevin_step_eager(
        x.clone(), g, seed=seed, step=step, sample_ids=ids, stream=stream, noise=z, **kw
    )



@pytest.mark.parametrize("batch,shape,block", CASES)
def test_kernel_equals_eager_twin(batch, shape, block):
    gen = torch.Generator().manual_seed(batch)
    x0 = (torch.rand((batch, *shape), generator=gen) * 2 - 1).to(DEV)
    g0 = torch.randn((batch, *shape), generator=gen).to(DEV)
    ids = torch.arange(batch, dtype=torch.int64, device=DEV) * 7919 + 2**32 - 5
    xbuf, x = padded((batch, *shape), x0)
    gbuf, g = padded((batch, *shape), g0)
    out = kl.langevin_step_(x, g, seed=2**35 + 1, step=149, sample_ids=ids, block=block, **KW)
    assert out is x
    want = _expected(x0, g0, 2**35 + 1, 149, ids)
    assert torch.isfinite(x).all()
    assert (x != x0).float().mean() > 0.999, "elements were not updated"
    assert_rel(x, want)
    n = x0.numel()
    for buf in (xbuf, gbuf):  # nothing written outside the tensors
        assert pads_untouched(buf, n)
    assert torch.equal(g, g0)


def test_every_block_size_and_batch_split_gives_identical_results():
    batch, shape = 6, (3, 9, 11)  # 297 elements per image
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn((batch, *shape), generator=gen).to(DEV)
    g0 = torch.randn((batch, *shape), generator=gen).to(DEV)
    ids = torch.arange(50, 50 + batch, device=DEV)
    runs = []
    for block in (16, 128, 512, None):
        x = x0.clone()
        kl.langevin_step_(x, g0, seed=3, step=8, sample_ids=ids, block=block, **KW)
        runs.append(x)
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    parts = []
    for a, b in ((0, 1), (1, 4), (4, 6)):  # the same images in other batches
        x = x0[a:b].clone()
        kl.langevin_step_(x, g0[a:b], seed=3, step=8, sample_ids=ids[a:b], block=128, **KW)
        parts.append(x)
    assert torch.equal(torch.cat(parts), runs[0])


def test_device_tensor_seed_and_step_equal_ints():
    x0 = torch.randn(3, 2, 7, 7, device=DEV)
    g0 = torch.randn(3, 2, 7, 7, device=DEV)
    ids = torch.tensor([0, 2**31, 2**40], device=DEV)
    want = kl.langevin_step_(x0.clone(), g0, seed=2**33 + 3, step=12, sample_ids=ids, **KW)
    steps = torch.arange(20, device=DEV)
    seed_t = torch.tensor(2**33 + 3, device=DEV)
    for step_t in (steps[12], steps[12:13], torch.tensor(12, device=DEV)):
        got = kl.langevin_step_(x0.clone(), g0, seed=seed_t, step=step_t, sample_ids=ids, **KW)
        assert torch.equal(got, want)
    eager = kl.langevin_step_eager(
        x0.clone(), g0, seed=seed_t, step=steps[12], sample_ids=ids, **KW
    )
    assert_rel(eager, _expected(x0, g0, 2**33 + 3, 12, ids))


def test_noise_term_is_the_keyed_stream_and_changes_with_step():
    # from x = 0, grad = 0: every element must become its normal (catches unwritten elements)
    shape = (3, 5, 7)
    ids = torch.tensor([4, 9], device=DEV)
    zero = torch.zeros(2, *shape, device=DEV)
    draws = []
    for step, stream in ((0, 1), (1, 1), (0, 17)):
        x = zero.clone()
        kl.langevin_step_(
            x, zero, grad_scale=1.0, noise_scale=1.0, seed=5, step=step, sample_ids=ids,
            stream=stream, block=64,
        )  # fmt: skip
        assert (x != 0).all()
        want = noise.randn(5, stream, step, ids, shape)
        if DEV == "cpu":
            assert_rel(x, want)
        else:  # GPU transcendentals: see test_kernels_noise.normals_close
            err = (x - want).abs()
            assert (err <= 2e-5 * (1 + want.abs())).float().mean() >= 0.999
            assert err.max() < 1e-3
        draws.append(x)
    assert (draws[0] != draws[1]).float().mean() > 0.99  # steps differ
    assert (draws[0] != draws[2]).float().mean() > 0.99  # streams differ
    assert (draws[0][0] != draws[0][1]).float().mean() > 0.99  # samples differ


def test_bad_arguments_are_rejected():
    x = torch.zeros(2, 3, 4, device=DEV)
    ids = torch.tensor([0, 1], device=DEV)
    kw = {"seed": 0, "step": 0, "sample_ids": ids, **KW}
    with pytest.raises(TypeError, match="float32"):
        kl.langevin_step_(x.double(), x.double(), **kw)
    with pytest.raises(ValueError, match="contiguous"):
        kl.langevin_step_(x.transpose(1, 2), x.transpose(1, 2), **kw)
    with pytest.raises(ValueError, match="shape"):
        kl.langevin_step_(x, x[:, :2], **kw)
    with pytest.raises(ValueError, match="sample ids"):
        kl.langevin_step_(x, x, **{**kw, "sample_ids": ids[:1]})
    with pytest.raises(TypeError, match="int64"):
        kl.langevin_step_(x, x, **{**kw, "sample_ids": ids.int()})


@pytest.mark.gpu
@gpu
def test_gpu_bf16_grad_within_twice_the_eager_error():
    torch.manual_seed(0)
    shape = (7, 3, 32, 32)
    x0 = torch.rand(shape, device="cuda") * 2 - 1
    g = (torch.randn(shape, device="cuda") * 30).bfloat16()
    ids = torch.arange(7, device="cuda") + 1000
    kw = {"grad_scale": EPS**2 / 2, "noise_scale": EPS, "seed": 11, "step": 3, "sample_ids": ids}
    z_eager = noise.randn(11, noise.STREAM_EBM, 3, ids, shape[1:])
    z_kernel = randn_triton(11, noise.STREAM_EBM, 3, ids, shape[1:])

    def truth(z: torch.Tensor) -> torch.Tensor:  # float64, from the exact bf16 values
        return x0.double() - kw["grad_scale"] * g.double() + kw["noise_scale"] * z.double()

    eager = kl.langevin_step_eager(x0.clone(), g, **kw)
    kernel = kl.langevin_step_(x0.clone(), g, **kw)
    err_eager = (eager.double() - truth(z_eager)).abs().max().item()
    err_kernel = (kernel.double() - truth(z_kernel)).abs().max().item()
    floor = 2.0**-24 * truth(z_eager).abs().max().item()
    assert err_kernel <= 2 * max(err_eager, floor), (err_kernel, err_eager)
    # and the two agree to float tolerance on the same noise
    same = kl.langevin_step_eager(x0.clone(), g, noise=z_kernel, **kw)
    assert_rel(kernel, same)


@pytest.mark.gpu
@gpu
def test_gpu_graph_replay_draws_fresh_noise():
    shape = (5, 3, 16, 16)
    x0 = torch.randn(shape, device="cuda")
    g = torch.randn(shape, device="cuda")
    x = x0.clone()
    ids = torch.arange(5, device="cuda")
    seed_t = torch.tensor(21, device="cuda")
    step_t = torch.tensor(0, device="cuda")
    kw = {"seed": seed_t, "step": step_t, "sample_ids": ids, **KW}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        kl.langevin_step_(x.clone(), g, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kl.langevin_step_(x, g, **kw)
    outs = {}
    for step, first_id in ((3, 0), (4, 0), (4, 100)):
        x.copy_(x0)
        step_t.fill_(step)
        ids.copy_(torch.arange(first_id, first_id + 5, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        outs[(step, first_id)] = x.clone()
        assert_rel(x, _expected(x0, g, 21, step, ids.clone()))
    assert (outs[(3, 0)] != outs[(4, 0)]).float().mean() > 0.99
    assert (outs[(4, 0)] != outs[(4, 100)]).float().mean() > 0.99
