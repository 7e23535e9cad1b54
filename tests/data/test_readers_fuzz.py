"""Property-based fuzzing of every reader (issue 11): hostile layouts and contents (odd and
non-UTF-8 names, wrong types, truncated and corrupt files, empty and huge declared images,
symlinks and link loops, FIFOs). Only UsageError may escape, no case may hang, and whatever is
read satisfies the Dataset contract and reads back the same from the decoded cache.

Each reader runs 300 generated cases by default and 10,000 under ``-m slow``; each test prints
its counts (cases, read, clean errors). Every case gets its own data folder and its own
``PUREGEN_FAST_CACHE``.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import time
import zipfile
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from fixtures_data import CIFAR_CLASSES, Hang, no_hang, png_header_only
from helpers import budget_spent, skip_if_cut
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from puregen_fast.data.datasets import Dataset, open_dataset
from puregen_fast.errors import UsageError

DEFAULT_CASES = 300
SLOW_CASES = 10_000
HANG_S = 20.0  # a case still running after this is a hang (it normally takes milliseconds)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _settings(cases: int) -> settings:
    return settings(
        max_examples=cases,
        deadline=timedelta(seconds=10),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ----------------------------------------------------------------------------- contents


def _encode(fmt: str, size: tuple[int, int], mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    try:
        im.save(buf, fmt)
    except OSError:  # a mode the format cannot store
        buf = io.BytesIO()
        im.convert("RGB").save(buf, fmt)
    return buf.getvalue()


_FORMATS = st.sampled_from(["PNG", "PNG", "JPEG", "BMP", "GIF", "TIFF", "PPM"])
_MODES = st.sampled_from(["RGB", "RGB", "L", "P", "1"])
GOOD_IMAGE = st.builds(_encode, _FORMATS, st.just((2, 2)), _MODES, st.integers(0, 2**16))
_IMAGE = st.builds(
    _encode,
    _FORMATS,
    st.one_of(st.just((2, 2)), st.just((2, 2)), st.sampled_from([(1, 1), (3, 2), (2, 3)])),
    _MODES,
    st.integers(0, 2**16),
)
_HUGE_SIDE = st.sampled_from([0, 1, 2, 5000, 12000, 2**31 - 1])


def _cut(data: bytes, frac: float) -> bytes:
    return data[: int(len(data) * frac)]


def _flip(data: bytes, at: float, bit: int) -> bytes:
    if not data:
        return data
    i = int(at * (len(data) - 1))
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]


CONTENT = st.one_of(
    _IMAGE,
    _IMAGE,
    _IMAGE,
    st.builds(_cut, _IMAGE, st.floats(0, 1)),
    st.builds(_flip, _IMAGE, st.floats(0, 1), st.integers(0, 7)),
    st.builds(png_header_only, _HUGE_SIDE, _HUGE_SIDE),
    st.binary(max_size=48),
)

# ----------------------------------------------------------------------------- names, layouts

_PIECES = [b"a", b"b", b"Z", b"0", b".", b"-", b" ", b"\xff", b"\xc3\xa9", b"\x80", b"\n", b"~"]
STEM = (
    st.lists(st.sampled_from(_PIECES), min_size=1, max_size=4)
    .map(b"".join)
    .filter(lambda n: n not in (b".", b".."))
)
_IMG_EXT = st.sampled_from([b".png", b".PNG", b".jpg", b".JPEG", b".bmp", b".tif", b".webp"])
EXT = st.one_of(_IMG_EXT, _IMG_EXT, st.sampled_from([b".txt", b""]))
FILENAME = st.builds(lambda s, e: s + e, STEM, EXT)
_LINK_DIRS = [b"..", b".", b"../..", b"/", b"../../..", b"sub"]
_LINK_FILES = [b"../x.png", b"nowhere.png", b"/dev/null", b"/dev/zero", b"../../x.png"]

LEAF = st.one_of(
    st.tuples(st.just("file"), FILENAME, CONTENT),
    st.tuples(st.just("file"), FILENAME, CONTENT),
    st.tuples(st.just("file"), FILENAME, CONTENT),
    st.tuples(st.just("fifo"), FILENAME),
    st.tuples(st.just("link"), FILENAME, st.sampled_from(_LINK_FILES)),
    st.tuples(st.just("link"), STEM, st.sampled_from(_LINK_DIRS)),
)
CLEAN_LEAF = st.tuples(st.just("file"), st.builds(lambda s, e: s + e, STEM, _IMG_EXT), GOOD_IMAGE)


def _entries(leaf):
    return st.recursive(
        st.lists(leaf, max_size=3),
        lambda inner: st.lists(st.one_of(leaf, st.tuples(st.just("dir"), STEM, inner)), max_size=3),
        max_leaves=8,
    )


ENTRIES = _entries(LEAF)
CLEAN_ENTRIES = _entries(CLEAN_LEAF)


class Tree:
    """Writes generated entries under a folder (bytes paths: names need not be UTF-8) and
    remembers the FIFOs, so a hang can be released."""

    def __init__(self) -> None:
        self.fifos: list[bytes] = []

    def put(self, folder: bytes, entries) -> None:
        os.makedirs(folder, exist_ok=True)
        for e in entries:
            path = os.path.join(folder, e[1])
            if os.path.lexists(path):
                continue
            if e[0] == "file":
                with open(path, "wb") as f:
                    f.write(e[2])
            elif e[0] == "fifo":
                os.mkfifo(path)
                self.fifos.append(path)
            elif e[0] == "link":
                os.symlink(e[2], path)
            elif e[0] == "dir":
                self.put(path, e[2])

    def file(self, path: bytes, content: bytes | None) -> None:
        """``content`` at ``path``; None: a FIFO there."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            return
        if content is None:
            os.mkfifo(path)
            self.fifos.append(path)
        else:
            with open(path, "wb") as f:
                f.write(content)


