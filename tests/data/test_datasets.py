"""Readers (issue 3, acceptance 1): each returns the right images, labels and class order from a
fixture in the data set's real format; the decoded cache; unreadable files."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import (
    CIFAR_CLASSES,
    make_cifar10_tarball,
    make_cinic10_tarball,
    write_cifar10,
    write_cinic10,
    write_imagefolder,
    write_npz,
    write_tinyimagenet,
)

from puregen_fast.data import datasets
from puregen_fast.data.datasets import open_dataset
from puregen_fast.data.download import COMPLETE_MARKER
from puregen_fast.data.io import file_digest
from puregen_fast.errors import UsageError

pytestmark = pytest.mark.usefixtures("offline_cache")


def _check(ds, x, y, names):
    assert ds.images.dtype == np.uint8 and ds.images.shape == x.shape
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(np.asarray(ds.images), x)
    np.testing.assert_array_equal(ds.labels, y)
    assert ds.class_names == list(names)
    assert len(ds) == len(y)


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_class_order_is_the_published_one():
    # batches.meta's label_names; CINIC-10 keeps the order (the fixtures build from the constant)
    published = "airplane automobile bird cat deer dog frog horse ship truck".split()
    assert list(datasets.CIFAR10_CLASSES) == published


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_extracted(tmp_path, split):
    exp = write_cifar10(tmp_path / "data")
    ds = open_dataset("cifar10", tmp_path / "data", split, download=False)
    _check(ds, *exp[split], CIFAR_CLASSES)
    assert ds.name == "cifar10" and ds.split == split
    # the layout is also found when --data-dir points at the batches folder itself
    ds2 = open_dataset("cifar10", tmp_path / "data" / "cifar-10-batches-py", split, download=False)
    np.testing.assert_array_equal(ds2.labels, exp[split][1])


def test_cifar10_from_archive_placed_by_hand(tmp_path):
    tar, exp = make_cifar10_tarball(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tar, data / "cifar-10-python.tar.gz")
    from puregen_fast.data import download

    md5 = file_digest(tar, "md5")
    orig = download.ARCHIVES["cifar10"].digest
    download.ARCHIVES["cifar10"].digest = md5
    try:
        ds = open_dataset("cifar10", data, "train", download=False)
    finally:
        download.ARCHIVES["cifar10"].digest = orig
    _check(ds, *exp["train"], CIFAR_CLASSES)
    assert (data / "cifar10" / COMPLETE_MARKER).is_file()


def test_cifar10_pickle_cannot_run_code(tmp_path):
    write_cifar10(tmp_path / "data")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": Evil(), b"labels": []})
    )
    with pytest.raises(UsageError, match="test_batch"):
        open_dataset("cifar10", tmp_path / "data", "test", download=False)


def test_bad_split_names_the_flag(tmp_path):
    write_cifar10(tmp_path / "data")
    with pytest.raises(UsageError, match="--split"):
        open_dataset("cifar10", tmp_path / "data", "valid", download=False)


def test_missing_dataset_offline_says_what_to_do(tmp_path):
    with pytest.raises(UsageError) as ei:
        open_dataset("cifar10", tmp_path / "empty", "train", download=False)
    msg = str(ei.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "empty") in msg


# ----------------------------------------------------------------------------- CINIC-10


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_cinic10(tmp_path, split):
    exp = write_cinic10(tmp_path / "cinic")
    ds = open_dataset("cinic10", tmp_path / "cinic", split, download=False, quiet=True)
    _check(ds, *exp[split], CIFAR_CLASSES)
    assert [str(Path(f).relative_to(tmp_path / "cinic")) for f in ds.files] == exp[f"{split}-files"]


def test_cinic10_imagenet_drops_cifar_files(tmp_path):
    exp = write_cinic10(tmp_path / "cinic")
    ds = open_dataset("cinic10-imagenet", tmp_path / "cinic", "train", download=False, quiet=True)
    _check(ds, *exp["train-imagenet"], CIFAR_CLASSES)
    assert ds.files and not any(Path(f).name.startswith("cifar10-") for f in ds.files)
    assert len(ds) < len(exp["train"][1])


def test_cinic10_grayscale_becomes_rgb(tmp_path):
    exp = write_cinic10(tmp_path / "cinic")
    ds = open_dataset("cinic10", tmp_path / "cinic", "train", download=False, quiet=True)
    x = np.asarray(ds.images)
    gray = [i for i in range(len(x)) if (x[i, ..., 0] == x[i, ..., 1]).all()]
    assert gray, "the fixture holds one grayscale PNG"
    np.testing.assert_array_equal(x, exp["train"][0])


# ----------------------------------------------------------------------------- Tiny-ImageNet


@pytest.mark.parametrize("split", ["train", "val"])
def test_tinyimagenet(tmp_path, split):
    exp = write_tinyimagenet(tmp_path / "tiny")
    ds = open_dataset("tinyimagenet", tmp_path / "tiny", split, download=False, quiet=True)
    _check(ds, *exp[split], exp["class_names"])
    assert ds.class_names == sorted(ds.class_names)  # sorted wnids, not wnids.txt order


# ----------------------------------------------------------------------------- ImageFolder, npz


def test_imagefolder_matches_torchvision_order(tmp_path):
    exp = write_imagefolder(tmp_path / "folder")
    ds = open_dataset("imagefolder", tmp_path / "folder", "train", quiet=True)
    _check(ds, exp["x"], exp["y"], exp["class_names"])
    assert ds.class_names == ["Dog", "bird", "cat"]  # plain sorted(), as torchvision


def test_imagefolder_uses_split_subfolder_when_present(tmp_path):
    exp = write_imagefolder(tmp_path / "folder" / "val", classes=("a", "b"), n=1)
    write_imagefolder(tmp_path / "folder" / "train", classes=("x", "y", "z"), n=1)
    ds = open_dataset("imagefolder", tmp_path / "folder", "val", quiet=True)
    _check(ds, exp["x"], exp["y"], ["a", "b"])


def test_imagefolder_needs_one_size(tmp_path):
    write_imagefolder(tmp_path / "f", classes=("a",), n=1)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "f" / "a" / "zz.png")
    with pytest.raises(UsageError, match="zz.png"):
        open_dataset("imagefolder", tmp_path / "f", quiet=True)


@pytest.mark.parametrize("classes", [False, True])
def test_npz(tmp_path, classes):
    exp = write_npz(tmp_path / "d.npz", classes=classes)
    ds = open_dataset("npz", tmp_path / "d.npz")
    names = [f"c{i}" for i in range(12)] if classes else [f"{i:02d}" for i in range(12)]
    _check(ds, exp["x"], exp["y"], names)
    # a folder holding <split>.npz works too
    shutil.copy(tmp_path / "d.npz", tmp_path / "train.npz")
    assert len(open_dataset("npz", tmp_path, "train")) == 12


def test_npz_wrong_dtype(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 4, 4, 3), np.float32), y=np.zeros(2, int))
    with pytest.raises(UsageError, match="uint8"):
        open_dataset("npz", tmp_path / "f.npz")


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_npz_damaged_is_usage_error(tmp_path, damage):
    rng = np.random.default_rng(0)
    x = np.repeat(rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), 3, -1)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.arange(20) % 3)
    raw = bytearray((tmp_path / "d.npz").read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # a byte early in the deflate stream of 'x': zlib.error
        with zipfile.ZipFile(tmp_path / "d.npz") as zf:
            h = zf.getinfo("x.npy").header_offset
        name_len, extra_len = struct.unpack("<HH", raw[h + 26 : h + 30])  # the local header
        raw[h + 30 + name_len + extra_len + 2] ^= 0xFF
    (tmp_path / "d.npz").write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="d.npz"):
        open_dataset("npz", tmp_path / "d.npz")


def test_poisoned_npz_into_missing_folder_is_usage_error(tmp_path):
    from puregen_fast.eval.poison import poison_dataset, save_poisoned_npz

    x = np.zeros((4, 8, 8, 3), np.uint8)
    ps = poison_dataset(x, np.array([0, 1, 0, 1]), np.zeros((1, 3, 8, 8)), 1, 1)
    with pytest.raises(UsageError, match="--out"):
        save_poisoned_npz(ps, tmp_path / "missing" / "p.npz")
    assert not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- decoded cache


def test_decoded_cache_skips_decoding(tmp_path, monkeypatch):
    exp = write_cinic10(tmp_path / "cinic")
    first = open_dataset("cinic10", tmp_path / "cinic", "valid", download=False, quiet=True)
    entries = list((tmp_path / "cache" / "decoded").iterdir())
    assert len(entries) == 1 and (entries[0] / COMPLETE_MARKER).is_file()

    def boom(path):
        raise AssertionError(f"decoded again: {path}")

    monkeypatch.setattr(datasets, "_read_image", boom)
    second = open_dataset("cinic10", tmp_path / "cinic", "valid", download=False, quiet=True)
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(second.images), np.asarray(first.images))
    np.testing.assert_array_equal(np.asarray(second.images), exp["valid"][0])
    monkeypatch.undo()
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))

    # a changed file listing is a new key: decoded again, with the new content
    f = next((tmp_path / "cinic" / "valid" / "cat").iterdir())
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    os.utime(f, ns=(1, 1))
    third = open_dataset("cinic10", tmp_path / "cinic", "valid", download=False, quiet=True)
    assert not np.array_equal(np.asarray(third.images), np.asarray(first.images))


def test_unreadable_image_names_file_and_caches_nothing(tmp_path):
    write_cinic10(tmp_path / "cinic")
    bad = tmp_path / "cinic" / "test" / "dog" / "n0_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UsageError, match="n0_broken.png"):
        open_dataset("cinic10", tmp_path / "cinic", "test", download=False, quiet=True)
    decoded = tmp_path / "cache" / "decoded"
    assert not decoded.exists() or not any(
        (e / COMPLETE_MARKER).exists() for e in decoded.iterdir()
    )


def test_cinic_tarball_layout_found_after_extraction(tmp_path):
    # train/ valid/ test/ at the top of the archive, extracted under <data>/cinic10
    tar, _ = make_cinic10_tarball(tmp_path, n_cifar=1, n_imagenet=1)
    data = tmp_path / "data" / "cinic10"
    with tarfile.open(tar) as tf:
        tf.extractall(data, filter="data")
    (data / COMPLETE_MARKER).write_text("")
    ds = open_dataset("cinic10", tmp_path / "data", "test", download=False, quiet=True)
    assert len(ds) == 20
