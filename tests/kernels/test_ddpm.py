"""DDPM forward-noise and posterior-step kernels vs their eager twins, and the twins vs diffusers'
`DDPMScheduler` (issue 4; DESIGN 2.1, 2.3).

On CPU the kernels run in the Triton interpreter: small shapes, large blocks, few launches.
"""

import pytest
import torch
from helpers import DEV, assert_rel, gpu, padded, pads_untouched, require_kernels

from puregen_fast import noise
from puregen_fast.kernels import ddpm as kd
from puregen_fast.kernels._noise import randn_triton
from puregen_fast.models.schedule import ddpm_coefficients

SD = noise.STREAM_DDPM

CASES = [  # (batch, image shape, block): per-image sizes not multiples of the block
    (3, (3, 32, 32), 4096),
    (5, (3, 64, 64), 8192),
    (17, (3, 5, 7), 64),
]


@pytest.fixture(autouse=True, scope="module")
def _kernels_usable():
    require_kernels()


@pytest.fixture(scope="module")
def diffusers_sched():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
    )




def _z(seed, step, ids, shape, stream=SD):
    """The kernel's own normals on the GPU (transcendentals may differ from torch's by rounding;
    checked in test_kernels_noise); None (the keyed torch stream) on CPU."""
    return randn_triton(seed, stream, step, ids, shape) if DEV == "cuda" else None



# --------------------------------------------------------------------------------------------
# the coefficient table and the eager twins against diffusers
# --------------------------------------------------------------------------------------------
def test_coefficients_are_diffusers_values_bit_for_bit(diffusers_sched):
    s = diffusers_sched
    table = ddpm_coefficients()
    assert table.shape == (1000, 5) and table.dtype == torch.float32
    for t in range(1000):  # diffusers' own float32 scalar expressions (step, _get_variance)
        ab = s.alphas_cumprod[t]
        ab_prev = s.alphas_cumprod[t - 1] if t > 0 else s.one
        beta_prod, beta_prod_prev = 1 - ab, 1 - ab_prev
        alpha_t = ab / ab_prev
        beta_t = 1 - alpha_t
        want = [
            ab**0.5,
            beta_prod**0.5,
            (ab_prev**0.5 * beta_t) / beta_prod,
            alpha_t**0.5 * beta_prod_prev / beta_prod,
            s._get_variance(t) ** 0.5 if t > 0 else torch.tensor(0.0),
        ]
        assert torch.equal(table[t], torch.stack(want).float()), t
    assert ddpm_coefficients() is table  # cached per device
    exact = ddpm_coefficients(precision="float64")
    torch.testing.assert_close(exact, table, rtol=1e-3, atol=0)


def test_eager_step_equals_diffusers_step_for_every_t(diffusers_sched, monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as sched_mod

    shape = (2, 3, 4, 4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, 2**32 + 1])
    drawn = {}

    def keyed_randn(shape_, generator=None, device=None, dtype=None, **kw):
        return drawn["z"].to(dtype)  # diffusers' variance noise := our keyed draw

    monkeypatch.setattr(sched_mod, "randn_tensor", keyed_randn)
    worst = 0.0
    for t in range(1000):
        x_t = torch.randn(shape, generator=gen) * 1.5
        eps = torch.randn(shape, generator=gen) * 1.5  # large enough that x0 often clips
        drawn["z"] = noise.randn(3, SD, t, ids, shape[1:])
        want = diffusers_sched.step(eps, t, x_t).prev_sample
        got = kd.ddpm_step_eager(x_t.clone(), eps, t, seed=3, step=t, sample_ids=ids)
        worst = max(worst, (got - want).abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"t={t}")
    assert worst < 1e-6


