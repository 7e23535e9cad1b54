"""Data set readers (DESIGN 5): uint8 NHWC images, int64 labels, the canonical class order.

``open_dataset(name, data_dir, split)`` returns a :class:`Dataset`. Image order and class order
are fixed, so a global index names the same image in every run (the noise is keyed by it):

* ``cifar10``: the python pickle batches (``cifar-10-batches-py``); ``train`` is
  ``data_batch_1..5`` in order, ``test`` is ``test_batch``; classes from ``batches.meta``
  (airplane, automobile, ..., truck).
* ``cinic10``: ``train|valid|test/<class>/*.png``; classes in CINIC-10's (= CIFAR-10's) order;
  images class by class, file names sorted within a class (torchvision ``ImageFolder`` order).
* ``cinic10-imagenet``: the same, keeping only files whose name does not start with
  ``cifar10-`` (the ImageNet part of CINIC-10, on which the paper trains its generative models).
* ``tinyimagenet``: ``tiny-imagenet-200``; classes are the wnids of ``wnids.txt`` sorted (the
  order ``ImageFolder`` gives on ``train/``); ``train`` is ``train/<wnid>/images/*.JPEG`` class by
  class, names sorted; ``val`` is ``val/images`` in the order of ``val_annotations.txt``, whose
  file names must be plain names inside ``val/images`` (no folders, no ``..``).
* ``imagefolder``: ``--data-dir ROOT`` (``ROOT/<split>`` when that folder exists): class folders
  sorted, files found as torchvision's ``ImageFolder`` finds them (recursive, sorted, same
  extensions), so labels match ``ImageFolder``'s. A folder link that leads back to a folder
  already walked for the class, or to ``ROOT`` or above, is skipped with a warning (a class
  folder that does is kept as an empty class), so link loops cannot make the walk endless.
* ``npz``: ``--data-dir FILE.npz`` (or a folder holding ``<split>.npz``) with uint8 NHWC ``x``
  and integer ``y``; class names from an optional ``classes`` array (labels must be below its
  length), else ``0..K-1`` with ``K = max(y) + 1`` at most ``MAX_CLASSES``.

Every image is converted to RGB (grayscale and palette files occur in CINIC-10 and Tiny-ImageNet)
and must have the size of the first; no resizing. An image with more than ``max_pixels`` pixels
(default ``MAX_PIXELS``, 4096 x 4096) is refused from its header, before it is decoded. Entries
that are not regular files (FIFOs, sockets, devices) are skipped with a warning on stderr; a
broken link or an unreadable file is an error naming it. ``limit`` keeps the first ``limit``
images of the order above: only those are listed, read, decoded and cached.

Decoded image files are cached once as uint8 ``.npy`` under ``<cache>/decoded/`` and
memory-mapped on later runs, so they are not decoded again. The cache key covers the data set,
split and source folder and, per file, its path, size and a BLAKE2b digest of its bytes: every
file is read and hashed on every run (cheap next to decoding), so a file edited in place is
decoded again whatever its size and modification time. The bytes decoded are checked against the
digest the key was built from. Nothing else is trusted; the cache entry itself is trusted once
complete (delete ``<cache>/decoded`` to drop it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import stat
import sys
import tempfile
import threading
import tokenize
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from puregen_fast.data.download import COMPLETE_MARKER, cache_root, ensure_extracted
from puregen_fast.data.io import fsync_dir
from puregen_fast.data.pickle_scan import Budget, scan_pickle
from puregen_fast.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DATASETS",
    "SPLITS",
    "CIFAR10_CLASSES",
    "IMG_EXTENSIONS",
    "MAX_CLASSES",
    "MAX_PIXELS",
    "Dataset",
    "open_dataset",
    "open_pil",
    "default_test_split",
    "decode_images",
]

DATASETS = ("cifar10", "cinic10", "cinic10-imagenet", "tinyimagenet", "imagefolder", "npz")
SPLITS: dict[str, tuple[str, ...]] = {
    "cifar10": ("train", "test"),
    "cinic10": ("train", "valid", "test"),
    "cinic10-imagenet": ("train", "valid", "test"),
    "tinyimagenet": ("train", "val"),
}


def default_test_split(dataset: str) -> str:
    """The split a victim is tested on when none is named: the data set's last split
    (tinyimagenet: val, whose labels are published; the others: test)."""
    return SPLITS.get(dataset, ("test",))[-1]


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# An npz without a 'classes' array may use labels 0..MAX_CLASSES-1 (one name is made per class).
MAX_CLASSES = 100_000
# Pixels per image unless the caller raises it (``max_pixels``). Pillow's error at twice its
# own limit (PIL.Image.MAX_IMAGE_PIXELS) still applies above it; its warning does not (open_pil).
MAX_PIXELS = 4096 * 4096
_DECODED_VERSION = 2
_TEXT_CAP = 64 << 20  # wnids.txt, val_annotations.txt
_PICKLE_CAP = 2 << 30  # one CIFAR batch (the real ones are 31 MB)
_PICKLE_BUDGET = Budget(nbytes=_PICKLE_CAP)  # pickle_scan's depth and item limits
_NPY_SMALL_CAP = 64 << 20  # an npz's 'classes' array
NPY_MAX_HEADER_BYTES = 10_000  # numpy's own limit on a .npy header, checked before it is read
_CHUNK = 1 << 20


@dataclass
class Dataset:
    """A data set in memory or memory-mapped: ``images`` (N, H, W, 3) uint8, ``labels`` (N,)
    int64, ``class_names`` in label order."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str
    files: list[str] | None = field(default=None, repr=False)  # per-image source file, if any

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    # what an output folder takes from its input: the content hash of the selection, and, for
    # inputs that come in shards of their own, those shards (None: cut by --shard-size)
    @property
    def keys(self) -> list[str] | None:
        """The input's own sample keys, kept by output formats that have keys."""
        return None

    def images_sha256(self, n: int, chunk_bytes: int = 64 << 20) -> str:
        """sha256 of the bytes of ``images[:n]`` (C order), read in chunks of about
        ``chunk_bytes`` so a memory-mapped data set is never loaded whole."""
        images = self.images
        h = hashlib.sha256()
        per_image = int(np.prod(images.shape[1:], dtype=np.int64))
        row = max(1, per_image * np.dtype(images.dtype).itemsize)
        step = max(1, chunk_bytes // row)
        for s in range(0, n, step):
            h.update(np.ascontiguousarray(images[s : min(s + step, n)]).tobytes())
        return h.hexdigest()

    def shard_ranges(self, n: int) -> list[tuple[int, int]] | None:
        """The input's own shards among the first ``n`` images as [start, stop) ranges."""
        return None

    def shard_records(self) -> list[dict] | None:
        """The input's own shards (path, image count), recorded in the configuration."""
        return None

    def describe(self) -> dict:
        n, h, w, c = self.images.shape
        return {
            "name": self.name,
            "split": self.split,
            "source": self.source,
            "num_images": int(n),
            "image_shape": [int(h), int(w), int(c)],
            "class_names": list(self.class_names),
        }


# ----------------------------------------------------------------------------- helpers


def _show(path) -> str:
    """``path`` printable: bytes that are not UTF-8 in a file name shown as ``\\xNN``."""
    if path is None:
        return "the data folder"
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _warn(message: str) -> None:
    print(f"puregen-fast: warning: {message}", file=sys.stderr)


def _max_file_bytes(max_pixels: int) -> int:
    # no image format needs more than 8 bytes a pixel (16-bit RGBA, uncompressed) plus metadata:
    # a bigger file (a sparse one, say) is refused before it is read
    return 8 * max_pixels + (16 << 20)


def _regular(path: Path) -> os.stat_result | None:
    """The stat of a listed entry that is a regular file (links followed); None, with a warning,
    for a FIFO, socket, device or folder, which is skipped (opening a FIFO blocks). A broken link
    or an entry that cannot be inspected is an error naming it."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        what = "a broken symbolic link" if os.path.islink(path) else "gone while listing"
        raise UsageError(f"{_show(path)}: {what}; fix or delete it and run again") from e
    except OSError as e:  # ELOOP (a link to itself), EACCES, ...
        raise UsageError(f"cannot read {_show(path)}: {e.strerror}; fix or delete it") from e
    if stat.S_ISREG(st.st_mode):
        return st
    _warn(f"skipping {_show(path)}: not a regular file")
    return None


def _read_regular(path: Path, cap: int, what: str = "file") -> bytes:
    """All bytes of regular file ``path`` (at most ``cap``). Opened non-blocking, so a FIFO put in
    place of a file cannot hang the read; it is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        broken = os.path.islink(path)
        raise UsageError(
            f"{what} {_show(path)}: " + ("a broken symbolic link" if broken else "missing")
        ) from e
    except OSError as e:
        raise UsageError(f"cannot read {what} {_show(path)}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {_show(path)} is not a regular file; replace it")
        if st.st_size > cap:
            raise UsageError(
                f"{what} {_show(path)} is {st.st_size} bytes, more than the {cap} this reader "
                "accepts; replace it"
            )
        parts, total = [], 0
        while True:  # to the end, which may not be st_size if the file changes meanwhile
            b = os.read(fd, max(st.st_size - total, 0) + 1 if total < st.st_size else _CHUNK)
            if not b:
                break
            parts.append(b)
            total += len(b)
            if total > cap:
                raise UsageError(f"{what} {_show(path)} grew while being read; run again")
    except OSError as e:
        raise UsageError(f"cannot read {what} {_show(path)}: {e.strerror}") from e
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_text(path: Path) -> str:
    data = _read_regular(path, _TEXT_CAP)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{_show(path)}: not UTF-8 text (byte {e.start}); replace it") from e


def _plain_name(name: str) -> bool:
    """A single path component: no folders, no ``..``, not absolute."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _search(base: Path, check, depth: int = 2) -> Path | None:
    """The first folder at or below ``base`` (up to ``depth`` levels, sorted) passing ``check``."""
    level = [base]
    for _ in range(depth + 1):
        nxt: list[Path] = []
        for d in level:
            if check(d):
                return d
            try:
                nxt.extend(
                    sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
                )
            except OSError:
                continue
        level = nxt
    return None


def _locate(name: str, archive: str, data_dir, check, download: bool, quiet: bool) -> Path:
    """The data set's root folder: found under ``data_dir`` as the user extracted it, else the
    official archive fetched and extracted into the data directory (``ensure_extracted``)."""
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        if base.is_dir():
            found = _search(base, check)
            if found is not None:
                return found
    extracted = ensure_extracted(archive, data_dir, download=download, quiet=quiet)
    found = _search(extracted, check)
    if found is None:
        raise UsageError(
            f"{extracted}: the extracted archive does not have the expected layout for '{name}'; "
            f"delete the folder and run again"
        )
    return found


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS[name]:
        raise UsageError(
            f"--split {split!r} is not a split of {name}; choose one of {', '.join(SPLITS[name])}"
        )


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _file_digest(path: Path, max_pixels: int) -> bytes:
    return _digest(_read_regular(path, _max_file_bytes(max_pixels), "image"))


def _too_big(path, w: int, h: int, max_pixels: int) -> UsageError:
    return UsageError(
        f"image {_show(path)} is {w}x{h} = {w * h} pixels, more than the {max_pixels} allowed; "
        "raise the limit (--max-image-pixels) if it is meant to be that big"
    )


# warnings.catch_warnings swaps the process's filter list: decode threads doing it at once could
# restore each other's copy and leave the filter installed; the header parse it guards is cheap
_PIL_OPEN = threading.Lock()


def open_pil(data: bytes, formats: Sequence[str] | None = None) -> Image.Image:
    """``PIL.Image.open`` of ``data`` (header only) without Pillow's DecompressionBombWarning.

    Every caller checks the header's size against its own cap (``max_pixels``) right after, and
    refuses a bigger image with an error naming the flag that raises it: Pillow's warning would
    only repeat that error, or second-guess a cap the user raised. Its error (at twice its
    limit) is left alone."""
    from PIL import Image

    with _PIL_OPEN, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=formats)


def _open_image(path: Path, max_pixels: int, digest: bytes | None = None):
    """The opened (header-only) Pillow image of ``path``, refused when it has more than
    ``max_pixels`` pixels; ``digest``: the bytes must still hash to it."""
    data = _read_regular(path, _max_file_bytes(max_pixels), "image")
    if digest is not None and _digest(data) != digest:
        raise UsageError(f"image {_show(path)} changed while the data set was read; run again")
    try:
        im = open_pil(data)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise UsageError(
            f"cannot read image {_show(path)}: {type(e).__name__}: {e}. Replace or delete the "
            "file and run again"
        ) from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _too_big(path, w, h, max_pixels)
    if w < 1 or h < 1:
        im.close()
        raise UsageError(f"image {_show(path)} is {w}x{h}: empty; replace or delete it")
    return im


def _read_image(
    path: Path,
    max_pixels: int = MAX_PIXELS,
    expect: tuple[int, ...] | None = None,
    first: Path | None = None,
    digest: bytes | None = None,
) -> np.ndarray:
    """Decode ``path`` to uint8 (H, W, 3); ``expect``: the (H, W, 3) it must have (checked from
    the header, before decoding), that of image ``first``."""
    im = _open_image(path, max_pixels, digest)
    try:
        w, h = im.size
        if expect is not None and (h, w) != tuple(expect[:2]):
            raise UsageError(
                f"image {_show(path)} is {w}x{h}, but {_show(first)} is {expect[1]}x{expect[0]}: "
                "all images of a data set must have one size"
            )
        try:
            im.load()
            rgb = im.convert("RGB")  # as torchvision's pil_loader does
            a = np.asarray(rgb, dtype=np.uint8)
        except Exception as e:
            raise UsageError(
                f"cannot read image {_show(path)}: {type(e).__name__}: {e}. Replace or delete "
                "the file and run again"
            ) from e
    finally:
        im.close()
    if a.shape != (h, w, 3):  # a decoder that disagrees with its own header
        raise UsageError(f"cannot read image {_show(path)}: decoded {a.shape}, header {w}x{h}")
    return a


def _image_shape(path: Path, max_pixels: int, digest: bytes | None = None) -> tuple[int, int, int]:
    im = _open_image(path, max_pixels, digest)
    w, h = im.size
    im.close()
    return (h, w, 3)


def _threads(n: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n))


def _alloc(shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        return np.empty(shape, dtype=np.uint8)
    except (MemoryError, ValueError) as e:
        gib = math.prod(shape) / 2**30
        raise UsageError(
            f"{what}: {gib:.1f} GiB of images do not fit in memory; select fewer (--limit)"
        ) from e


def decode_images(
    files: Sequence[Path],
    out: np.ndarray | None = None,
    *,
    quiet: bool = False,
    desc: str = "decode",
    max_pixels: int = MAX_PIXELS,
    digests: Sequence[bytes] | None = None,
) -> np.ndarray:
    """Decode image files into one uint8 (N, H, W, 3) array (``out`` if given). Every image must
    have the size of the first and at most ``max_pixels`` pixels; ``digests``: the BLAKE2b
    digests the files' bytes must still have. Threads: Pillow releases the GIL while decoding."""
    from tqdm.auto import tqdm

    if not files:
        raise UsageError("no images to decode")
    dig = list(digests) if digests is not None else [None] * len(files)
    shape = _image_shape(files[0], max_pixels, dig[0])
    if out is None:
        out = _alloc((len(files), *shape), f"decoding {len(files)} images of {_show(files[0])}")

    def work(i: int) -> None:
        out[i] = _read_image(files[i], max_pixels, shape, files[0], dig[i])

    chunk = 256
    with (
        tqdm(total=len(files), unit="img", desc=desc, disable=quiet, leave=False) as bar,
        ThreadPoolExecutor(_threads(len(files))) as ex,
    ):
        for s in range(0, len(files), chunk):
            idx = range(s, min(s + chunk, len(files)))
            for _ in ex.map(work, idx):
                pass
            bar.update(len(idx))
    return out


def _digests(files: Sequence[Path], max_pixels: int) -> list[bytes]:
    # one thread: for small image files, threads only add contention (measured)
    return [_file_digest(f, max_pixels) for f in files]


def _listing_key(
    name: str, split: str, root: Path, files: Sequence[Path], digests: Sequence[bytes], extra: str
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_DECODED_VERSION, name, split, str(root.resolve()), extra]).encode())
    for f, d in zip(files, digests):
        # fsencode: file names need not be UTF-8
        h.update(os.fsencode(f.relative_to(root)) + b"\0" + d + b"\n")
    return h.hexdigest()