# ----------------------------------------------------------------------------- the harness


def _check(ds: Dataset, limit: int | None, max_pixels: int | None) -> None:
    """The Dataset contract."""
    x, y = ds.images, ds.labels
    assert isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4
    n, h, w, c = x.shape
    assert n >= 1 and h >= 1 and w >= 1 and c == 3
    assert h * w <= (max_pixels or 4096 * 4096)
    assert y.dtype == np.int64 and y.shape == (n,) and len(ds) == n
    assert y.min() >= 0 and y.max() < len(ds.class_names)
    assert all(isinstance(s, str) for s in ds.class_names)
    assert limit is None or n <= limit
    assert ds.files is None or len(ds.files) == n
    ds.describe()


def _same(a: Dataset, b: Dataset) -> None:
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.class_names == b.class_names and a.files == b.files


class Harness:
    """Runs one reader on generated layouts and counts outcomes."""

    def __init__(self, reader: str, tmp_path, monkeypatch) -> None:
        self.reader, self.tmp, self.mp = reader, tmp_path, monkeypatch
        self.stats: Counter = Counter()
        self.t0 = time.perf_counter()

    def case(self, build, name: str, split: str, limit, max_pixels) -> None:
        """``build(base: bytes, tree) -> data_dir (bytes)``; open it, and open it again (the
        cache) when it reads."""
        base = tempfile.mkdtemp(dir=self.tmp).encode()
        self.mp.setenv("PUREGEN_FAST_CACHE", os.path.join(base, b"cache").decode())
        tree = Tree()
        self.stats["cases"] += 1
        try:
            data_dir = os.fsdecode(build(base + b"/data", tree))
            kw = dict(download=False, quiet=True, limit=limit, max_pixels=max_pixels)
            with no_hang(HANG_S, tree.fifos):
                try:
                    ds = open_dataset(name, data_dir, split, **kw)
                except UsageError as e:
                    self.stats["clean errors"] += 1
                    str(e).encode("utf-8")  # printable, whatever the file names
                    return
                _check(ds, limit, max_pixels)
                self.stats["read"] += 1
                _same(ds, open_dataset(name, data_dir, split, **kw))  # from the cache
                _same(ds, open_dataset(name, data_dir, split, **kw, cache=False))
        except Hang:
            self.stats["hangs"] += 1
            raise
        except Exception:
            self.stats["other exceptions"] += 1
            raise
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def report(self) -> None:
        s = self.stats
        print(
            f"\nfuzz {self.reader}: {s['cases']} cases, {s['read']} read, "
            f"{s['clean errors']} clean errors, {s['other exceptions']} other exceptions, "
            f"{s['hangs']} hangs, {time.perf_counter() - self.t0:.1f} s"
        )
        assert s["cases"] == s["read"] + s["clean errors"]


