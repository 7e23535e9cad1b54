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
  class, names sorted; ``val`` is ``val/images`` in the order of ``val_annotations.txt``.
* ``imagefolder``: ``--data-dir ROOT`` (``ROOT/<split>`` when that folder exists): class folders
  sorted, files found as torchvision's ``ImageFolder`` finds them (recursive, sorted, same
  extensions), so labels match ``ImageFolder``'s.
* ``npz``: ``--data-dir FILE.npz`` (or a folder holding ``<split>.npz``) with uint8 NHWC ``x``
  and integer ``y``; class names from an optional ``classes`` array, else ``0..K-1``.

Every image is converted to RGB (grayscale and palette files occur in CINIC-10 and Tiny-ImageNet)
and must have the size of the first; no resizing. Decoded image files are cached once as uint8
``.npy`` under ``<cache>/decoded/`` (keyed by data set, split, source folder and the file listing
with sizes and modification times) and memory-mapped on later runs, so they are not decoded again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from puregen_fast.data.download import COMPLETE_MARKER, cache_root, ensure_extracted
from puregen_fast.data.io import fsync_dir
from puregen_fast.errors import UsageError

__all__ = [
    "DATASETS",
    "SPLITS",
    "CIFAR10_CLASSES",
    "IMG_EXTENSIONS",
    "Dataset",
    "open_dataset",
    "decode_images",
]

DATASETS = ("cifar10", "cinic10", "cinic10-imagenet", "tinyimagenet", "imagefolder", "npz")
SPLITS: dict[str, tuple[str, ...]] = {
    "cifar10": ("train", "test"),
    "cinic10": ("train", "valid", "test"),
    "cinic10-imagenet": ("train", "valid", "test"),
    "tinyimagenet": ("train", "val"),
}
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
_DECODED_VERSION = 1


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


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")  # as torchvision's pil_loader does
        return np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise UsageError(
            f"cannot read image {path}: {e}. Replace or delete the file and run again"
        ) from e


def _listing_key(name: str, split: str, root: Path, files: Sequence[Path], extra: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_DECODED_VERSION, name, split, str(root.resolve()), extra]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def decode_images(
    files: Sequence[Path],
    out: np.ndarray | None = None,
    *,
    quiet: bool = False,
    desc: str = "decode",
) -> np.ndarray:
    """Decode image files into one uint8 (N, H, W, 3) array (``out`` if given). Every image must
    have the size of the first. Threads: Pillow releases the GIL while decoding."""
    from tqdm.auto import tqdm

    if not files:
        raise UsageError("no images to decode")
    first = _read_image(files[0])
    shape = first.shape
    if out is None:
        out = np.empty((len(files), *shape), dtype=np.uint8)
    out[0] = first

    def work(i: int) -> None:
        a = _read_image(files[i])
        if a.shape != shape:
            raise UsageError(
                f"image {files[i]} is {a.shape[1]}x{a.shape[0]}, but {files[0]} is "
                f"{shape[1]}x{shape[0]}: all images of a data set must have one size"
            )
        out[i] = a

    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = 256
    with (
        tqdm(total=len(files), initial=1, unit="img", desc=desc, disable=quiet, leave=False) as bar,
        ThreadPoolExecutor(workers) as ex,
    ):
        for s in range(1, len(files), chunk):
            idx = range(s, min(s + chunk, len(files)))
            for _ in ex.map(work, idx):
                pass
            bar.update(len(idx))
    return out