def _cached_decode(
    name: str,
    split: str,
    root: Path,
    files: list[Path],
    labels: np.ndarray,
    *,
    cache: bool,
    quiet: bool,
    max_pixels: int,
    extra: str = "",
) -> np.ndarray:
    """Decoded images of ``files``: memory-mapped from the decoded cache when it holds these
    exact files (paths and contents), else decoded (into a new cache entry when the cache folder
    is writable and has room)."""
    desc = f"decode {name}/{split}"
    if not cache:
        return decode_images(files, quiet=quiet, desc=desc, max_pixels=max_pixels)
    digests = _digests(files, max_pixels)
    key = _listing_key(name, split, root, files, digests, extra)
    base = cache_root() / "decoded"
    entry = base / f"{name}-{split}-{key[:24]}"
    if (entry / COMPLETE_MARKER).is_file():
        try:
            images = np.load(entry / "images.npy", mmap_mode="r")
            cached_labels = np.load(entry / "labels.npy")
            if (
                images.dtype == np.uint8
                and images.ndim == 4
                and images.shape[0] == len(files)
                and images.shape[3] == 3
                and np.array_equal(cached_labels, labels)
            ):
                h, w = images.shape[1:3]
                if h * w > max_pixels:  # cached by a run that allowed bigger images
                    raise _too_big(files[0], w, h, max_pixels)
                return images
        except (OSError, ValueError):
            pass
        shutil.rmtree(entry, ignore_errors=True)  # damaged: decode again
    shape = _image_shape(files[0], max_pixels, digests[0])
    need = len(files) * math.prod(shape)
    try:
        base.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(base).free
    except OSError:  # read-only cache: decode into memory
        free = None
    if free is None or need + (64 << 20) > free:
        if free is not None:
            _warn(
                f"the decoded cache {_show(base)} has {free / 2**30:.1f} GiB free, "
                f"{need / 2**30:.1f} GiB are needed: decoding into memory, not caching"
            )
        return decode_images(files, quiet=quiet, desc=desc, max_pixels=max_pixels, digests=digests)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=base))
    except OSError:
        return decode_images(files, quiet=quiet, desc=desc, max_pixels=max_pixels, digests=digests)
    try:
        mm = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(files), *shape)
        )
        decode_images(files, mm, quiet=quiet, desc=desc, max_pixels=max_pixels, digests=digests)
        mm.flush()
        del mm
        np.save(tmp / "labels.npy", labels)
        (tmp / "source.json").write_text(
            json.dumps({"name": name, "split": split, "root": str(root), "n": len(files)})
        )
        (tmp / COMPLETE_MARKER).write_text("")
        try:
            os.replace(tmp, entry)
            fsync_dir(base)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return np.load(entry / "images.npy", mmap_mode="r")