LIMIT = st.one_of(st.none(), st.none(), st.integers(1, 4))
MAX_PIXELS = st.one_of(st.none(), st.none(), st.none(), st.sampled_from([1, 2, 4, 6]))


def _one_of_clean(clean, hostile):
    """Well-formed layouts (odd names, every file a good image) a third of the time, so reads
    and the cache are exercised too; hostile ones otherwise."""
    return st.one_of(clean, hostile, hostile)


# ----------------------------------------------------------------------------- ImageFolder


def _imagefolder_layout(entries, top):
    return st.fixed_dictionaries(
        {
            "classes": st.lists(st.tuples(STEM, entries), max_size=3),
            "top": top,  # strays next to the class folders
            "split": st.sampled_from(["train", "val", ""]),
            "split_folder": st.booleans(),
            "limit": LIMIT,
            "max_pixels": MAX_PIXELS,
        }
    )


IMAGEFOLDER = _one_of_clean(
    _imagefolder_layout(CLEAN_ENTRIES, st.just([])),
    _imagefolder_layout(ENTRIES, st.lists(LEAF, max_size=2)),
)


def _imagefolder(h: Harness, layout: dict) -> None:
    def build(data: bytes, tree: Tree) -> bytes:
        root = os.path.join(data, layout["split"].encode()) if layout["split_folder"] else data
        os.makedirs(root, exist_ok=True)
        for cls, entries in layout["classes"]:
            tree.put(os.path.join(root, cls), entries)
        tree.put(root, layout["top"])
        return data

    h.case(build, "imagefolder", layout["split"], layout["limit"], layout["max_pixels"])


# ----------------------------------------------------------------------------- CINIC-10

_CINIC_NAME = st.builds(
    lambda p, n: p + n, st.sampled_from([b"cifar10-", b"n0", b""]), STEM
)  # fmt: skip
_CINIC_HOSTILE_LEAF = st.one_of(
    st.tuples(st.just("file"), st.builds(lambda n, e: n + e, _CINIC_NAME, EXT), CONTENT),
    LEAF,
)
_CINIC_CLEAN_LEAF = st.tuples(
    st.just("file"), st.builds(lambda n: n + b".png", _CINIC_NAME), GOOD_IMAGE
)


def _cinic_layout(leaf, missing, extra, split_is):
    return st.fixed_dictionaries(
        {
            "name": st.sampled_from(["cinic10", "cinic10-imagenet"]),
            "split": st.sampled_from(["train", "valid", "test"]),
            "missing": missing,
            "per_class": st.lists(st.lists(leaf, max_size=2), min_size=10, max_size=10),
            "extra": extra,
            "split_is": split_is,
            "limit": LIMIT,
            "max_pixels": MAX_PIXELS,
        }
    )


CINIC = _one_of_clean(
    _cinic_layout(_CINIC_CLEAN_LEAF, st.just(set()), st.just([]), st.just("dir")),
    _cinic_layout(
        _CINIC_HOSTILE_LEAF,
        st.one_of(st.just(set()), st.sets(st.sampled_from(CIFAR_CLASSES), max_size=2)),
        st.lists(st.tuples(STEM, st.lists(LEAF, max_size=2)), max_size=2),
        st.sampled_from(["dir", "dir", "dir", "file", "link-up"]),
    ),
)


