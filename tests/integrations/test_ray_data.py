"""Ray Data (issue 15): `PurifyBatches` gives the bytes of ``puregen-fast purify`` whatever
batches it is handed; the example runs an image folder through Ray Data on an actor pool."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.data.datasets import Dataset
from puregen_fast.integrations.ray_data import EnergyBatches, PurifyBatches
from puregen_fast.pipeline import purify_dataset
from puregen_fast.scan import energy_purifier, scan_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ebm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ebm")
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), root / "ebm")
    return root / "ebm"


def _opts(ebm: Path, bs: int) -> dict:
    return dict(method="ebm", ebm=str(ebm), ebm_steps=2, seed=3, backend="reference",
                device="cpu", batch_size=bs)  # fmt: skip


def test_uneven_batches_give_the_pipeline_bytes(ebm, tmp_path):
    """Batches of 3, 5, 1 and 2 images, ids out of order, against the pipeline's batches of 4
    (shards of 6): the same bytes for every image; other columns pass through."""
    x = np.random.default_rng(1).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    y = np.arange(11) % 3
    ds = Dataset("npz", "train", x, y, ["a", "b", "c"], "memory")
    opts = _opts(ebm, 4)
    p = pg.Purifier(ebm=pg.load_ebm(ebm), **{k: v for k, v in opts.items()
                                             if k not in ("ebm", "batch_size")})  # fmt: skip
    want = np.asarray(pg.load_purified(
        purify_dataset(ds, p, tmp_path / "o", batch_size=4, shard_size=6, quiet=True)).images)
    assert not np.array_equal(want, x)
    order = np.random.default_rng(2).permutation(11)
    fn = PurifyBatches(**opts)
    got = np.zeros_like(x)
    for part in np.split(order, [3, 8, 9]):
        keys = np.asarray([f"k{i}" for i in part], dtype=object)
        out = fn({"image": x[part], "id": part.astype(np.int64), "key": keys})
        assert set(out) == {"image", "id", "key"} and list(out["key"]) == list(keys)
        got[part] = out["image"]
    np.testing.assert_array_equal(got, want)


def test_bad_columns_and_options_are_named(ebm):
    fn = PurifyBatches(method="none", batch_size=2, device="cpu")
    x = np.zeros((3, 8, 8, 3), np.uint8)
    ids = np.arange(3)
    cases = [
        ({"id": ids}, "no 'image' column"),
        ({"image": x}, "no 'id' column"),
        ({"image": x.astype(np.float32), "id": ids}, "column 'image': expected uint8"),
        ({"image": x[..., 0], "id": ids}, "column 'image'"),
        ({"image": x, "id": ids[:2]}, "column 'id': expected integers of shape \\(3,\\)"),
        ({"image": x, "id": ids.astype(float)}, "column 'id'"),
        ({"image": x, "id": ids - 1}, "column 'id': global indices must be >= 0"),
    ]
    for batch, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(batch)
    with pytest.raises(TypeError, match="unknown option.*data_dir"):
        PurifyBatches(method="none", data_dir="x")
    with pytest.raises(ValueError, match="batch_size.*--batch-size"):
        PurifyBatches(method="none", batch_size=0)
    with pytest.raises(ValueError, match="filter_threshold"):
        PurifyBatches(method="filt", ebm=str(ebm))


def _example():
    spec = importlib.util.spec_from_file_location("ray_purify", REPO / "examples/ray_purify.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ray_purify"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_ray_actor_pool_equals_the_command(ebm, tmp_path, monkeypatch):
    """Slow (a local Ray instance and two actors: about 20 s on 2 CPUs): an ImageFolder through
    examples/ray_purify.py (ActorPoolStrategy(size=2), blocks of 3 images, smaller than the
    batch size 4, so Ray hands batches of 4, 2, 4, 1 images that straddle the command's batches
    0-3, 4-7, 8-10) and through ``puregen-fast purify``: the same bytes and labels for every
    image."""
    import ray

    from puregen_fast.data.webdataset import read_tar

    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    for i in range(11):
        p = tmp_path / "folder" / ["cat", "dog", "emu"][i * 3 // 11] / f"{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(p)
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))
    flags = ["--method", "ebm", "--ebm", str(ebm), "--ebm-steps", "2", "--seed", "3",
             "--backend", "reference", "--device", "cpu", "--batch-size", "4"]  # fmt: skip
    assert main(["purify", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"),
                 "--quiet", "--out", str(tmp_path / "cli"), *flags]) == 0  # fmt: skip
    want = pg.load_purified(tmp_path / "cli")
    ex = _example()
    ray.cloudpickle.register_pickle_by_value(ex)  # the workers cannot import it by name
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert ex.main(["--imagefolder", str(tmp_path / "folder"), "--out", str(tmp_path / "ray"),
                        "--actors", "2", "--actor-cpus", "0.5", "--blocks", "4", *flags]) == 0
    finally:
        ray.shutdown()
    got = {}
    for t in sorted((tmp_path / "ray").glob("*.tar")):
        for k, im, y in zip(*read_tar(t, (32, 32, 3))):
            got[k] = (im, y)
    assert sorted(got) == [f"{i:02d}" for i in range(11)]
    for i in range(11):
        np.testing.assert_array_equal(got[f"{i:02d}"][0], want.images[i])
        assert got[f"{i:02d}"][1] == want.labels[i]
    assert not np.array_equal(np.asarray(want.images), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "abc", None, True])
def test_a_bad_filter_threshold_is_refused_by_the_constructor(ebm, bad):
    """Issue 22: nan and inf returned every batch unchanged (no energy is >= nan; all or none
    are >= inf) and "abc" failed only at the first batch, on some actor. None is the missing
    threshold; True is not a number either."""
    with pytest.raises(ValueError, match="filter_threshold"):
        PurifyBatches(method="filt", ebm=str(ebm), filter_threshold=bad, device="cpu")


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                 st.text(max_size=5), st.booleans(), st.none()))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_the_engine_takes_finite_numbers_only_as_threshold(value):
    import math

    from puregen_fast.purifier import check_filter_threshold

    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))  # fmt: skip
    if ok:
        assert check_filter_threshold(value) == float(value)
    else:
        with pytest.raises(ValueError, match="filter_threshold must be a finite number"):
            check_filter_threshold(value)


def test_the_engine_refuses_a_nan_threshold_at_the_call(ebm):
    p = pg.Purifier(method="filt", ebm=pg.load_ebm(ebm), ebm_steps=1, device="cpu",
                    backend="reference")  # fmt: skip
    x = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="filter_threshold"):
        p(x, [0, 1], filter_threshold=float("nan"))


@given(h=st.integers(1, 40), w=st.integers(1, 40))
@settings(max_examples=25, deadline=None)
def test_ray_and_the_command_accept_the_same_image_sizes(ebm_model, h, w):
    """Issue 22: PurifyBatches took 1x1, 8x8 and 33x31 images the command refuses. One check
    serves both: the batch is refused exactly when the command's check refuses the data set,
    with the same message."""
    from puregen_fast.purifier import ImageSizeError

    fn, p = ebm_model
    try:
        p.check_image_size(h, w)  # what the pipeline's plan calls before anything is written
        want = None
    except ImageSizeError as e:
        want = str(e)
    batch = {"image": np.zeros((1, h, w, 3), np.uint8), "id": np.zeros(1, np.int64)}
    if want is None:
        assert fn(batch)["image"].shape == (1, h, w, 3)
    else:
        with pytest.raises(ImageSizeError) as e:
            fn(batch)
        assert str(e.value) == want


@pytest.fixture(scope="module")
def ebm_model(ebm):
    fn = PurifyBatches(**{**_opts(ebm, 1), "ebm_steps": 1})
    return fn, fn.purifier


def test_the_issue_sizes(ebm_model):
    from puregen_fast.purifier import ImageSizeError

    fn, _ = ebm_model
    for h, w in [(1, 1), (33, 31)]:
        with pytest.raises(ImageSizeError, match=f"divisible by 4, but the images are {h}x{w}"):
            fn({"image": np.zeros((1, h, w, 3), np.uint8), "id": np.zeros(1, np.int64)})


class _FixedEnergy(torch.nn.Module):
    """An 'EBM' whose energies are given (its gradient is zero): filt's ranking in isolation."""

    patch_size = 1

    def __init__(self, energies: list[float]) -> None:
        super().__init__()
        self.register_buffer("e", torch.tensor(energies, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.e[: x.shape[0]] + 0 * x.sum(dim=(1, 2, 3))


@given(st.lists(st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                          st.floats(-1, 1)), min_size=1, max_size=6),
       st.booleans())  # fmt: skip
@settings(max_examples=40, deadline=None)
def test_filt_diverges_exactly_on_non_finite_energies(energies, with_threshold):
    """Issue 22: an energy that is NaN or infinite is a divergence naming exactly those images
    (DESIGN 2.4), whether filt ranks the batch or compares with a given threshold; finite
    energies purify."""
    import math

    from puregen_fast.errors import DivergenceError

    p = pg.Purifier(method="filt", ebm=_FixedEnergy(energies), ebm_steps=1, device="cpu",
                    backend="reference")  # fmt: skip
    n = len(energies)
    x = np.full((n, 8, 8, 3), 128, np.uint8)
    ids = np.arange(100, 100 + n)
    bad = [int(i) for i, e in zip(ids, energies) if not math.isfinite(e)]
    kw = {"filter_threshold": 0.0} if with_threshold else {}
    if bad:
        for call in (lambda: p(x, ids, **kw), lambda: p.energy(x, ids)):
            with pytest.raises(DivergenceError, match="non-finite") as e:
                call()
            assert e.value.sample_ids == bad
    else:
        assert p(x, ids, **kw).shape == x.shape
        np.testing.assert_array_equal(p.energy(x, ids), np.float32(energies))


def test_energy_batches_give_the_scan_energies(ebm, tmp_path):
    """`EnergyBatches` on uneven batches with ids out of order: each image's energy equals
    `puregen-fast scan`'s with the same batch size, bit for bit; other columns pass through."""
    x = np.random.default_rng(4).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    ds = Dataset("npz", "train", x, np.arange(11) % 3, ["a", "b", "c"], "memory")
    r = scan_dataset(ds, energy_purifier(pg.load_ebm(ebm), "cpu"), tmp_path / "scan",
                     batch_size=4, shard_size=6, quiet=True)  # fmt: skip
    fn = EnergyBatches(ebm=str(ebm), device="cpu", batch_size=4)
    assert fn.describe()["ebm"]["sha256"] == pg.load_ebm(ebm).puregen_sha256
    got = np.full(11, np.nan)
    order = np.random.default_rng(5).permutation(11)
    for part in np.split(order, [3, 8, 9]):
        out = fn({"image": x[part], "id": part.astype(np.int64), "key": part * 10})
        assert set(out) == {"image", "id", "key", "energy"} and out["energy"].dtype == np.float64
        np.testing.assert_array_equal(out["image"], x[part])  # the images are not changed
        got[part] = out["energy"]
    np.testing.assert_array_equal(got, r.table.energies)
    assert len(set(got.tolist())) == 11  # a model that gives every image its own energy


def test_energy_batches_with_a_chain_give_scan_chain_steps_drop(ebm, tmp_path):
    """``chain_steps=K``: the drop column equals ``scan --chain-steps K``'s, bit for bit, on
    uneven batches with ids out of order (the chain's noise is keyed by the ids)."""
    x = np.random.default_rng(6).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    ds = Dataset("npz", "train", x, np.arange(9) % 2, ["a", "b"], "memory")
    model = pg.load_ebm(ebm)
    r = scan_dataset(ds, energy_purifier(model, "cpu"), tmp_path / "scan", batch_size=4,
                     shard_size=4, quiet=True,
                     chain=energy_purifier(model, "cpu", ebm_steps=2))  # fmt: skip
    fn = EnergyBatches(ebm=str(ebm), device="cpu", batch_size=4, chain_steps=2)
    assert fn.describe()["chain"]["steps"] == 2
    got = {k: np.full(9, np.nan) for k in ("energy", "energy_after", "drop")}
    order = np.random.default_rng(7).permutation(9)
    for part in np.split(order, [2, 7]):
        out = fn({"image": x[part], "id": part.astype(np.int64)})
        for k in got:
            got[k][part] = out[k]
    assert r is not None and r.table.before is not None and r.table.after is not None
    np.testing.assert_array_equal(got["energy"], r.table.before)
    np.testing.assert_array_equal(got["energy_after"], r.table.after)
    np.testing.assert_array_equal(got["drop"], r.table.energies)
    for bad in (-1, 10**4 + 1, 1.5, True):
        with pytest.raises(ValueError, match="chain_steps"):
            EnergyBatches(ebm=str(ebm), chain_steps=bad)


def test_energy_batches_name_bad_options_and_columns(ebm):
    with pytest.raises(ValueError, match="batch_size"):
        EnergyBatches(ebm=str(ebm), batch_size=0)
    with pytest.raises(TypeError, match="method"):
        EnergyBatches(ebm=str(ebm), method="ddpm")  # the purification options are not its
    fn = EnergyBatches(ebm=str(ebm), device="cpu", batch_size=2)
    x = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="no 'id' column"):
        fn({"image": x})
    with pytest.raises(ValueError, match="column 'image': expected uint8"):
        fn({"image": x.astype(np.float32), "id": np.arange(3)})
    with pytest.raises(TypeError, match="batch_format='numpy'"):
        fn([x])