# ----------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts, lists, numpy arrays) and nothing else, so a tampered
    file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module[:100]}.{name[:100]} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    raw = _read_regular(path, _PICKLE_CAP, "CIFAR-10 batch")
    try:
        # nesting, item counts and memo indices bounded before the C unpickler builds anything
        scan_pickle(raw, _PICKLE_BUDGET, "the pickle")
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a damaged pickle raises almost anything (KeyError, struct.error...)
        raise UsageError(
            f"cannot read CIFAR-10 batch {_show(path)}: {type(e).__name__}: {e}; delete it and "
            "run again"
        ) from e
    if not isinstance(obj, dict):
        raise UsageError(f"{_show(path)}: not a CIFAR-10 batch (expected a dict)")
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_names(path: Path, meta: dict) -> list[str]:
    raw = meta.get("label_names")
    if not isinstance(raw, (list, tuple)) or len(raw) != 10:
        n = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
        raise UsageError(f"{_show(path)}: expected a list of 10 label_names, got {n}")
    names = []
    for n in raw:
        if isinstance(n, bytes):
            try:
                n = n.decode()
            except UnicodeDecodeError as e:
                raise UsageError(f"{_show(path)}: label name {n[:40]!r} is not UTF-8") from e
        if not isinstance(n, str):
            raise UsageError(f"{_show(path)}: a label name is a {type(n).__name__}, not text")
        names.append(n)
    return names


