"""The keyed noise stream (DESIGN 2.2): Philox4x32-10 bit-exact, N(0, 1), one stream per image."""

import numpy as np
import pytest
import torch
from scipy import stats

from puregen_fast import noise

M32 = 0xFFFFFFFF


def np_philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Independent numpy Philox4x32-10 (Salmon et al. 2011) on uint64 arithmetic; ctr (N, 4)."""
    c = ctr.astype(np.uint64)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[:, 0]
        p1 = np.uint64(0xCD9E8D57) * c[:, 2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & np.uint64(M32)
        hi1, lo1 = p1 >> np.uint64(32), p1 & np.uint64(M32)
        c = np.stack([hi1 ^ c[:, 1] ^ k0, lo1, hi0 ^ c[:, 3] ^ k1, lo0], axis=1)
        k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(M32)
        k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(M32)
    return c


def test_philox_known_answers():
    # Random123's published known-answer vectors for philox4x32-10
    z = torch.zeros(1, dtype=torch.int64)
    f = torch.full((1,), M32, dtype=torch.int64)
    assert [int(v) for v in noise.philox4x32(z, z, z, z, 0, 0)] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8,
    ]  # fmt: skip
    assert [int(v) for v in noise.philox4x32(f, f, f, f, M32, M32)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD,
    ]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 7, (5 << 32) + 3, (1 << 63) - 1])
def test_integer_stage_matches_numpy(seed):
    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 1 << 32, size=(2000, 4), dtype=np.uint64)
    ctr[:4] = [[0, 0, 0, 0], [M32, M32, M32, M32], [1, 2, 3, 4], [M32, 0, M32, 0]]
    want = np_philox4x32_10(ctr, (seed & M32, seed >> 32))
    t = torch.from_numpy(ctr.astype(np.int64))
    got = noise.philox4x32(t[:, 0], t[:, 1], t[:, 2], t[:, 3], seed & M32, seed >> 32)
    assert np.array_equal(np.stack([g.numpy() for g in got], 1).astype(np.uint64), want)


def test_randn_is_the_documented_counter_layout():
    """randn = Box-Muller of Philox on (element//4, step, id lo, stream<<16 | id hi), ids > 2^32."""
    seed, stream, step = (3 << 32) + 11, 2, 149
    ids = [5, (1 << 31) + 1, (1 << 32) + 7, (1 << 48) - 1]
    shape = (3, 5, 7)  # 105 elements: not a multiple of 4
    z = noise.randn(seed, stream, step, ids, shape)
    assert z.shape == (4, *shape) and z.dtype == torch.float32
    for row, sid in enumerate(ids):
        n = 105
        e = np.arange(n)
        ctr = np.stack(
            [
                e // 4,
                np.full(n, step),
                np.full(n, sid & M32),
                np.full(n, (stream << 16) | (sid >> 32)),
            ],
            1,
        ).astype(np.uint64)
        words = np_philox4x32_10(ctr, (seed & M32, seed >> 32))
        signed = words.astype(np.uint32).view(np.int32).astype(np.int64)
        u = np.where(signed < 0, -signed - 1, signed).astype(np.float32) * np.float32(
            4.6566127342e-10
        )
        lane = e % 4
        u1 = np.maximum(np.where(lane < 2, u[e, 0], u[e, 2]), np.float32(1e-7)).astype(np.float64)
        u2 = np.where(lane < 2, u[e, 1], u[e, 3]).astype(np.float64)
        r = np.sqrt(-2 * np.log(u1))
        th = 2 * np.pi * u2
        want = np.where(lane % 2 == 0, r * np.cos(th), r * np.sin(th))
        np.testing.assert_allclose(z[row].reshape(-1).numpy(), want, rtol=0, atol=2e-5)


def test_moments_and_ks():
    z = noise.randn(1234, noise.STREAM_EBM, 0, torch.arange(100), (1000,)).reshape(-1).double()
    assert abs(float(z.mean())) < 1e-2
    assert abs(float(z.std()) - 1) < 1e-2
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_one_stream_per_image_whatever_the_batch():
    ids = torch.arange(64) * 3 + (1 << 33)
    full = noise.randn(9, 1, 4, ids, (3, 8, 8))
    for bs in (1, 7, 64):
        parts = [noise.randn(9, 1, 4, ids[i : i + bs], (3, 8, 8)) for i in range(0, 64, bs)]
        assert torch.equal(torch.cat(parts), full)
    perm = torch.randperm(64)
    assert torch.equal(noise.randn(9, 1, 4, ids[perm], (3, 8, 8)), full[perm])


def test_never_repeats_across_steps_streams_samples_seeds():
    base = noise.randn(1, 1, 0, [0, 1], (3, 4, 4))
    others = [
        noise.randn(1, 1, 1, [0, 1], (3, 4, 4)),  # step
        noise.randn(1, 2, 0, [0, 1], (3, 4, 4)),  # stream
        noise.randn(1, 1, 0, [2, 3], (3, 4, 4)),  # sample
        noise.randn(2, 1, 0, [0, 1], (3, 4, 4)),  # seed
        noise.randn(1 + (1 << 32), 1, 0, [0, 1], (3, 4, 4)),  # high seed word
        noise.randn(1, 1, 0, [1 << 32, 1 + (1 << 32)], (3, 4, 4)),  # high id word
    ]
    assert not torch.equal(base[0], base[1])
    for o in others:
        assert (o != base).float().mean() > 0.99
    assert len(torch.unique(base)) == base.numel()


def test_tensor_seed_and_step_equal_ints():
    a = noise.randn(77, 1, 12, [3, 4], (10,))
    b = noise.randn(torch.tensor(77), 1, torch.tensor(12), torch.tensor([3, 4]), (10,))
    assert torch.equal(a, b)


def test_no_wrap_at_paper_scale():
    # 50M images x 150 steps x 3072 values: the last image's last step is a fresh stream
    last = noise.randn(0, 1, 149, [50_000_000 - 1], (3, 32, 32))
    first = noise.randn(0, 1, 0, [0], (3, 32, 32))
    assert torch.isfinite(last).all() and not torch.equal(last, first)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"sample_ids": [-1]}, "sample ids"),
        ({"sample_ids": [1 << 48]}, "sample ids"),
        ({"stream": 1 << 16}, "stream"),
        ({"seed": -1}, "seed"),
        ({"step": 1 << 32}, "step"),
    ],
)
def test_bad_keys_are_refused(kwargs, msg):
    args = {"seed": 0, "stream": 1, "step": 0, "sample_ids": [0], "shape": (4,)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        noise.randn(**args)
