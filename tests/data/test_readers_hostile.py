"""Readers on hostile input (issue 11): every bad file or folder is a UsageError naming it;
tiny inputs cannot cost huge memory, disk or time (labels, FIFOs, link loops, pixel counts,
``limit``); Tiny-ImageNet annotations stay inside the data set; the decoded cache is keyed on
file contents."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import (
    TINY_WNIDS,
    no_hang,
    png_header_only,
    write_cifar10,
    write_cinic10,
    write_imagefolder,
    write_npz,
    write_tinyimagenet,
)
from PIL import Image

from puregen_fast.data import datasets
from puregen_fast.data.datasets import MAX_CLASSES, open_dataset
from puregen_fast.errors import UsageError

pytestmark = pytest.mark.usefixtures("offline_cache")


def _png(path, size=(4, 4), value=0) -> None:
    path = os.fsencode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 2 * value % 256, 3)).save(buf, "PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _cache_entries(tmp_path) -> list[Path]:
    d = tmp_path / "cache" / "decoded"
    return sorted(d.iterdir()) if d.exists() else []


# ----------------------------------------------------------------------------- 1: bad files


def test_imagefolder_non_utf8_names_with_cache(tmp_path):
    root = os.fsencode(tmp_path / "f")
    _png(root + b"/cl\xffass/im\xfe.png", value=1)
    _png(root + b"/plain/a.png", value=2)
    first = open_dataset("imagefolder", root.decode("utf-8", "surrogateescape"), quiet=True)
    assert len(first) == 2 and len(_cache_entries(tmp_path)) == 1
    assert os.fsencode(first.class_names[0]) == b"cl\xffass"
    again = open_dataset("imagefolder", tmp_path / "f", quiet=True)  # from the cache
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))


def test_bad_file_with_non_utf8_name_is_named_printably(tmp_path):
    root = os.fsencode(tmp_path / "f")
    _png(root + b"/a/good.png")
    with open(root + b"/a/z\xff.png", "wb") as f:
        f.write(b"not an image")
    with pytest.raises(UsageError, match=r"z\\xff\.png") as ei:
        open_dataset("imagefolder", tmp_path / "f", quiet=True)
    str(ei.value).encode("utf-8")  # printable: no lone surrogates


def _dangling(reader: str, tmp_path: Path) -> tuple[str, Path, str, Path]:
    if reader == "imagefolder":
        write_imagefolder(tmp_path / "d", n=1)
        link = tmp_path / "d" / "cat" / "gone.png"
        return "imagefolder", tmp_path / "d", "train", link
    if reader == "cinic10":
        write_cinic10(tmp_path / "d", n_cifar=0, n_imagenet=1)
        return "cinic10", tmp_path / "d", "test", tmp_path / "d" / "test" / "dog" / "n0_gone.png"
    write_tinyimagenet(tmp_path / "d", n_train=1)
    w = sorted(TINY_WNIDS)[0]
    link = tmp_path / "d" / "tiny-imagenet-200" / "train" / w / "images" / "gone.JPEG"
    return "tinyimagenet", tmp_path / "d", "train", link


@pytest.mark.parametrize("reader", ["imagefolder", "cinic10", "tinyimagenet"])
def test_dangling_symlink_is_usage_error(tmp_path, reader):
    name, data, split, link = _dangling(reader, tmp_path)
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UsageError, match="gone.*broken symbolic link"):
        open_dataset(name, data, split, download=False, quiet=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


_N = 5
_GOOD_DATA = np.zeros((_N, 3072), np.uint8)
_GOOD_LABELS = [0, 1, 2, 3, 9]
_CIFAR_BAD_BATCHES = {
    "labels-floats": {b"data": _GOOD_DATA, b"labels": [0.5] * _N},
    "labels-none": {b"data": _GOOD_DATA, b"labels": None},
    "labels-items-none": {b"data": _GOOD_DATA, b"labels": [None] * _N},
    "labels-strings": {b"data": _GOOD_DATA, b"labels": ["cat"] * _N},
    "labels-bools": {b"data": _GOOD_DATA, b"labels": [True] * _N},
    "labels-10": {b"data": _GOOD_DATA, b"labels": [10] * _N},
    "labels-negative": {b"data": _GOOD_DATA, b"labels": [-1] * _N},
    "labels-2**70": {b"data": _GOOD_DATA, b"labels": [2**70] * _N},
    "labels-float-array": {b"data": _GOOD_DATA, b"labels": np.zeros(_N)},
    "labels-2d-array": {b"data": _GOOD_DATA, b"labels": np.zeros((_N, 1), np.int64)},
    "labels-dict": {b"data": _GOOD_DATA, b"labels": {0: 1}},
    "data-float": {b"data": _GOOD_DATA.astype(np.float64), b"labels": _GOOD_LABELS},
    "data-int64": {b"data": _GOOD_DATA.astype(np.int64), b"labels": _GOOD_LABELS},
    "data-list": {b"data": [[0] * 3072] * _N, b"labels": _GOOD_LABELS},
    "data-dict": {b"data": {b"a": 1}, b"labels": _GOOD_LABELS},
    "data-none": {b"data": None, b"labels": _GOOD_LABELS},
    "data-short": {b"data": _GOOD_DATA[:, :100], b"labels": _GOOD_LABELS},
    "data-object": {b"data": np.array([object()] * 3, dtype=object), b"labels": []},
    "data-fewer-images": {b"data": _GOOD_DATA[:4], b"labels": _GOOD_LABELS},
    "missing-data": {b"labels": _GOOD_LABELS},
    "missing-labels": {b"data": _GOOD_DATA},
    "not-a-dict": [_GOOD_DATA, _GOOD_LABELS],
    "code": {b"data": _Evil(), b"labels": []},
}


def _pickled(obj) -> bytes:
    try:
        return pickle.dumps(obj, protocol=2)
    except (pickle.PicklingError, TypeError, AttributeError):
        return b""


@pytest.mark.parametrize("case", sorted(_CIFAR_BAD_BATCHES))
def test_cifar10_odd_batch_is_usage_error(tmp_path, case):
    write_cifar10(tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(_pickled(_CIFAR_BAD_BATCHES[case]) or b"x")
    with pytest.raises(UsageError, match="test_batch"):
        open_dataset("cifar10", tmp_path / "data", "test", download=False)


@pytest.mark.parametrize(
    "raw",
    [
        b"K\x01}b.",  # BUILD on an int: AttributeError inside the unpickler
        b"h\x05.",  # a memo entry that does not exist
        b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00zz\x85R.",  # dtype('zz'): TypeError
        b"",
        b"\x80\x02}q\x00(C\x04data\x94",  # cut short
    ],
)
def test_cifar10_damaged_pickle_is_usage_error(tmp_path, raw):
    write_cifar10(tmp_path / "data")
    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").write_bytes(raw)
    with pytest.raises(UsageError, match="test_batch"):
        open_dataset("cifar10", tmp_path / "data", "test", download=False)


@pytest.mark.parametrize(
    "names",
    [7, None, [b"\xff\xfe"] * 10, ["a"] * 9, [1] * 10, {b"a": 1}],
    ids=["int", "none", "not-utf8", "nine", "ints", "dict"],
)
def test_cifar10_odd_meta_is_usage_error(tmp_path, names):
    write_cifar10(tmp_path / "data")
    meta = {b"label_names": names, b"\xff\xfe": 1}  # a key that is not UTF-8 is ignored
    (tmp_path / "data" / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(meta))
    with pytest.raises(UsageError, match="batches.meta"):
        open_dataset("cifar10", tmp_path / "data", "test", download=False)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_lying_header(shape) -> bytes:
    """An npz whose x.npy header declares ``shape`` but holds 48 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    with io.BytesIO() as out:
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("x.npy", buf.getvalue() + bytes(48))
            y = io.BytesIO()
            np.save(y, np.zeros(4, np.int64))
            zf.writestr("y.npy", y.getvalue())
        return out.getvalue()