def _cifar_labels(path: Path, labels, k: int) -> np.ndarray:
    """``labels`` (a list of ints as the batches hold it, or an integer array) in 0..k-1."""
    bad = UsageError(f"{_show(path)}: 'labels' must be a list of integers 0..{k - 1}")
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise bad
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise bad
    elif isinstance(labels, (list, tuple)):
        ints = (int, np.integer)
        if not all(isinstance(v, ints) and not isinstance(v, bool) for v in labels):
            raise bad
        if labels and (min(labels) < 0 or max(labels) >= k):  # before the cast: any size
            raise bad
    else:
        raise bad
    return np.asarray(labels, dtype=np.int64)


def _cifar_batch(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    if "data" not in d or "labels" not in d:
        raise UsageError(f"{_show(path)}: not a CIFAR-10 batch (needs 'data' and 'labels')")
    y = _cifar_labels(path, d["labels"], 10)
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.size != y.shape[0] * 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise UsageError(
            f"{_show(path)}: 'data' must be uint8 ({y.shape[0]}, 3072) for {y.shape[0]} labels, "
            f"got {desc}"
        )
    x = x.reshape(-1, 3, 32, 32)[:limit]
    return x.transpose(0, 2, 3, 1), y[:limit]  # stored planar (N, 3, 32, 32): make it NHWC


def _is_cifar_root(p: Path) -> bool:
    return (p / "batches.meta").is_file() and (p / "test_batch").is_file()


def _open_cifar10(data_dir, split: str, download: bool, quiet: bool, limit: int | None) -> Dataset:
    _check_split("cifar10", split)
    root = _locate("cifar10", "cifar10", data_dir, _is_cifar_root, download, quiet)
    names = _cifar_names(root / "batches.meta", _load_pickle(root / "batches.meta"))
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    n = 0
    for b in batches:
        if limit is not None and n >= limit:
            break  # later batches are not read
        path = root / b
        if not path.is_file():
            raise UsageError(f"{_show(path)} is missing; delete {_show(root)} and run again")
        x, y = _cifar_batch(path, None if limit is None else limit - n)
        xs.append(x)
        ys.append(y)
        n += len(y)
    images = np.ascontiguousarray(np.concatenate(xs))
    labels = np.concatenate(ys)
    if not len(labels):
        raise UsageError(f"{_show(root)}: no images in split {split}")
    return Dataset("cifar10", split, images, labels, names, f"{root} ({', '.join(batches)})")


# ----------------------------------------------------------------------------- folders


def _images_in(folder: Path, exts: tuple[str, ...], skip=None) -> list[Path]:
    """The regular files of ``folder`` (not recursive) with one of ``exts``, names sorted."""
    out = []
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if f.suffix.lower() not in exts or (skip is not None and skip(f.name)):
            continue
        if _regular(f) is not None:
            out.append(f)
    return out


def _is_cinic_root(p: Path) -> bool:
    return all((p / s).is_dir() for s in ("train", "valid", "test"))


def _open_cinic10(
    name: str, data_dir, split: str, download: bool, quiet: bool, cache: bool, limit, max_pixels
) -> Dataset:
    _check_split(name, split)
    root = _locate(name, "cinic10", data_dir, _is_cinic_root, download, quiet)
    split_dir = root / split
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    missing = [c for c in CIFAR10_CLASSES if c not in present]
    if missing:
        raise UsageError(f"{_show(split_dir)}: class folders missing: {', '.join(missing)}")

    def skip(fname: str) -> bool:
        return name == "cinic10-imagenet" and fname.startswith("cifar10-")

    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(CIFAR10_CLASSES):
        if limit is not None and len(files) >= limit:
            break
        found = _images_in(split_dir / c, (".png",), skip)
        files += found
        labels += [i] * len(found)
    files, labels = files[:limit], labels[:limit]
    if not files:
        raise UsageError(f"{_show(split_dir)}: no images for {name}")
    y = np.asarray(labels, dtype=np.int64)
    images = _cached_decode(
        name, split, root, files, y, cache=cache, quiet=quiet, max_pixels=max_pixels
    )
    return Dataset(
        name, split, images, y, list(CIFAR10_CLASSES), str(split_dir), [str(f) for f in files]
    )


def _is_tiny_root(p: Path) -> bool:
    return (p / "wnids.txt").is_file() and (p / "train").is_dir()


def _tiny_wnids(path: Path) -> list[str]:
    wnids = set()
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        w = line.strip()
        if w and not _plain_name(w):
            raise UsageError(f"{_show(path)}:{n}: {w!r} is not a wnid (a plain folder name)")
        if w:
            wnids.add(w)
    if not wnids:
        raise UsageError(f"{_show(path)}: no wnids")
    return sorted(wnids)


def _tiny_val(root: Path, index: dict[str, int], limit: int | None):
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UsageError(f"{_show(ann)} is missing")
    images = root / "val" / "images"
    files: list[Path] = []
    labels: list[int] = []
    for n, line in enumerate(_read_text(ann).splitlines(), 1):
        if limit is not None and len(files) >= limit:
            break
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise UsageError(f"{_show(ann)}:{n}: cannot parse {line!r} (file, wnid, box)")
        if not _plain_name(parts[0]):  # entries name files inside val/images, nothing else
            raise UsageError(
                f"{_show(ann)}:{n}: {parts[0]!r} is not a file name inside {_show(images)}"
            )
        files.append(images / parts[0])
        labels.append(index[parts[1]])
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise UsageError(
                f"cannot read image {_show(f)}: listed in {_show(ann)} but {e.strerror}"
            ) from e
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"image {_show(f)}, listed in {_show(ann)}, is not a regular file")
    return files, labels