def _cinic(h: Harness, layout: dict) -> None:
    def build(data: bytes, tree: Tree) -> bytes:
        for s in ("train", "valid", "test"):
            d = os.path.join(data, s.encode())
            if s == layout["split"] and layout["split_is"] != "dir":
                os.makedirs(data, exist_ok=True)
                if layout["split_is"] == "file":
                    tree.file(d, b"not a folder")
                else:
                    os.symlink(b"..", d)
                continue
            os.makedirs(d, exist_ok=True)
            if s != layout["split"]:
                continue
            for c, entries in zip(CIFAR_CLASSES, layout["per_class"]):
                if c not in layout["missing"]:
                    tree.put(os.path.join(d, c.encode()), entries)
            for name, entries in layout["extra"]:
                tree.put(os.path.join(d, name), entries)
        return data

    h.case(build, layout["name"], layout["split"], layout["limit"], layout["max_pixels"])


# ----------------------------------------------------------------------------- Tiny-ImageNet

_WNIDS = [b"n01", b"n02", b"n03"]
_BAD_WNIDS = [b"../x", b"/abs", b"a/b", b"", b" n01 ", b"\xff\xfe", b".", b"..", b"n0\x001"]
_VAL_NAMES = [
    b"val_0.JPEG",
    b"val_1.JPEG",
    b"val_0.JPEG",
    b"../wnids.txt",
    b"../../wnids.txt",
    b"/etc/hostname",
    b"..",
    b"missing.JPEG",
    b"a/b.JPEG",
    b"val_\xff.JPEG",
    b"",
]


def _val_line(name: bytes, wnid: bytes, rest: bytes) -> bytes:
    return name + b"\t" + wnid + rest


_VAL_LINE = st.one_of(
    st.builds(
        _val_line,
        st.sampled_from(_VAL_NAMES),
        st.sampled_from(_WNIDS + [b"n99", b""]),
        st.sampled_from([b"\t0\t0\t1\t1", b"", b"\t"]),
    ),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b),
)
_TINY_HOSTILE = st.fixed_dictionaries(
    {
        "split": st.sampled_from(["train", "val"]),
        "wnids": st.lists(
            st.one_of(st.sampled_from(_WNIDS), st.sampled_from(_BAD_WNIDS)), max_size=4
        ),
        "wnids_is": st.sampled_from(["file", "file", "file", "fifo"]),
        "train": st.lists(st.tuples(st.sampled_from(_WNIDS), ENTRIES), max_size=3),
        "val_images": st.lists(LEAF, max_size=3),
        "val_named": st.lists(st.tuples(st.sampled_from(_VAL_NAMES[:2]), CONTENT), max_size=2),
        "val_lines": st.lists(_VAL_LINE, max_size=4),
        "ann_is": st.sampled_from(["file", "file", "file", "fifo", "missing"]),
        "limit": LIMIT,
        "max_pixels": MAX_PIXELS,
    }
)


@st.composite
def _tiny_clean(draw) -> dict:
    wnids = draw(st.lists(st.sampled_from(_WNIDS), min_size=1, max_size=3, unique=True))
    jpeg = st.builds(lambda s, e: s + e, STEM, st.sampled_from([b".JPEG", b".jpg", b".jpeg"]))
    train = [(w, draw(st.lists(st.tuples(st.just("file"), jpeg, GOOD_IMAGE), max_size=2)))
             for w in wnids]  # fmt: skip
    names = draw(st.lists(st.builds(lambda s: s + b".JPEG", STEM), max_size=3, unique=True))
    lines = [_val_line(n, draw(st.sampled_from(wnids)), b"\t0\t0\t1\t1") for n in names]
    return {
        "split": draw(st.sampled_from(["train", "val"])),
        "wnids": wnids,
        "wnids_is": "file",
        "train": train,
        "val_images": [("file", n, draw(GOOD_IMAGE)) for n in names],
        "val_named": [],
        "val_lines": lines,
        "ann_is": "file",
        "limit": draw(LIMIT),
        "max_pixels": draw(MAX_PIXELS),
    }