def test_eager_add_noise_equals_diffusers_add_noise(diffusers_sched):
    shape = (3, 3, 5, 5)
    ids = torch.tensor([0, 1, 2**40])
    x = torch.rand(shape) * 2 - 1
    for t in (0, 1, 74, 75, 500, 999):
        z = noise.randn(4, SD, 0, ids, shape[1:])
        want = diffusers_sched.add_noise(x, z, torch.full((3,), t, dtype=torch.int64))
        got = kd.ddpm_add_noise_eager(x.clone(), t, seed=4, sample_ids=ids)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_no_noise_at_t0():
    x = torch.randn(2, 3, 4, 4)
    eps = torch.randn(2, 3, 4, 4)
    ids = torch.tensor([0, 1])
    a = kd.ddpm_step_eager(x.clone(), eps, 0, seed=1, step=0, sample_ids=ids)
    b = kd.ddpm_step_eager(x.clone(), eps, 0, seed=2, step=5, sample_ids=ids)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# kernels vs eager twins
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,shape,block", CASES)
def test_step_kernel_equals_eager_twin(batch, shape, block):
    gen = torch.Generator().manual_seed(batch)
    n = batch * torch.Size(shape).numel()
    ids = torch.arange(batch, dtype=torch.int64, device=DEV) * 104729 + 2**31 - 3
    t_values = {3: (0, 1, 999), 5: (74,), 17: (0, 37, 500)}[batch]
    for t in t_values:
        x0 = (torch.randn((batch, *shape), generator=gen) * 1.5).to(DEV)
        e0 = (torch.randn((batch, *shape), generator=gen) * 1.5).to(DEV)
        xbuf, x = padded((batch, *shape), x0)
        ebuf, e = padded((batch, *shape), e0)
        t_arg = torch.tensor(t, device=DEV) if t % 2 else t  # both paths
        out = kd.ddpm_step_(x, e, t_arg, seed=2**36 + 5, step=t + 1, sample_ids=ids, block=block)
        assert out is x
        want = kd.ddpm_step_eager(
            x0.clone(), e0, t, seed=2**36 + 5, step=t + 1, sample_ids=ids,
            noise=_z(2**36 + 5, t + 1, ids, shape),
        )  # fmt: skip
        assert torch.isfinite(x).all()
        assert (x != x0).float().mean() > 0.999, "elements were not updated"
        assert_rel(x, want)
        assert pads_untouched(xbuf, n) and pads_untouched(ebuf, n)
        assert torch.equal(e, e0)


@pytest.mark.parametrize("batch,shape,block", CASES)
def test_add_noise_kernel_equals_eager_twin(batch, shape, block):
    gen = torch.Generator().manual_seed(100 + batch)
    n = batch * torch.Size(shape).numel()
    ids = torch.arange(batch, dtype=torch.int64, device=DEV) + 2**32
    x0 = (torch.rand((batch, *shape), generator=gen) * 2 - 1).to(DEV)
    buf, x = padded((batch, *shape), x0)
    t = {3: 75, 5: 999, 17: 0}[batch]
    kd.ddpm_add_noise_(x, t, seed=9, sample_ids=ids, step=0, block=block)
    want = kd.ddpm_add_noise_eager(
        x0.clone(), t, seed=9, sample_ids=ids, noise=_z(9, 0, ids, shape)
    )
    assert torch.isfinite(x).all() and (x != x0).float().mean() > 0.999
    assert_rel(x, want)
    assert pads_untouched(buf, n)


def test_every_block_size_and_batch_split_gives_identical_results():
    batch, shape = 6, (3, 7, 9)  # 189 elements per image
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn((batch, *shape), generator=gen).to(DEV)
    e0 = torch.randn((batch, *shape), generator=gen).to(DEV)
    ids = torch.arange(30, 30 + batch, device=DEV)
    runs = []
    for block in (16, 256, None):
        x = x0.clone()
        kd.ddpm_step_(x, e0, 40, seed=1, step=2, sample_ids=ids, block=block)
        kd.ddpm_add_noise_(x, 40, seed=1, sample_ids=ids, step=3, block=block)
        runs.append(x)
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    parts = []
    for a, b in ((0, 2), (2, 6)):
        x = x0[a:b].clone()
        kd.ddpm_step_(x, e0[a:b], 40, seed=1, step=2, sample_ids=ids[a:b], block=64)
        kd.ddpm_add_noise_(x, 40, seed=1, sample_ids=ids[a:b], step=3, block=64)
        parts.append(x)
    assert torch.equal(torch.cat(parts), runs[0])


def test_device_tensor_t_seed_step_equal_ints():
    x0 = torch.randn(3, 2, 5, 5, device=DEV)
    e0 = torch.randn(3, 2, 5, 5, device=DEV)
    ids = torch.tensor([1, 2**33, 5], device=DEV)
    want = kd.ddpm_step_(x0.clone(), e0, 74, seed=2**40, step=1, sample_ids=ids)
    ts = torch.arange(75, -1, -1, device=DEV)  # as the sampler keeps them: [75, ..., 0]
    draws = torch.arange(76, device=DEV)
    seed_t = torch.tensor(2**40, device=DEV)
    got = kd.ddpm_step_(x0.clone(), e0, ts[1], seed=seed_t, step=draws[1], sample_ids=ids)
    assert torch.equal(got, want)
    eager = kd.ddpm_step_eager(x0.clone(), e0, ts[1], seed=seed_t, step=draws[1], sample_ids=ids)
    assert_rel(got, kd.ddpm_step_eager(x0.clone(), e0, 74, seed=2**40, step=1, sample_ids=ids,
                                         noise=_z(2**40, 1, ids, (2, 5, 5))))  # fmt: skip
    if DEV == "cpu":
        assert_rel(got, eager)
    want = kd.ddpm_add_noise_(x0.clone(), 75, seed=2**40, sample_ids=ids, step=0)
    got = kd.ddpm_add_noise_(x0.clone(), ts[0], seed=seed_t, sample_ids=ids, step=draws[0])
    assert torch.equal(got, want)