def _open_tinyimagenet(
    data_dir, split: str, download: bool, quiet: bool, cache: bool, limit, max_pixels
) -> Dataset:
    _check_split("tinyimagenet", split)
    root = _locate("tinyimagenet", "tinyimagenet", data_dir, _is_tiny_root, download, quiet)
    wnids = _tiny_wnids(root / "wnids.txt")
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            if limit is not None and len(files) >= limit:
                break
            d = root / "train" / w / "images"
            if not d.is_dir():
                raise UsageError(f"{_show(d)} is missing (wnid {w} is listed in wnids.txt)")
            found = _images_in(d, (".jpeg", ".jpg"))
            files += found
            labels += [index[w]] * len(found)
        files, labels = files[:limit], labels[:limit]
    else:
        files, labels = _tiny_val(root, index, limit)
    if not files:
        raise UsageError(f"{_show(root)}: no images in split {split}")
    y = np.asarray(labels, dtype=np.int64)
    images = _cached_decode(
        "tinyimagenet", split, root, files, y, cache=cache, quiet=quiet, max_pixels=max_pixels
    )
    return Dataset(
        "tinyimagenet", split, images, y, wnids, f"{root} ({split})", [str(f) for f in files]
    )


def _walk_error(e: OSError) -> None:
    raise UsageError(f"cannot read folder {_show(e.filename)}: {e.strerror}") from e