_X = np.zeros((4, 2, 2, 3), np.uint8)
_Y = np.arange(4)
_NPZ_BAD = {
    "zero-height": lambda: _npz_bytes(x=np.zeros((4, 0, 2, 3), np.uint8), y=_Y),
    "zero-width": lambda: _npz_bytes(x=np.zeros((4, 2, 0, 3), np.uint8), y=_Y),
    "zero-images": lambda: _npz_bytes(x=np.zeros((0, 2, 2, 3), np.uint8), y=_Y[:0]),
    "x-float": lambda: _npz_bytes(x=_X.astype(np.float32), y=_Y),
    "x-int16": lambda: _npz_bytes(x=_X.astype(np.int16), y=_Y),
    "x-rank-3": lambda: _npz_bytes(x=_X[0], y=_Y[:2]),
    "x-rank-5": lambda: _npz_bytes(x=_X[None], y=_Y[:1]),
    "x-4-channels": lambda: _npz_bytes(x=np.zeros((4, 2, 2, 4), np.uint8), y=_Y),
    "x-structured": lambda: _npz_bytes(x=np.zeros(4, "u1,u1"), y=_Y),
    "y-float": lambda: _npz_bytes(x=_X, y=_Y.astype(np.float64)),
    "y-bool": lambda: _npz_bytes(x=_X, y=_Y > 1),
    "y-negative": lambda: _npz_bytes(x=_X, y=_Y - 2),
    "y-2d": lambda: _npz_bytes(x=_X, y=_Y[:, None]),
    "y-short": lambda: _npz_bytes(x=_X, y=_Y[:3]),
    "y-strings": lambda: _npz_bytes(x=_X, y=np.array(["a"] * 4)),
    "y-uint64-huge": lambda: _npz_bytes(x=_X, y=np.full(4, 2**63 + 5, np.uint64)),
    "classes-2d": lambda: _npz_bytes(x=_X, y=_Y, classes=np.array([["a", "b"]] * 2)),
    "classes-0d": lambda: _npz_bytes(x=_X, y=_Y, classes=np.array("abcd")),
    "classes-too-few": lambda: _npz_bytes(x=_X, y=_Y, classes=np.array(["a", "b"])),
    "no-y": lambda: _npz_bytes(x=_X),
    "bare-npy": lambda: (lambda b: (np.save(b, _X), b.getvalue())[1])(io.BytesIO()),
    "raw-member": lambda: _zip_members({"x": b"not an array", "y": b"nor this"}),
    "random-bytes": lambda: bytes(range(256)) * 4,
    "huge-declared-shape": lambda: _npz_lying_header((2**40, 4, 4, 3)),
    "declared-shape-too-small": lambda: _npz_lying_header((1, 2, 2, 3)),
}


