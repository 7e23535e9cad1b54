"""The Triton noise helper reproduces `puregen_fast.noise` (issue 4; DESIGN 2.2).

On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest); on a
CUDA machine they compile for the GPU.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import DEV, gpu, require_kernels
from scipy import stats

from puregen_fast import noise
from puregen_fast.kernels import _noise as kn
from puregen_fast.kernels.availability import triton_available

IDS_BIG = [0, 5, 2**31 - 1, 2**31 + 3, 2**32 + 7, 2**47 + 11]
SEEDS = [0, 2**40 + 123, 2**63 - 1]


@pytest.fixture(autouse=True, scope="module")
def _kernels_usable():
    require_kernels()


def _ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEV)


def _ref_words(seed: int, stream: int, step: int, ids: torch.Tensor, n: int) -> torch.Tensor:
    ids = ids.cpu()
    c0 = torch.arange((n + 3) // 4, dtype=torch.int64).unsqueeze(0)
    c1 = torch.full_like(c0, step)
    c2 = (ids & 0xFFFFFFFF).unsqueeze(1)
    c3 = ((ids >> 32) | (stream << 16)).unsqueeze(1)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    words = noise.philox4x32(c0, c1, c2, c3, seed & 0xFFFFFFFF, seed >> 32)
    return torch.stack(words, dim=-1)


def normals_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The interpreter (numpy float32) matches torch's transcendentals to ~1e-7. On the GPU the
    Box-Muller log/sin/cos may be fast approximations: float tolerance nearly everywhere, and a
    bounded deviation where -2 log(u) is tiny and the square root magnifies the log's error."""
    got, want = got.cpu(), want.cpu()
    if DEV == "cpu":
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    err = (got - want).abs()
    assert (err <= 2e-5 * (1 + want.abs())).float().mean() >= 0.999
    assert err.max() < 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bit_exact(seed):
    ids = _ids(IDS_BIG)
    step = 2**32 - 1  # the largest step: a Python int the kernel receives as int64
    shape = (3, 5, 7)  # 105 elements: the last counter is partial
    got = kn.philox_triton(seed, 3, step, ids, shape, block=64)
    assert got.shape == (len(IDS_BIG), 27, 4)
    assert torch.equal(got.cpu(), _ref_words(seed, 3, step, ids, 105))


@pytest.mark.parametrize("seed", SEEDS)
def test_normals_match_noise_randn(seed):
    ids = _ids(IDS_BIG)
    for shape, block in (((3, 5, 7), 64), ((3, 32, 32), 4096)):
        got = kn.randn_triton(seed, noise.STREAM_DDPM, 9, ids, shape, block=block)
        assert not got.isnan().any(), "some outputs were not written"
        normals_close(got, noise.randn(seed, noise.STREAM_DDPM, 9, ids, shape))


def test_every_block_size_gives_the_same_numbers():
    ids = _ids([1, 2**33 + 5, 17])
    shape = (3, 11, 13)  # 429 elements
    outs = [kn.randn_triton(42, 1, 3, ids, shape, block=b) for b in (4, 16, 128, 1024)]
    outs.append(kn.randn_triton(42, 1, 3, ids, shape))  # the launcher's own choice
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_same_images_in_different_batches():
    ids = torch.arange(100, 117, dtype=torch.int64, device=DEV)  # 17 images
    shape = (3, 9, 9)
    whole = kn.randn_triton(7, 1, 4, ids, shape, block=256)
    parts = torch.cat(
        [kn.randn_triton(7, 1, 4, ids[a:b], shape, block=256) for a, b in ((0, 3), (3, 8), (8, 17))]
    )
    assert torch.equal(whole, parts)
    rev = kn.randn_triton(7, 1, 4, ids.flip(0), shape, block=256)
    assert torch.equal(rev.flip(0), whole)


def test_device_tensor_seed_and_step_equal_ints():
    ids = _ids([3, 2**32 + 1])
    shape = (2, 5, 5)
    want = kn.randn_triton(2**40 + 9, 5, 77, ids, shape, block=64)
    steps = torch.arange(100, dtype=torch.int64, device=DEV)
    for seed_t, step_t in (
        (torch.tensor(2**40 + 9, device=DEV), torch.tensor(77, device=DEV)),  # 0-d
        (torch.tensor([2**40 + 9], device=DEV), steps[77:78]),  # one element, offset view
        (torch.tensor(2**40 + 9, device=DEV), steps[77]),  # 0-d view with an offset
        (2**40 + 9, torch.tensor(77, dtype=torch.int32, device=DEV)),  # int32 is accepted
    ):
        assert torch.equal(kn.randn_triton(seed_t, 5, step_t, ids, shape, block=64), want)
    words = kn.philox_triton(torch.tensor(2**40 + 9, device=DEV), 5, steps[77], ids, shape)
    assert torch.equal(words, kn.philox_triton(2**40 + 9, 5, 77, ids, shape))