def test_nan_in_eps_propagates_like_eager():
    x0 = torch.randn(2, 3, 4, 4, device=DEV)
    e0 = torch.randn(2, 3, 4, 4, device=DEV)
    e0[1, 2, 3, 0] = float("nan")
    ids = torch.tensor([0, 1], device=DEV)
    got = kd.ddpm_step_(x0.clone(), e0, 10, seed=0, step=0, sample_ids=ids)
    want = kd.ddpm_step_eager(x0.clone(), e0, 10, seed=0, step=0, sample_ids=ids)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 1


def test_custom_coefficients_and_bad_arguments():
    x = torch.randn(2, 3, 4, device=DEV)
    ids = torch.tensor([0, 1], device=DEV)
    short = ddpm_coefficients(100, 1e-4, 0.02, device=DEV)
    a = kd.ddpm_step_(x.clone(), x, 99, seed=0, step=0, sample_ids=ids, coefficients=short)
    b = kd.ddpm_step_eager(x.clone(), x, 99, seed=0, step=0, sample_ids=ids, coefficients=short,
                           noise=_z(0, 0, ids, (3, 4)))  # fmt: skip
    assert_rel(a, b)
    with pytest.raises(ValueError, match="t must lie"):
        kd.ddpm_step_(x, x, 100, seed=0, step=0, sample_ids=ids, coefficients=short)
    with pytest.raises(ValueError, match="t must lie"):
        kd.ddpm_step_eager(x, x, -1, seed=0, step=0, sample_ids=ids)
    with pytest.raises(TypeError, match="float32"):
        kd.ddpm_step_(x, x.half(), 5, seed=0, step=0, sample_ids=ids)
    with pytest.raises(ValueError, match="coefficients"):
        kd.ddpm_add_noise_(x, 5, seed=0, sample_ids=ids, coefficients=short[:, :3])
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ddpm_coefficients(0)


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
def test_gpu_bf16_eps_within_twice_the_eager_error():
    torch.manual_seed(0)
    shape = (7, 3, 32, 32)
    ids = torch.arange(7, device="cuda")
    table = ddpm_coefficients(device="cuda").double()
    for t in (1, 30, 74):
        x0 = torch.randn(shape, device="cuda")
        e = torch.randn(shape, device="cuda").bfloat16()
        kw = {"seed": 5, "step": t, "sample_ids": ids}
        z_eager = noise.randn(5, SD, t, ids, shape[1:])
        z_kernel = randn_triton(5, SD, t, ids, shape[1:])

        def truth(z, t=t, x0=x0, e=e):  # float64 from the exact bf16 eps and fp32 table
            sa, sb, c0, c1, sd = table[t]
            x0p = ((x0.double() - sb * e.double()) / sa).clamp(-1, 1)
            return c0 * x0p + c1 * x0.double() + sd * z.double()

        eager = kd.ddpm_step_eager(x0.clone(), e, t, **kw)
        kernel = kd.ddpm_step_(x0.clone(), e, t, **kw)
        err_eager = (eager.double() - truth(z_eager)).abs().max().item()
        err_kernel = (kernel.double() - truth(z_kernel)).abs().max().item()
        floor = 2.0**-24 * truth(z_eager).abs().max().item()
        assert err_kernel <= 2 * max(err_eager, floor), (t, err_kernel, err_eager)


@pytest.mark.gpu
@gpu
def test_gpu_graph_replay_reads_t_step_and_ids():
    shape = (4, 3, 16, 16)
    x0 = torch.randn(shape, device="cuda")
    e = torch.randn(shape, device="cuda")
    x = x0.clone()
    ids = torch.arange(4, device="cuda")
    t_t = torch.tensor(10, device="cuda")
    step_t = torch.tensor(0, device="cuda")
    seed_t = torch.tensor(8, device="cuda")
    kw = {"seed": seed_t, "step": step_t, "sample_ids": ids}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        kd.ddpm_step_(x.clone(), e, t_t, **kw)
        kd.ddpm_add_noise_(x.clone(), t_t, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kd.ddpm_step_(x, e, t_t, **kw)
        kd.ddpm_add_noise_(x, t_t, **kw)
    outs = []
    for t, step, first in ((10, 1, 0), (10, 2, 0), (50, 2, 0), (50, 2, 9)):
        x.copy_(x0)
        t_t.fill_(t)
        step_t.fill_(step)
        ids.copy_(torch.arange(first, first + 4, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        want = x0.clone()
        z = randn_triton(8, SD, step, ids.clone(), shape[1:])
        kd.ddpm_step_eager(want, e, t, seed=8, step=step, sample_ids=ids, noise=z)
        kd.ddpm_add_noise_eager(want, t, seed=8, sample_ids=ids, step=step, noise=z)
        assert_rel(x, want)
        outs.append(x.clone())
    for a, b in zip(outs, outs[1:]):
        assert (a != b).float().mean() > 0.99