def _zip_members(members: dict[str, bytes]) -> bytes:
    with io.BytesIO() as out:
        with zipfile.ZipFile(out, "w") as zf:
            for k, v in members.items():
                zf.writestr(k, v)
        return out.getvalue()


@pytest.mark.parametrize("case", sorted(_NPZ_BAD))
def test_npz_bad_arrays_are_usage_errors(tmp_path, case):
    (tmp_path / "d.npz").write_bytes(_NPZ_BAD[case]())
    with pytest.raises(UsageError, match="d.npz"):
        open_dataset("npz", tmp_path / "d.npz")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "header-only"])
def test_corrupt_image_files_are_usage_errors(tmp_path, damage):
    write_imagefolder(tmp_path / "f", classes=("a",), n=1)
    good = (tmp_path / "f" / "a" / "img0.png").read_bytes()
    raw = {
        "truncated": good[: len(good) // 2],
        "random": bytes(range(7, 250)),
        "empty": b"",
        "header-only": png_header_only(32, 32),
    }[damage]
    (tmp_path / "f" / "a" / "img1.png").write_bytes(raw)
    with pytest.raises(UsageError, match="img1.png"):
        open_dataset("imagefolder", tmp_path / "f", quiet=True)
    assert not any((e / ".puregen-complete").exists() for e in _cache_entries(tmp_path))


# ----------------------------------------------------------------------------- 2: costs


def test_npz_huge_label_is_refused_not_expanded(tmp_path):
    np.savez(tmp_path / "d.npz", x=_X, y=np.array([0, 1, 2, 2**40]))
    with no_hang(20), pytest.raises(UsageError, match=f"below {MAX_CLASSES}"):
        open_dataset("npz", tmp_path / "d.npz")
    np.savez(tmp_path / "ok.npz", x=_X, y=np.array([0, 1, 2, MAX_CLASSES - 1]))
    assert len(open_dataset("npz", tmp_path / "ok.npz").class_names) == MAX_CLASSES
    np.savez(tmp_path / "c.npz", x=_X, y=np.array([0, 1, 2, 3]), classes=np.array(list("abc")))
    with pytest.raises(UsageError, match="3 class names"):
        open_dataset("npz", tmp_path / "c.npz")


@pytest.mark.parametrize("reader", ["imagefolder", "cinic10"])
def test_fifo_is_skipped_with_a_warning(tmp_path, capfd, reader):
    if reader == "imagefolder":
        exp = write_imagefolder(tmp_path / "d", classes=("a", "b"), n=1)
        fifo, args = tmp_path / "d" / "a" / "1.png", ("imagefolder", tmp_path / "d", "train")
    else:
        exp = write_cinic10(tmp_path / "d", n_cifar=0, n_imagenet=1)
        fifo, args = tmp_path / "d" / "test" / "cat" / "1.png", ("cinic10", tmp_path / "d", "test")
    os.mkfifo(fifo)
    with no_hang(20, [fifo]):
        ds = open_dataset(*args, download=False, quiet=True)
    x, y = (exp["x"], exp["y"]) if reader == "imagefolder" else exp["test"]
    np.testing.assert_array_equal(np.asarray(ds.images), x)
    np.testing.assert_array_equal(ds.labels, y)
    err = capfd.readouterr().err
    assert "1.png" in err and "not a regular file" in err


def test_fifo_in_tinyimagenet_val_is_usage_error(tmp_path):
    write_tinyimagenet(tmp_path / "t")
    val = tmp_path / "t" / "tiny-imagenet-200" / "val" / "images"
    (val / "val_0.JPEG").unlink()
    os.mkfifo(val / "val_0.JPEG")
    with no_hang(20, [val / "val_0.JPEG"]), pytest.raises(UsageError, match="val_0.JPEG"):
        open_dataset("tinyimagenet", tmp_path / "t", "val", download=False, quiet=True)


def test_symlink_loops_do_not_explode_the_walk(tmp_path, capfd):
    exp = write_imagefolder(tmp_path / "f", classes=("a", "b"), n=1)
    a = tmp_path / "f" / "a"
    (a / "up1").symlink_to("..")
    (a / "up2").symlink_to("..")
    (a / "sub" / "top").symlink_to("../..")
    (a / "root").symlink_to("/")
    (a / "b1").symlink_to("../b")  # another class's folder, entered once
    (a / "b2").symlink_to("../b")
    (tmp_path / "f" / "up").symlink_to("..")  # class folders that lead back up: kept, empty
    (tmp_path / "f" / "zz").symlink_to("/")
    with no_hang(30):
        ds = open_dataset("imagefolder", tmp_path / "f", quiet=True)
    assert ds.class_names == ["a", "b", "up", "zz"]
    b_imgs = exp["x"][exp["y"] == 1]
    x = np.concatenate([exp["x"][exp["y"] == 0][:1], b_imgs, exp["x"][exp["y"] == 0][1:], b_imgs])
    np.testing.assert_array_equal(np.asarray(ds.images), x)  # a/b1/*, then a/img0, a/sub, b/*
    np.testing.assert_array_equal(ds.labels, [0] * (2 + len(b_imgs)) + [1] * len(b_imgs))
    err = capfd.readouterr().err
    for name in ("up1", "up2", "top", "root", "b2"):
        assert f"{name}: it leads to a folder already walked" in err
    assert f"{tmp_path / 'f' / 'up'}: it leads to {tmp_path / 'f'} or a folder above it" in err
    assert f"{tmp_path / 'f' / 'zz'}: it leads to" in err


def _reader_cases(tmp_path: Path):
    """(reader, data_dir, split) for every reader, each with a few images."""
    write_cifar10(tmp_path / "c10", n_per_batch=3, n_test=5)
    write_cinic10(tmp_path / "cinic")
    write_tinyimagenet(tmp_path / "tiny")
    write_imagefolder(tmp_path / "folder")
    write_npz(tmp_path / "d.npz")
    return [
        ("cifar10", tmp_path / "c10", "train"),
        ("cifar10", tmp_path / "c10", "test"),
        ("cinic10", tmp_path / "cinic", "valid"),
        ("cinic10-imagenet", tmp_path / "cinic", "train"),
        ("tinyimagenet", tmp_path / "tiny", "train"),
        ("tinyimagenet", tmp_path / "tiny", "val"),
        ("imagefolder", tmp_path / "folder", "train"),
        ("npz", tmp_path / "d.npz", "train"),
    ]


@pytest.mark.parametrize("limit", [1, 4, 7, 1000])
def test_limit_gives_the_first_images_of_every_reader(tmp_path, limit):
    for name, data, split in _reader_cases(tmp_path):
        full = open_dataset(name, data, split, download=False, quiet=True, cache=False)
        part = open_dataset(name, data, split, download=False, quiet=True, limit=limit)
        n = min(limit, len(full))
        assert len(part) == n and part.images.shape[0] == n, (name, split)
        np.testing.assert_array_equal(np.asarray(part.images), np.asarray(full.images)[:n])
        np.testing.assert_array_equal(part.labels, full.labels[:n])
        assert part.class_names == full.class_names
        assert part.files == (full.files[:n] if full.files is not None else None)


def test_limit_reads_nothing_past_the_selection(tmp_path):
    write_imagefolder(tmp_path / "f", classes=("a", "b"), n=2)
    (tmp_path / "f" / "a" / "sub" / "zz.png").write_bytes(b"damaged")  # the 3rd image of a
    (tmp_path / "f" / "b" / "img0.png").write_bytes(png_header_only(12000, 12000))
    os.mkfifo(tmp_path / "f" / "b" / "img1.png")
    with no_hang(20, [tmp_path / "f" / "b" / "img1.png"]):
        ds = open_dataset("imagefolder", tmp_path / "f", quiet=True, limit=2)
    assert len(ds) == 2 and [Path(f).name for f in ds.files] == ["img0.png", "img1.bmp"]
    (entry,) = _cache_entries(tmp_path)
    assert np.load(entry / "images.npy", mmap_mode="r").shape == (2, 32, 32, 3)
    with pytest.raises(UsageError, match="zz.png"):
        open_dataset("imagefolder", tmp_path / "f", quiet=True, limit=4)


def test_limit_must_be_positive(tmp_path):
    write_npz(tmp_path / "d.npz")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match="--limit"):
            open_dataset("npz", tmp_path / "d.npz", limit=bad)


