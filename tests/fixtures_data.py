"""Tiny data sets in the real on-disk formats, for the reader, download and purify tests.

Every builder writes under a folder the test owns and returns what a correct reader must give
back (images uint8 NHWC, labels int64, class names), so tests compare against it directly.
PNG is lossless, so expected PNG images are the arrays written; JPEG is lossy, so expected JPEG
images are what Pillow decodes from the written files.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from puregen_fast.data.datasets import CIFAR10_CLASSES

CIFAR_CLASSES = list(CIFAR10_CLASSES)  # test_datasets pins the published order


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _smooth_images(rng: np.random.Generator, n: int, h: int = 32, w: int = 32) -> np.ndarray:
    """Natural-ish images (smooth gradients plus a little noise), uint8 NHWC."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(-3, 3, size=3)
        base = 128 + 60 * np.sin(a * xx / w + b * yy / h + c)
        chans = [base + rng.uniform(-40, 40) for _ in range(3)]
        img = np.stack(chans, -1) + rng.normal(0, 8, size=(h, w, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _save(img: np.ndarray, path: Path, fmt: str, mode: str = "RGB") -> np.ndarray:
    """Write ``img`` and return what a reader decodes (RGB) from the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(img)
    if mode == "L":
        im = im.convert("L")
    im.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    with Image.open(path) as back:
        return np.asarray(back.convert("RGB"))


# ----------------------------------------------------------------------------- CIFAR-10


def write_cifar10(root: Path, n_per_batch: int = 4, n_test: int = 5, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py`` as the official python tarball holds it: pickled dicts (keys
    as bytes, as Python 2 wrote them and ``encoding='bytes'`` reads them) with planar uint8
    ``data`` (N, 3072) and ``labels`` lists; ``batches.meta`` with ``label_names``."""
    rng = _rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    expected: dict = {"class_names": list(CIFAR_CLASSES)}
    train_x, train_y = [], []
    batches = [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in batches:
        x = _smooth_images(rng, n)
        y = rng.integers(0, 10, size=n).tolist()
        planar = x.transpose(0, 3, 1, 2).reshape(n, 3072)
        obj = {
            b"batch_label": name.encode(),
            b"labels": y,
            b"data": planar,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
        if name == "test_batch":
            expected["test"] = (x, np.asarray(y, np.int64))
        else:
            train_x.append(x)
            train_y.append(np.asarray(y, np.int64))
    expected["train"] = (np.concatenate(train_x), np.concatenate(train_y))
    meta = {
        b"num_cases_per_batch": n_per_batch,
        b"label_names": [c.encode() for c in CIFAR_CLASSES],
        b"num_vis": 3072,
    }
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (d / "readme.html").write_text("<html>fixture</html>")
    return expected


def _archive(tmp: Path, name: str, write, top: list[str], **kw) -> tuple[Path, dict]:
    """``tmp/name`` (a zip if the name says so, else a tar.gz) holding the folders ``top`` that
    ``write(src, **kw)`` made, at the archive's top level; and what ``write`` returned."""
    src = tmp / f"{name}-src"
    expected = write(src, **kw)
    path = tmp / name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            for t in top:
                for p in sorted((src / t).rglob("*")):
                    zf.write(p, p.relative_to(src).as_posix())
    else:
        with tarfile.open(path, "w:gz") as tf:
            for t in top:
                tf.add(src / t, arcname=t)
    return path, expected


def make_cifar10_tarball(tmp: Path, **kw) -> tuple[Path, dict]:
    """``cifar-10-python.tar.gz`` (top-level ``cifar-10-batches-py/``) and its expected data."""
    return _archive(tmp, "cifar-10-python.tar.gz", write_cifar10, ["cifar-10-batches-py"], **kw)


# ----------------------------------------------------------------------------- CINIC-10


def write_cinic10(root: Path, n_cifar: int = 1, n_imagenet: int = 2, seed: int = 0) -> dict:
    """``root/{train,valid,test}/<class>/*.png`` as CINIC-10 lays it out, with CIFAR-derived
    files (``cifar10-<split>-<k>.png``) and ImageNet-derived ones (``n<wnid>_<k>.png``, one of
    them grayscale, as some CINIC-10 files are). Returns expected arrays per split, in the
    reader's order (class by class, file names sorted), for ``cinic10`` and
    ``cinic10-imagenet``."""
    rng = _rng(seed)
    expected: dict = {"class_names": list(CIFAR_CLASSES)}
    for split in ("train", "valid", "test"):
        items: list[tuple[int, str, np.ndarray]] = []
        for ci, c in enumerate(CIFAR_CLASSES):
            names = [f"cifar10-{split}-{rng.integers(0, 50000)}-{k}.png" for k in range(n_cifar)]
            names += [
                f"n0{1000000 + 7 * ci + k}_{rng.integers(0, 9999)}.png" for k in range(n_imagenet)
            ]
            imgs = _smooth_images(rng, len(names))
            for k, (nm, img) in enumerate(zip(names, imgs)):
                mode = "L" if (ci == 3 and k == len(names) - 1) else "RGB"
                got = _save(img, root / split / c / nm, "PNG", mode)
                items.append((ci, nm, got))
        # reader order: class by class, names sorted
        items.sort(key=lambda t: (t[0], t[1]))
        x = np.stack([t[2] for t in items])
        y = np.asarray([t[0] for t in items], np.int64)
        keep = np.asarray([not t[1].startswith("cifar10-") for t in items])
        expected[split] = (x, y)
        expected[f"{split}-imagenet"] = (x[keep], y[keep])
        expected[f"{split}-files"] = [f"{split}/{CIFAR_CLASSES[t[0]]}/{t[1]}" for t in items]
    return expected


def make_cinic10_tarball(tmp: Path, **kw) -> tuple[Path, dict]:
    """``CINIC-10.tar.gz`` with ``train/ valid/ test/`` at its top level, as published."""
    return _archive(tmp, "CINIC-10.tar.gz", write_cinic10, ["train", "valid", "test"], **kw)


# ----------------------------------------------------------------------------- Tiny-ImageNet

TINY_WNIDS = ["n09999999", "n01443537", "n02124075", "n01629819"]  # wnids.txt is unsorted


def write_tinyimagenet(
    root: Path, n_train: int = 3, n_val: int = 6, size: int = 16, seed: int = 0
) -> dict:
    """``root/tiny-imagenet-200`` laid out as the official zip: ``wnids.txt``, ``words.txt``,
    ``train/<wnid>/images/<wnid>_<k>.JPEG`` (+ ``<wnid>_boxes.txt``), ``val/images/val_<k>.JPEG``
    with ``val/val_annotations.txt``. Images are ``size`` x ``size`` (64 in the real set)."""
    rng = _rng(seed)
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in TINY_WNIDS))
    classes = sorted(TINY_WNIDS)
    xs, ys = [], []
    for ci, w in enumerate(classes):
        imgs = _smooth_images(rng, n_train, size, size)
        boxes = []
        for k in range(n_train):
            mode = "L" if (ci == 1 and k == 0) else "RGB"
            xs.append(_save(imgs[k], d / "train" / w / "images" / f"{w}_{k}.JPEG", "JPEG", mode))
            ys.append(ci)
            boxes.append(f"{w}_{k}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
        (d / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    expected: dict = {"class_names": classes, "train": (np.stack(xs), np.asarray(ys, np.int64))}
    vx, vy, lines = [], [], []
    imgs = _smooth_images(rng, n_val, size, size)
    for k in range(n_val):
        w = TINY_WNIDS[int(rng.integers(0, len(TINY_WNIDS)))]
        name = f"val_{k}.JPEG"
        vx.append(_save(imgs[k], d / "val" / "images" / name, "JPEG"))
        vy.append(classes.index(w))
        lines.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}\n")
    (d / "val" / "val_annotations.txt").write_text("".join(lines))
    (d / "test" / "images").mkdir(parents=True)
    _save(imgs[0], d / "test" / "images" / "test_0.JPEG", "JPEG")
    expected["val"] = (np.stack(vx), np.asarray(vy, np.int64))
    return expected


def make_tinyimagenet_zip(tmp: Path, **kw) -> tuple[Path, dict]:
    """``tiny-imagenet-200.zip`` (top-level ``tiny-imagenet-200/``) and its expected data."""
    return _archive(tmp, "tiny-imagenet-200.zip", write_tinyimagenet, ["tiny-imagenet-200"], **kw)


# ----------------------------------------------------------------------------- ImageFolder, npz


def write_imagefolder(
    root: Path, classes=("cat", "Dog", "bird"), n: int = 2, seed: int = 0
) -> dict:
    """``root/<class>/...`` with PNG, BMP and JPEG files, a nested folder and a non-image file;
    expected in torchvision ``ImageFolder`` order (classes sorted, files walked sorted)."""
    rng = _rng(seed)
    order = sorted(classes)
    items = []
    for c in classes:
        imgs = _smooth_images(rng, n + 1)
        for k in range(n):
            fmt, ext = [("PNG", "png"), ("BMP", "bmp")][k % 2]
            got = _save(imgs[k], root / c / f"img{k}.{ext}", fmt)
            items.append((order.index(c), f"{c}/img{k}.{ext}", got))
        got = _save(imgs[n], root / c / "sub" / "deep.jpg", "JPEG")
        items.append((order.index(c), f"{c}/sub/deep.jpg", got))
        (root / c / "notes.txt").write_text("not an image")
    items.sort(key=lambda t: (t[0], t[1]))
    return {
        "class_names": order,
        "x": np.stack([t[2] for t in items]),
        "y": np.asarray([t[0] for t in items], np.int64),
    }


def write_npz(path: Path, n: int = 12, k: int = 12, classes: bool = False, seed: int = 0) -> dict:
    rng = _rng(seed)
    x = _smooth_images(rng, n)
    y = (np.arange(n) % k).astype(np.int32)
    arrays = {"x": x, "y": y}
    if classes:
        arrays["classes"] = np.asarray([f"c{i}" for i in range(k)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return {"x": x, "y": y.astype(np.int64)}


# ----------------------------------------------------------------------------- hostile archives


def make_evil_tar(path: Path, kind: str = "dotdot") -> Path:
    """A tar.gz with one harmless member and one that escapes: ``dotdot`` (``../evil.txt``),
    ``absolute`` (``/tmp/...``) or ``symlink`` (a link pointing outside)."""
    with tarfile.open(path, "w:gz") as tf:
        good = b"fine"
        ti = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        ti.size = len(good)
        tf.addfile(ti, io.BytesIO(good))
        if kind == "symlink":
            ti = tarfile.TarInfo("cifar-10-batches-py/link")
            ti.type = tarfile.SYMTYPE
            ti.linkname = "../../../../etc"
            tf.addfile(ti)
        else:
            name = "../evil.txt" if kind == "dotdot" else "/tmp/puregen-evil-absolute.txt"
            data = b"escaped"
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def make_evil_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n01443537\n")
        zf.writestr("../evil.txt", "escaped")
    return path


# ----------------------------------------------------------------------------- hostile files


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB, with almost no pixel data:
    decoding it would cost ``width * height * 3`` bytes before failing as truncated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def release_fifos(fifos: Sequence[str | bytes | os.PathLike]) -> None:
    """Open each FIFO's write end and close it: a reader blocked opening it gets end-of-file."""
    for f in fifos:
        try:
            os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting (ENXIO), or gone
            pass


class Hang(BaseException):
    """A case ran past its time. Not an Exception (nor an OSError, as TimeoutError is), so no
    ``except OSError`` or ``except Exception`` in the code under test can swallow it."""


@contextlib.contextmanager
def no_hang(seconds: float, fifos: Sequence[str | bytes | os.PathLike] = ()) -> Iterator[None]:
    """Fail with `Hang` instead of hanging: after ``seconds`` the blocked readers of ``fifos``
    are released and `Hang` is raised in the main thread (SIGALRM)."""

    def on_alarm(signum, frame):
        release_fifos(fifos)
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