TINY = _one_of_clean(_tiny_clean(), _TINY_HOSTILE)


def _tiny(h: Harness, layout: dict) -> None:
    def build(data: bytes, tree: Tree) -> bytes:
        root = os.path.join(data, b"tiny-imagenet-200")
        os.makedirs(os.path.join(root, b"train"), exist_ok=True)
        wn = os.path.join(root, b"wnids.txt")
        if layout["wnids_is"] == "fifo":
            tree.file(wn, None)
        else:
            tree.file(wn, b"\n".join(layout["wnids"]) + b"\n")
        for w, entries in layout["train"]:
            tree.put(os.path.join(root, b"train", w, b"images"), entries)
        val = os.path.join(root, b"val")
        tree.put(os.path.join(val, b"images"), layout["val_images"])
        for name, content in layout["val_named"]:
            tree.file(os.path.join(val, b"images", name), content)
        ann = os.path.join(val, b"val_annotations.txt")
        if layout["ann_is"] == "fifo":
            tree.file(ann, None)
        elif layout["ann_is"] == "file":
            tree.file(ann, b"\n".join(layout["val_lines"]) + b"\n")
        return data

    h.case(build, "tinyimagenet", layout["split"], layout["limit"], layout["max_pixels"])


# ----------------------------------------------------------------------------- CIFAR-10

_NP_ANY = st.builds(
    lambda dt, shape: np.zeros(shape, dtype=dt),
    st.sampled_from(["u1", "i8", "f4", "?", "U2", "u2"]),
    st.sampled_from([(0,), (3,), (1, 3072), (2, 3072), (2, 3, 32, 32), (3072,), (2, 100)]),
)
_ODD = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.binary(max_size=4),
    st.booleans(),
    st.lists(st.integers(-2, 12), max_size=3),
    st.lists(
        st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.none(), st.text()), max_size=3
    ),
    st.dictionaries(st.binary(max_size=3), st.integers(), max_size=2),
    _NP_ANY,
)


def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {b"batch_label": b"x", b"labels": rng.integers(0, 10, n).tolist(), b"data": data}


_GOOD_BATCH = st.builds(_batch, st.integers(0, 3), st.integers(0, 99))
_BATCH_OBJ = st.one_of(
    st.builds(  # one value replaced by an odd one
        lambda b, k, v: {**b, k: v},
        st.builds(_batch, st.integers(1, 3), st.integers(0, 99)),
        st.sampled_from([b"labels", b"data", "labels", "data", b"\xffdata"]),
        _ODD,
    ),
    st.builds(  # a key dropped
        lambda b, k: {kk: v for kk, v in b.items() if kk != k},
        st.builds(_batch, st.integers(1, 3), st.integers(0, 99)),
        st.sampled_from([b"labels", b"data"]),
    ),
    _ODD,
)


def _pickle(obj, protocol: int) -> bytes:
    try:
        return pickle.dumps(obj, protocol=protocol)
    except Exception:
        return b"\x80\x02N."