def test_huge_declared_images_are_refused_from_the_header(tmp_path):
    """Refused by our cap, naming the flag; Pillow's DecompressionBombWarning (its own, higher
    limit: 144M pixels is over it) is not printed beside the error."""
    (tmp_path / "f" / "a").mkdir(parents=True)
    for i in range(4):  # four tiny files declaring 12000 x 12000 (432 MB decoded each)
        (tmp_path / "f" / "a" / f"{i}.png").write_bytes(png_header_only(12000, 12000))
    assert 12000 * 12000 > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match=r"0\.png is 12000x12000.*--max-image-pixels"):
            open_dataset("imagefolder", tmp_path / "f", quiet=True, limit=1)
    assert [str(w.message) for w in caught] == []
    assert not any(e.name.endswith(".npy") for e in (tmp_path / "cache").rglob("*"))


def test_a_raised_pixel_cap_is_not_second_guessed_by_pillow_and_its_filter_is_restored(tmp_path):
    """With --max-image-pixels raised past Pillow's limit, the header passes without Pillow's
    warning (the file, truncated, is then an error naming it); the process's warning filters are
    as they were, also after threads opened images at once."""
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "0.png").write_bytes(png_header_only(12000, 12000))
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match=r"cannot read image .*0\.png"):
            open_dataset("imagefolder", tmp_path / "f", quiet=True, max_pixels=12000 * 12000)
    assert [str(w.message) for w in caught] == []
    with ThreadPoolExecutor(8) as ex:  # the filter is swapped in and out under one lock
        list(ex.map(lambda _: datasets.open_pil(png_header_only(12000, 12000)).close(), range(64)))
    assert warnings.filters == before