def test_noise_differs_between_steps_streams_samples_and_seeds():
    shape = (3, 16, 16)
    base = kn.randn_triton(1, 1, 0, _ids([10]), shape)[0].flatten()
    others = [
        kn.randn_triton(1, 1, 1, _ids([10]), shape)[0],  # next step
        kn.randn_triton(1, 2, 0, _ids([10]), shape)[0],  # other stream
        kn.randn_triton(1, 1, 0, _ids([11]), shape)[0],  # other sample
        kn.randn_triton(1, 1, 0, _ids([10 + 2**32]), shape)[0],  # high id bits matter
        kn.randn_triton(2, 1, 0, _ids([10]), shape)[0],  # other seed
        kn.randn_triton(1 + 2**32, 1, 0, _ids([10]), shape)[0],  # high seed bits matter
    ]
    for o in others:
        o = o.flatten()
        assert (o != base).float().mean() > 0.999
        corr = torch.corrcoef(torch.stack([o, base]))[0, 1].abs().item()
        assert corr < 0.1


def test_kernel_draws_are_standard_normal():
    # ~100k draws from the kernel itself (32 programs in the interpreter)
    z = kn.randn_triton(2024, 1, 0, torch.arange(32, device=DEV), (3, 32, 32), block=4096)
    z = z.double().flatten().cpu()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 5 * (0.5 / n) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # and neighbouring lanes of one counter are uncorrelated (Box-Muller pairs)
    lanes = z.reshape(-1, 4)
    for a, b in ((0, 1), (2, 3), (0, 2)):
        assert abs(torch.corrcoef(lanes[:, [a, b]].T)[0, 1].item()) < 0.02


def test_torch_stream_large_sample_stats():
    # the big-sample check on the reference stream the kernel matches (the interpreter is slow)
    z = noise.randn(99, 1, 3, torch.arange(256), (3, 32, 32)).double().flatten()  # 786k draws
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_bad_arguments_are_rejected():
    ids = _ids([0])
    with pytest.raises(ValueError, match="seed"):
        kn.randn_triton(-1, 1, 0, ids, (4,))
    with pytest.raises(ValueError, match="step"):
        kn.randn_triton(0, 1, 2**32, ids, (4,))
    with pytest.raises(ValueError, match="stream"):
        kn.randn_triton(0, 2**16, 0, ids, (4,))
    with pytest.raises(ValueError, match="one-element"):
        kn.randn_triton(torch.tensor([1, 2], device=DEV), 1, 0, ids, (4,))
    with pytest.raises(TypeError, match="integer"):
        kn.randn_triton(torch.tensor(1.0, device=DEV), 1, 0, ids, (4,))
    with pytest.raises(ValueError, match="block"):
        kn.randn_triton(0, 1, 0, ids, (4,), block=12)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="2\\*\\*48"):
            kn.randn_triton(0, 1, 0, _ids([2**48]), (4,))


def test_availability_reason():
    ok, why = triton_available(DEV)
    assert ok and isinstance(why, str) and why
    if DEV == "cpu":
        assert "interpreter" in why


def test_kernels_import_without_triton():
    # macOS/Windows have no triton wheel: the eager twins must still import and run
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "import puregen_fast.kernels as k\n"
        "ok, why = k.triton_available(); assert not ok and 'triton' in why, why\n"
        "x = torch.zeros(2, 3); ids = torch.tensor([0, 1])\n"
        "k.langevin_step_eager(x, x.clone(), grad_scale=1., noise_scale=1., seed=0, step=0,"
        " sample_ids=ids)\n"
        "k.ddpm_step_eager(x, x.clone(), 5, seed=0, step=0, sample_ids=ids)\n"
        "try:\n"
        "    k.langevin_step_(x, x, grad_scale=1., noise_scale=1., seed=0, step=0,"
        " sample_ids=ids)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('kernel ran without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.gpu
@gpu
def test_gpu_normals_close_to_reference_stream():
    # 1.2M draws on the GPU, ids across 2**32: normals within float tolerance nearly everywhere
    ids = torch.arange(2**32 - 50, 2**32 + 50, dtype=torch.int64, device="cuda")
    got = kn.randn_triton(5, 1, 3, ids, (3, 64, 64)).cpu()
    want = noise.randn(5, 1, 3, ids.cpu(), (3, 64, 64))
    normals_close(got, want)