_PROTOCOLS = st.sampled_from([0, 1, 2, 2, 2, 3, 4])
_GOOD_BATCH_FILE = st.builds(_pickle, _GOOD_BATCH, _PROTOCOLS)
_BATCH_FILE = st.one_of(
    st.builds(_pickle, _BATCH_OBJ, st.sampled_from([0, 1, 2, 2, 2, 4, 5])),
    st.builds(_cut, _GOOD_BATCH_FILE, st.floats(0, 1)),
    st.builds(_flip, _GOOD_BATCH_FILE, st.floats(0, 1), st.integers(0, 7)),
    st.binary(max_size=32),
    st.sampled_from([b"K\x01}b.", b"h\x05.", b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00zz\x85R."]),
    st.none(),  # a FIFO
    st.sampled_from(["dir", "dangling", "missing"]),
)
_GOOD_META = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
_META_FILE = st.one_of(
    st.builds(_pickle, st.just(_GOOD_META), _PROTOCOLS),
    st.builds(_pickle, st.just(_GOOD_META), _PROTOCOLS),
    st.builds(_pickle, st.builds(lambda v: {b"label_names": v}, _ODD), st.just(2)),
    st.builds(_pickle, st.builds(lambda v: {b"label_names": [v] * 10}, _ODD), st.just(2)),
    st.builds(_pickle, _ODD, st.just(2)),
    st.binary(max_size=16),
)


def _cifar_layout(meta, batch):
    return st.fixed_dictionaries(
        {
            "split": st.sampled_from(["train", "test", "test"]),
            "meta": meta,
            "batches": st.lists(batch, min_size=6, max_size=6),
            "limit": LIMIT,
        }
    )


CIFAR = _one_of_clean(
    _cifar_layout(st.builds(_pickle, st.just(_GOOD_META), _PROTOCOLS), _GOOD_BATCH_FILE),
    _cifar_layout(
        _META_FILE,
        st.one_of(_GOOD_BATCH_FILE, _GOOD_BATCH_FILE, _GOOD_BATCH_FILE, _BATCH_FILE),
    ),
)


def _cifar(h: Harness, layout: dict) -> None:
    def build(data: bytes, tree: Tree) -> bytes:
        d = os.path.join(data, b"cifar-10-batches-py")
        tree.file(os.path.join(d, b"batches.meta"), layout["meta"])
        names = [f"data_batch_{i}".encode() for i in range(1, 6)] + [b"test_batch"]
        for name, content in zip(names, layout["batches"]):
            path = os.path.join(d, name)
            if content == "dir":
                os.makedirs(path)
            elif content == "dangling":
                os.symlink(b"nowhere", path)
            elif content != "missing":
                tree.file(path, content)
        return data

    h.case(build, "cifar10", layout["split"], layout["limit"], None)


# ----------------------------------------------------------------------------- npz


def _arr(dtype: str, shape: tuple[int, ...], fill: int) -> np.ndarray:
    if dtype == "O":
        a = np.empty(shape, dtype=object)
        a.fill(fill)
        return a
    if dtype.startswith("U") or dtype.startswith("S"):
        return np.full(shape, str(fill), dtype=dtype)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        fill = min(max(fill, info.min), info.max)
    return np.full(shape, fill, dtype=dtype)


_X = st.builds(
    _arr,
    st.sampled_from(["u1", "i2", "f4", "?", "O", "U1"]),
    st.lists(st.integers(0, 3), max_size=5).map(tuple),
    st.integers(0, 255),
)
_LABEL = st.one_of(
    st.integers(0, 3), st.integers(-5, 2**62), st.sampled_from([2**40, 99_999, 100_000, -1])
)
_Y = st.builds(
    _arr,
    st.sampled_from(["i1", "u1", "i4", "u8", "i8", "f8", "?", "O", "U2"]),
    st.lists(st.integers(0, 3), max_size=2).map(tuple),
    _LABEL,
)
_CLASSES = st.builds(
    _arr,
    st.sampled_from(["U3", "S3", "i4", "O", "f4"]),
    st.lists(st.integers(0, 4), max_size=2).map(tuple),
    st.integers(0, 9),
)


def _npz_bytes(x, y, classes, compressed: bool) -> bytes:
    arrays = {k: v for k, v in (("x", x), ("y", y), ("classes", classes)) if v is not None}
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


@st.composite
def _npz_arrays(draw, odd: bool) -> bytes:
    """A well-formed npz; with ``odd``, one of its arrays swapped for an odd one."""
    side = st.sampled_from([1, 2, 3, 1, 2, 3, 0])
    n, h, w = draw(side), draw(side), draw(side)
    x = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, (n, h, w, 3), np.uint8)
    label = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), _LABEL)
    y = np.array(draw(st.lists(label, min_size=n, max_size=n)), dtype=np.int64)
    y = y.astype(draw(st.sampled_from(["i8", "i4", "u1", "i2", "u8"])))
    classes = None
    if draw(st.booleans()):
        k = draw(st.sampled_from([4, 5, 4, 3, 0]))
        classes = np.array([f"c{i}" for i in range(k)], draw(st.sampled_from(["U3", "S3"])))
    part = draw(st.sampled_from(["x", "y", "classes"])) if odd else ""
    if part == "x":
        x = draw(_X)
    elif part == "y":
        y = draw(_Y)
    elif part == "classes":
        classes = draw(_CLASSES)
    return _npz_bytes(x, y, classes, draw(st.booleans()))