@pytest.mark.parametrize("reader", ["imagefolder", "npz"])
def test_max_pixels_can_be_raised(tmp_path, reader):
    if reader == "imagefolder":
        write_imagefolder(tmp_path / "d", classes=("a",), n=1)
        data = tmp_path / "d"
    else:
        write_npz(tmp_path / "d.npz")
        data = tmp_path / "d.npz"
    with pytest.raises(UsageError, match="32x32 = 1024 pixels.*--max-image-pixels"):
        open_dataset(reader, data, quiet=True, max_pixels=1023)
    assert len(open_dataset(reader, data, quiet=True, max_pixels=1024)) > 0
    with pytest.raises(UsageError, match="--max-image-pixels"):  # not served from the cache
        open_dataset(reader, data, quiet=True, max_pixels=1023)
    with pytest.raises(UsageError, match="--max-image-pixels"):
        open_dataset(reader, data, quiet=True, max_pixels=0)
    assert datasets.MAX_PIXELS == 4096 * 4096


def test_no_room_for_the_cache_decodes_in_memory(tmp_path, monkeypatch, capfd):
    exp = write_imagefolder(tmp_path / "f")

    def full_disk(path):
        return type("usage", (), {"free": 1000})

    monkeypatch.setattr(datasets.shutil, "disk_usage", full_disk)
    ds = open_dataset("imagefolder", tmp_path / "f", quiet=True)
    np.testing.assert_array_equal(np.asarray(ds.images), exp["x"])
    assert not any((e / ".puregen-complete").exists() for e in _cache_entries(tmp_path))
    assert "not caching" in capfd.readouterr().err