def _cached_decode(
    name: str,
    split: str,
    root: Path,
    files: list[Path],
    labels: np.ndarray,
    *,
    cache: bool,
    quiet: bool,
    extra: str = "",
) -> np.ndarray:
    """Decoded images of ``files``: memory-mapped from the decoded cache when it holds this
    exact listing, else decoded (into a new cache entry when the cache folder is writable)."""
    if not cache:
        return decode_images(files, quiet=quiet, desc=f"decode {name}/{split}")
    key = _listing_key(name, split, root, files, extra)
    base = cache_root() / "decoded"
    entry = base / f"{name}-{split}-{key[:24]}"
    if (entry / COMPLETE_MARKER).is_file():
        try:
            images = np.load(entry / "images.npy", mmap_mode="r")
            cached_labels = np.load(entry / "labels.npy")
            if images.shape[0] == len(files) and np.array_equal(cached_labels, labels):
                return images
        except (OSError, ValueError):
            pass
        shutil.rmtree(entry, ignore_errors=True)  # damaged: decode again
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=base))
    except OSError:  # read-only cache: decode into memory
        return decode_images(files, quiet=quiet, desc=f"decode {name}/{split}")
    try:
        shape = _read_image(files[0]).shape
        mm = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(files), *shape)
        )
        decode_images(files, mm, quiet=quiet, desc=f"decode {name}/{split}")
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
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UsageError(f"cannot read CIFAR-10 batch {path}: {e}; delete it and run again") from e
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not a CIFAR-10 batch (expected a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _is_cifar_root(p: Path) -> bool:
    return (p / "batches.meta").is_file() and (p / "test_batch").is_file()


def _open_cifar10(data_dir, split: str, download: bool, quiet: bool) -> Dataset:
    _check_split("cifar10", split)
    root = _locate("cifar10", "cifar10", data_dir, _is_cifar_root, download, quiet)
    meta = _load_pickle(root / "batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if len(names) != 10:
        raise UsageError(f"{root / 'batches.meta'}: expected 10 label_names, got {len(names)}")
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for b in batches:
        path = root / b
        if not path.is_file():
            raise UsageError(f"{path} is missing; delete {root} and run again to re-extract")
        d = _load_pickle(path)
        try:
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d["labels"], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise UsageError(f"{path}: not a CIFAR-10 batch ({e})") from e
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels")
        xs.append(x.transpose(0, 2, 3, 1))  # stored planar (N, 3, 32, 32): make it NHWC
        ys.append(y)
    images = np.ascontiguousarray(np.concatenate(xs))
    labels = np.concatenate(ys)
    return Dataset("cifar10", split, images, labels, names, f"{root} ({', '.join(batches)})")


# ----------------------------------------------------------------------------- folders


def _is_cinic_root(p: Path) -> bool:
    return all((p / s).is_dir() for s in ("train", "valid", "test"))


def _open_cinic10(
    name: str, data_dir, split: str, download: bool, quiet: bool, cache: bool
) -> Dataset:
    _check_split(name, split)
    root = _locate(name, "cinic10", data_dir, _is_cinic_root, download, quiet)
    split_dir = root / split
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    missing = [c for c in CIFAR10_CLASSES if c not in present]
    if missing:
        raise UsageError(f"{split_dir}: class folders missing: {', '.join(missing)}")
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(CIFAR10_CLASSES):
        for f in sorted((split_dir / c).iterdir(), key=lambda p: p.name):
            if not f.is_file() or f.suffix.lower() != ".png":
                continue
            if name == "cinic10-imagenet" and f.name.startswith("cifar10-"):
                continue
            files.append(f)
            labels.append(i)
    if not files:
        raise UsageError(f"{split_dir}: no images for {name}")
    y = np.asarray(labels, dtype=np.int64)
    images = _cached_decode(name, split, root, files, y, cache=cache, quiet=quiet)
    return Dataset(
        name, split, images, y, list(CIFAR10_CLASSES), str(split_dir), [str(f) for f in files]
    )


def _is_tiny_root(p: Path) -> bool:
    return (p / "wnids.txt").is_file() and (p / "train").is_dir()


def _open_tinyimagenet(data_dir, split: str, download: bool, quiet: bool, cache: bool) -> Dataset:
    _check_split("tinyimagenet", split)
    root = _locate("tinyimagenet", "tinyimagenet", data_dir, _is_tiny_root, download, quiet)
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().splitlines() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            d = root / "train" / w / "images"
            if not d.is_dir():
                raise UsageError(f"{d} is missing (wnid {w} is listed in wnids.txt)")
            for f in sorted(d.iterdir(), key=lambda p: p.name):
                if f.is_file() and f.suffix.lower() in (".jpeg", ".jpg"):
                    files.append(f)
                    labels.append(index[w])
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise UsageError(f"{ann} is missing")
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in index:
                raise UsageError(f"{ann}:{n}: cannot parse {line!r} (file, wnid, box)")
            files.append(root / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
        for f in files:
            if not f.is_file():
                raise UsageError(f"cannot read image {f}: listed in {ann} but missing")
    if not files:
        raise UsageError(f"{root}: no images in split {split}")
    y = np.asarray(labels, dtype=np.int64)
    images = _cached_decode("tinyimagenet", split, root, files, y, cache=cache, quiet=quiet)
    return Dataset(
        "tinyimagenet", split, images, y, wnids, f"{root} ({split})", [str(f) for f in files]
    )


def _open_imagefolder(data_dir, split: str, quiet: bool, cache: bool) -> Dataset:
    if data_dir is None:
        raise UsageError("--dataset imagefolder needs --data-dir ROOT (ROOT/<class>/<image>)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data-dir {root}: not a folder")
    if split and (root / split).is_dir():
        root = root / split
    # torchvision.datasets.folder.find_classes / make_dataset, so labels match ImageFolder
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UsageError(f"--data-dir {root}: no class folders (expected ROOT/<class>/<image>)")
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / c, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    files.append(Path(dirpath) / fname)
                    labels.append(i)
    if not files:
        raise UsageError(
            f"--data-dir {root}: no images with extensions {', '.join(IMG_EXTENSIONS)}"
        )
    y = np.asarray(labels, dtype=np.int64)
    images = _cached_decode("imagefolder", split, root, files, y, cache=cache, quiet=quiet)
    return Dataset("imagefolder", split, images, y, classes, str(root), [str(f) for f in files])


def _open_npz(data_dir, split: str) -> Dataset:
    if data_dir is None:
        raise UsageError("--dataset npz needs --data-dir FILE.npz (uint8 NHWC 'x', integer 'y')")
    path = Path(data_dir).expanduser()
    if path.is_dir():
        path = path / f"{split}.npz"
    if not path.is_file():
        raise UsageError(f"--data-dir: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise UsageError(f"{path}: needs arrays 'x' and 'y', has {', '.join(z.files)}")
            x, y = z["x"], z["y"]
            names = [str(s) for s in z["classes"].tolist()] if "classes" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UsageError(
            f"--data-dir: cannot read {path} ({type(e).__name__}: {e}); the file is damaged or "
            "truncated: write it again"
        ) from e
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise UsageError(f"{path}: 'x' must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise UsageError(f"{path}: 'y' must be integer ({x.shape[0]},), got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise UsageError(f"{path}: labels must be >= 0")
    k = int(y.max()) + 1 if y.size else 0
    if names is None:
        width = len(str(max(k - 1, 0)))
        names = [str(i).zfill(width) for i in range(k)]  # zero-padded: sorts in label order
    elif len(names) < k:
        raise UsageError(f"{path}: {len(names)} class names but labels go up to {k - 1}")
    return Dataset("npz", split, np.ascontiguousarray(x), y, names, str(path))


# ----------------------------------------------------------------------------- entry point


def open_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = True,
    *,
    quiet: bool = False,
    cache: bool = True,
) -> Dataset:
    """Open data set ``name`` (one of ``DATASETS``). ``data_dir``: where it is (or is to be
    downloaded); None means the cache folder. ``cache``: use the decoded-image cache."""
    if data_dir is not None:  # absolute, so sources and cache keys do not depend on the cwd
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if name == "cifar10":
        return _open_cifar10(data_dir, split, download, quiet)
    if name in ("cinic10", "cinic10-imagenet"):
        return _open_cinic10(name, data_dir, split, download, quiet, cache)
    if name == "tinyimagenet":
        return _open_tinyimagenet(data_dir, split, download, quiet, cache)
    if name == "imagefolder":
        return _open_imagefolder(data_dir, split, quiet, cache)
    if name == "npz":
        return _open_npz(data_dir, split)
    raise UsageError(f"--dataset {name!r}: choose one of {', '.join(DATASETS)}")