def _lying(shape, descr: str) -> bytes:
    """An npz whose x.npy header declares ``shape`` over a few bytes."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    y = io.BytesIO()
    np.save(y, np.zeros(2, np.int64))
    with io.BytesIO() as out:
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("x.npy", head.getvalue() + bytes(48))
            zf.writestr("y.npy", y.getvalue())
        return out.getvalue()


def _raw_members(x: bytes, y: bytes) -> bytes:
    with io.BytesIO() as out:
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("x", x)
            zf.writestr("y.npy", y)
        return out.getvalue()


_NPZ_HOSTILE = st.one_of(
    _npz_arrays(odd=True),
    st.builds(_cut, _npz_arrays(odd=False), st.floats(0, 1)),
    st.builds(_flip, _npz_arrays(odd=False), st.floats(0, 1), st.integers(0, 7)),
    st.builds(
        _lying,
        st.sampled_from([(2**40, 4, 4, 3), (2, 2**31, 2**31, 3), (2, 2, 2, 3), (2, 1, 1, 3)]),
        st.sampled_from(["|u1", "<i8", "|O"]),
    ),
    st.builds(_raw_members, st.binary(max_size=16), st.binary(max_size=16)),
    st.binary(max_size=64),
)
NPZ = st.fixed_dictionaries(
    {
        "file": st.one_of(_npz_arrays(odd=False), _npz_arrays(odd=False), _NPZ_HOSTILE),
        "path_is": st.sampled_from(["file"] * 6 + ["dir", "fifo", "dangling", "none"]),
        "limit": LIMIT,
        "max_pixels": MAX_PIXELS,
    }
)


def _npz(h: Harness, layout: dict) -> None:
    def build(data: bytes, tree: Tree) -> bytes:
        os.makedirs(data)
        kind = layout["path_is"]
        path = os.path.join(data, b"train.npz" if kind == "dir" else b"d.npz")
        if kind in ("file", "dir"):
            tree.file(path, layout["file"])
        elif kind == "fifo":
            tree.file(path, None)
        elif kind == "dangling":
            os.symlink(b"nowhere.npz", path)
        return data if kind == "dir" else path

    h.case(build, "npz", "train", layout["limit"], layout["max_pixels"])


# ----------------------------------------------------------------------------- the tests

_READERS = {
    "npz": (NPZ, _npz),
    "imagefolder": (IMAGEFOLDER, _imagefolder),
    "cifar10": (CIFAR, _cifar),
    "cinic10": (CINIC, _cinic),
    "tinyimagenet": (TINY, _tiny),
}


def _fuzz(reader: str, cases: int, tmp_path, monkeypatch) -> None:
    strategy, run = _READERS[reader]
    harness = Harness(reader, tmp_path, monkeypatch)

    @_settings(cases)
    @given(layout=strategy)
    def one(layout):
        if not budget_spent():
            run(harness, layout)

    one()
    harness.report()
    skip_if_cut(f"{reader} reader fuzz", harness.stats["cases"], cases)


@pytest.mark.parametrize("reader", sorted(_READERS))
def test_fuzz_reader(reader, tmp_path, monkeypatch):
    _fuzz(reader, DEFAULT_CASES, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(_READERS))
def test_fuzz_reader_slow(reader, tmp_path, monkeypatch):
    _fuzz(reader, SLOW_CASES, tmp_path, monkeypatch)