# ----------------------------------------------------------------------------- 3: paths


@pytest.mark.parametrize("entry", ["../../train/{w}/images/{w}_0.JPEG", "{abs}", "..", "a/b"])
def test_tinyimagenet_val_paths_stay_inside(tmp_path, entry):
    write_tinyimagenet(tmp_path / "t")
    root = tmp_path / "t" / "tiny-imagenet-200"
    w = sorted(TINY_WNIDS)[0]
    target = root / "train" / w / "images" / f"{w}_0.JPEG"  # a real image: old code read it
    ann = root / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[2] = entry.format(w=w, abs=target) + f"\t{w}\t0\t0\t15\t15"
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"val_annotations.txt:3: .* is not a file name inside"):
        open_dataset("tinyimagenet", tmp_path / "t", "val", download=False, quiet=True)


@pytest.mark.parametrize("wnid", ["../../../etc", "/abs", "a/b"])
def test_tinyimagenet_wnids_are_plain_names(tmp_path, wnid):
    write_tinyimagenet(tmp_path / "t")
    wnids = tmp_path / "t" / "tiny-imagenet-200" / "wnids.txt"
    wnids.write_text(wnids.read_text() + wnid + "\n")
    with pytest.raises(UsageError, match=r"wnids.txt:5: .* is not a wnid"):
        open_dataset("tinyimagenet", tmp_path / "t", "train", download=False, quiet=True)


def test_tinyimagenet_text_files_must_be_utf8(tmp_path):
    write_tinyimagenet(tmp_path / "t")
    ann = tmp_path / "t" / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_bytes(ann.read_bytes() + b"\xff\xfe\n")
    with pytest.raises(UsageError, match="val_annotations.txt: not UTF-8"):
        open_dataset("tinyimagenet", tmp_path / "t", "val", download=False, quiet=True)


# ----------------------------------------------------------------------------- 4: the cache


def test_cache_sees_an_in_place_edit_with_the_same_size_and_mtime(tmp_path):
    root = tmp_path / "f"
    for i in range(3):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / "a" / f"{i}.bmp")
    first = open_dataset("imagefolder", root, quiet=True)
    f = root / "a" / "1.bmp"
    st = f.stat()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(f)  # BMP: same size on disk
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    second = open_dataset("imagefolder", root, quiet=True)
    assert np.asarray(second.images)[1, 0, 0].tolist() == [0, 200, 0]
    assert np.asarray(first.images)[1, 0, 0].tolist() == [10, 0, 0]
    assert len(_cache_entries(tmp_path)) == 2


def test_cache_checks_the_decoded_bytes_against_the_key(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "f")

    def stale(files, max_pixels):  # as if a file changed between listing and decoding
        return [b"\0" * 16 for _ in files]

    monkeypatch.setattr(datasets, "_digests", stale)
    with pytest.raises(UsageError, match="changed while the data set was read"):
        open_dataset("imagefolder", tmp_path / "f", quiet=True)