def _dir_key(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _walk_class(root: Path, top: Path) -> list[tuple[str, list[str]]]:
    """``os.walk(top, followlinks=True)`` as (folder, file names), except that a folder already
    walked for this class, or ``root`` or a folder above it, is not entered: two links to ``..``
    would otherwise make the walk exponential, and a link to ``/`` walk the whole machine."""
    real = Path(os.path.realpath(root))
    seen = {k for k in map(_dir_key, (real, *real.parents)) if k is not None}
    top_key = _dir_key(top)
    if top_key in seen:  # a class folder that leads back to the data set or above it
        _warn(f"skipping {_show(top)}: it leads to {_show(root)} or a folder above it")
        return []
    if top_key is not None:
        seen.add(top_key)
    out = []
    for dirpath, dirnames, fnames in os.walk(top, onerror=_walk_error, followlinks=True):
        keep = []
        for d in sorted(dirnames):  # sorted: which of two links to one folder is kept is fixed
            full = os.path.join(dirpath, d)
            key = _dir_key(full)
            if key is None:
                raise UsageError(f"cannot read folder {_show(full)}")
            if key in seen:
                _warn(
                    f"skipping {_show(full)}: it leads to a folder already walked or above "
                    "this one (a link loop)"
                )
                continue
            seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        out.append((dirpath, fnames))
    return out


def _open_imagefolder(data_dir, split: str, quiet: bool, cache: bool, limit, max_pixels) -> Dataset:
    if data_dir is None:
        raise UsageError("--dataset imagefolder needs --data-dir ROOT (ROOT/<class>/<image>)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data-dir {_show(root)}: not a folder")
    if split and (root / split).is_dir():
        root = root / split
    # torchvision.datasets.folder.find_classes / make_dataset, so labels match ImageFolder
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UsageError(
            f"--data-dir {_show(root)}: no class folders (expected ROOT/<class>/<image>)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        if limit is not None and len(files) >= limit:
            break  # classes come in order: later ones cannot be among the first `limit`
        for dirpath, fnames in sorted(_walk_class(root, root / c)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    f = Path(dirpath) / fname
                    if _regular(f) is not None:
                        files.append(f)
                        labels.append(i)
    files, labels = files[:limit], labels[:limit]
    if not files:
        raise UsageError(
            f"--data-dir {_show(root)}: no images with extensions {', '.join(IMG_EXTENSIONS)}"
        )
    y = np.asarray(labels, dtype=np.int64)
    images = _cached_decode(
        "imagefolder", split, root, files, y, cache=cache, quiet=quiet, max_pixels=max_pixels
    )
    return Dataset("imagefolder", split, images, y, classes, str(root), [str(f) for f in files])


# ----------------------------------------------------------------------------- npz


def read_npy_header(f, what: str) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, left at the start of its data;
    a version other than 1.0 or 2.0, or a header over `NPY_MAX_HEADER_BYTES`, is a `UsageError`
    naming ``what``; a header numpy cannot parse is a ValueError."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise UsageError(f"{what} has .npy version {version}; save it again with numpy")
    # numpy reads the header's declared length before its own size check: 4 GiB for a 2.0
    # header claiming it; the length is checked here first
    start = f.tell()
    raw = f.read(2 if version == (1, 0) else 4)
    if len(raw) not in (2, 4):
        raise UsageError(f"{what}: a .npy file cut short in its header")
    size = int.from_bytes(raw, "little")
    if size > NPY_MAX_HEADER_BYTES:
        raise UsageError(
            f"{what}: a .npy header of {size} bytes, over the limit of {NPY_MAX_HEADER_BYTES} "
            "(npy header bytes)"
        )
    f.seek(start)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    try:
        return read(f)
    except (tokenize.TokenError, SyntaxError, RecursionError) as e:
        # numpy tokenizes a header it cannot evaluate, and lets the tokenizer's errors out
        raise ValueError(f"cannot parse the .npy header ({type(e).__name__})") from e


def _npy_open(zf: zipfile.ZipFile, path: Path, key: str, stack: contextlib.ExitStack):
    """(stream, shape, fortran_order, dtype) of array ``key`` of the npz (None if absent), its
    header checked against the member's size, so no declared shape makes us allocate what is
    not there. The stream closes with ``stack``."""
    for member in (f"{key}.npy", key):
        try:
            info = zf.getinfo(member)
            break
        except KeyError:
            continue
    else:
        return None
    f = stack.enter_context(zf.open(info))
    shape, fortran, dtype = read_npy_header(f, f"{_show(path)}: array '{key}'")
    if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0:
        raise UsageError(f"{_show(path)}: array '{key}' has dtype {dtype}; save plain arrays")
    if any(not isinstance(s, int) or s < 0 for s in shape):
        raise UsageError(f"{_show(path)}: array '{key}' has a bad shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != f.tell() + nbytes:
        raise UsageError(
            f"{_show(path)}: array '{key}' declares {shape} {dtype} ({nbytes} bytes) but holds "
            f"{info.file_size - f.tell()}: the file is damaged or truncated; write it again"
        )
    return f, tuple(shape), bool(fortran), dtype


def _npy_read(f, shape: tuple[int, ...], fortran: bool, dtype, rows: int | None = None):
    """The array (its first ``rows`` along axis 0 when C-ordered) read from ``f``."""
    if rows is not None and not fortran and shape:
        shape = (min(rows, shape[0]), *shape[1:])
    a = np.empty(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    view, got = memoryview(a), 0
    while got < a.size:
        k = f.readinto(view[got : got + _CHUNK])
        if not k:
            raise EOFError("the array data ends early")
        got += k
    a = a.view(dtype)
    if fortran:
        return a.reshape(shape[::-1]).transpose()
    return a.reshape(shape)


def _npz_arrays(path: Path, limit: int | None, max_pixels: int):
    with zipfile.ZipFile(path) as zf, contextlib.ExitStack() as stack:
        xo, yo = _npy_open(zf, path, "x", stack), _npy_open(zf, path, "y", stack)
        if xo is None or yo is None:
            has = ", ".join(n.removesuffix(".npy") for n in zf.namelist())
            raise UsageError(f"{_show(path)}: needs arrays 'x' and 'y', has {has or 'none'}")
        _, xs, _, xd = xo
        if xd != np.uint8 or len(xs) != 4 or xs[-1] != 3:
            raise UsageError(f"{_show(path)}: 'x' must be uint8 (N, H, W, 3), got {xd} {xs}")
        n, h, w = xs[:3]
        if n == 0 or h == 0 or w == 0:
            raise UsageError(f"{_show(path)}: 'x' is {xs}: empty; write images into it")
        if h * w > max_pixels:
            raise _too_big(f"{_show(path)} 'x'", w, h, max_pixels)
        _, ys, _, yd = yo
        if yd.kind not in "iu" or ys != (n,):
            raise UsageError(f"{_show(path)}: 'y' must be integer ({n},), got {yd} {ys}")
        y = _npy_read(*yo)
        names = None
        co = _npy_open(zf, path, "classes", stack)
        if co is not None:
            _, cs, _, cd = co
            too_big = math.prod(cs) * cd.itemsize > _NPY_SMALL_CAP
            if len(cs) != 1 or cd.kind not in "USiuf" or too_big:
                raise UsageError(
                    f"{_show(path)}: 'classes' must be a 1-D array of names, got {cd} {cs}"
                )
            names = [
                s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)
                for s in _npy_read(*co).tolist()
            ]
        x = _npy_read(*xo, rows=limit)
    return x, y, names


def _open_npz(data_dir, split: str, limit: int | None, max_pixels: int) -> Dataset:
    if data_dir is None:
        raise UsageError("--dataset npz needs --data-dir FILE.npz (uint8 NHWC 'x', integer 'y')")
    path = Path(data_dir).expanduser()
    if path.is_dir():
        path = path / f"{split}.npz"
    if not path.exists():
        raise UsageError(f"--data-dir: {_show(path)} does not exist")
    if not path.is_file():
        raise UsageError(f"--data-dir: {_show(path)} is not a regular file")
    try:
        x, y, names = _npz_arrays(path, limit, max_pixels)
    except UsageError:
        raise
    except Exception as e:  # zipfile and the .npy header parser raise many kinds of errors
        raise UsageError(
            f"--data-dir: cannot read {_show(path)} ({type(e).__name__}: {e}); the file is "
            "damaged or truncated: write it again"
        ) from e
    if y.size and y.min() < 0:
        raise UsageError(f"{_show(path)}: labels must be >= 0")
    cap = MAX_CLASSES if names is None else len(names)
    if y.size and y.max() >= cap:
        raise UsageError(
            f"{_show(path)}: label {y.max()} is too large: "
            + (
                f"{len(names)} class names in 'classes'"
                if names is not None
                else f"without a 'classes' array labels must be below {MAX_CLASSES}"
            )
        )
    y = y.astype(np.int64)  # every label is now in [0, cap)
    k = int(y.max()) + 1 if y.size else 0
    if names is None:
        width = len(str(max(k - 1, 0)))
        names = [str(i).zfill(width) for i in range(k)]  # zero-padded: sorts in label order
    return Dataset("npz", split, np.ascontiguousarray(x), y[: len(x)], names, str(path))


# ----------------------------------------------------------------------------- entry point


def open_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = True,
    *,
    quiet: bool = False,
    cache: bool = True,
    limit: int | None = None,
    max_pixels: int | None = None,
) -> Dataset:
    """Open data set ``name`` (one of ``DATASETS``). ``data_dir``: where it is (or is to be
    downloaded); None means the cache folder. ``cache``: use the decoded-image cache.
    ``limit``: only the first ``limit`` images (in the data set's order) are read, decoded and
    cached; the Dataset has at most that many (class names are those of the whole set).
    ``max_pixels``: the most pixels an image may have (None: ``MAX_PIXELS``). Bad input raises
    `UsageError` naming the file."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit must be an integer >= 1, got {limit!r}")
    if max_pixels is None:
        max_pixels = MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise UsageError(f"--max-image-pixels must be an integer >= 1, got {max_pixels!r}")
    if data_dir is not None:  # absolute, so sources and cache keys do not depend on the cwd
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    try:
        if name == "cifar10":
            return _open_cifar10(data_dir, split, download, quiet, limit)
        if name in ("cinic10", "cinic10-imagenet"):
            return _open_cinic10(name, data_dir, split, download, quiet, cache, limit, max_pixels)
        if name == "tinyimagenet":
            return _open_tinyimagenet(data_dir, split, download, quiet, cache, limit, max_pixels)
        if name == "imagefolder":
            return _open_imagefolder(data_dir, split, quiet, cache, limit, max_pixels)
        if name == "npz":
            return _open_npz(data_dir, split, limit, max_pixels)
    except OSError as e:  # a folder that cannot be listed, a file that vanished: bad input
        where = e.filename if e.filename is not None else data_dir
        raise UsageError(f"cannot read {_show(where)}: {e.strerror or e}") from e
    raise UsageError(f"--dataset {name!r}: choose one of {', '.join(DATASETS)}")
