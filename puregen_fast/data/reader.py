"""Reading purified output back: `load_purified` (DESIGN 3, 5).

``load_purified(DIR)`` returns `Purified`: ``.images`` is a read-only ``np.memmap`` when the
output has one npy shard, and otherwise a `ShardedArray`: a lazy, read-only view over the
shards' memmaps that indexes like an array (ints, slices, index arrays, boolean masks) and turns
into one ndarray with ``np.asarray``; ``.labels`` is an in-memory int64 array. For png and
webdataset output the images are decoded into memory; webdataset output also gives ``.keys``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from puregen_fast.data.io import file_digest
from puregen_fast.data.manifest import MANIFEST, Manifest
from puregen_fast.data.webdataset import read_tar
from puregen_fast.data.writer import png_class_dirs, png_digest_line
from puregen_fast.errors import UsageError

__all__ = ["Purified", "ShardedArray", "load_purified"]


class ShardedArray:
    """A read-only (N, ...) view over consecutive shard arrays (memmaps): indexing reads only the
    shards it touches; ``np.asarray`` concatenates."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("no shards")
        self._parts = list(parts)
        self._starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self._starts[-1]), *parts[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self._parts)})"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = np.concatenate(self._parts)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for p in self._parts:
            yield from p

    def _take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {idx.shape} for length {self.shape[0]}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"index out of range for length {self.shape[0]}")
        flat = idx.reshape(-1)
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self._starts, flat, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._parts[s][flat[sel] - self._starts[s]]
        return out.reshape(*idx.shape, *self.shape[1:])

    def __getitem__(self, key):
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0] if key else slice(None)), key[1:]
        if key is Ellipsis:
            key, rest = slice(None), (Ellipsis, *rest)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"index {key} out of range for length {self.shape[0]}")
            s = int(np.searchsorted(self._starts, i, side="right") - 1)
            row = self._parts[s][i - self._starts[s]]
            return row[rest] if rest else row
        if isinstance(key, slice):
            res = self._take(np.arange(*key.indices(self.shape[0])))
        else:
            res = self._take(np.asarray(key))
        return res[(slice(None), *rest)] if rest else res


@dataclass
class Purified:
    """``load_purified`` result: images (N, H, W, 3) uint8, labels (N,) int64, the manifest."""

    images: np.ndarray | ShardedArray
    labels: np.ndarray
    manifest: Manifest
    keys: list[str] | None = None  # the samples' keys (webdataset output)

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_HINT = "rerun purify with the same flags and --resume to rewrite it"


def load_purified(out_dir: str | os.PathLike[str], *, verify: bool = True) -> Purified:
    """Open a finished ``puregen-fast purify`` output folder. With ``verify`` every shard's
    sha256 is checked against the manifest (and shapes always are); a mismatch raises
    UsageError naming the file."""
    out = Path(out_dir)
    man = Manifest.read(out / MANIFEST)  # checks the structure the readers below rely on
    if man.out_format == "webdataset":
        return _read_wds(out, man, verify)
    read = _read_npy if man.out_format == "npy" else _read_png
    images, labels = read(out, man, verify)
    return Purified(images, labels, man)


def _read_npy(
    out: Path, man: Manifest, verify: bool
) -> tuple[np.ndarray | ShardedArray, np.ndarray]:
    shape = man.image_shape
    parts, labels = [], []
    for s in man.shards:
        m = s["stop"] - s["start"]
        for key in ("images", "labels"):
            p = out / s[key]
            if not p.is_file():
                raise UsageError(f"{p}: missing; {_HINT}")
            if verify and file_digest(p) != s[f"{key}_sha256"]:
                raise UsageError(f"{p}: sha256 does not match the manifest; {_HINT}")
        try:
            im = np.load(out / s["images"], mmap_mode="r")
            lb = np.load(out / s["labels"], mmap_mode="r")  # shape checked before it is read
        except (OSError, ValueError) as e:
            raise UsageError(f"{out / s['images']}: unreadable ({e}); {_HINT}") from e
        if im.dtype != np.uint8 or im.shape != (m, *shape):
            raise UsageError(f"{out / s['images']}: shape {im.shape}, expected {(m, *shape)}")
        if lb.dtype != np.int64 or lb.shape != (m,):
            raise UsageError(f"{out / s['labels']}: shape {lb.shape}, expected ({m},)")
        parts.append(im)
        labels.append(np.array(lb))
    images: np.ndarray | ShardedArray
    if len(parts) == 0:
        images = np.zeros((0, *shape), np.uint8)
    elif len(parts) == 1:
        images = parts[0]
    else:
        images = ShardedArray(parts)
    return images, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def _read_wds(out: Path, man: Manifest, verify: bool) -> Purified:
    shape = man.image_shape
    images = np.empty((man.count, *shape), np.uint8)
    labels = np.empty(man.count, np.int64)
    keys: list[str] = []
    for s in man.shards:
        p = out / s["tar"]
        if not p.is_file():
            raise UsageError(f"{p}: missing; {_HINT}")
        if verify and file_digest(p) != s["sha256"]:
            raise UsageError(f"{p}: sha256 does not match the manifest; {_HINT}")
        k, x, y = read_tar(p, shape)
        if len(k) != s["stop"] - s["start"]:
            raise UsageError(f"{p}: {len(k)} samples, the manifest says "
                             f"{s['stop'] - s['start']}; {_HINT}")  # fmt: skip
        images[s["start"] : s["stop"]], labels[s["start"] : s["stop"]] = x, y
        keys.extend(k)
    return Purified(images, labels, man, keys)


def _read_png(out: Path, man: Manifest, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    n = man.count
    dirs = png_class_dirs(man.class_names)
    width = len(str(max(n - 1, 0)))
    found: dict[int, tuple[int, Path]] = {}
    for label, d in enumerate(dirs):
        if not (out / d).is_dir():
            continue
        for f in (out / d).iterdir():
            if f.is_file() and re.fullmatch(r"\d+\.png", f.name):
                found[int(f.stem)] = (label, f)
    if sorted(found) != list(range(n)):
        raise UsageError(f"{out}: expected PNG files 0..{n - 1} in the class folders; {_HINT}")
    shape = man.image_shape
    if n:  # the manifest's shape must be the files' before it sizes an allocation
        first = found[0][1]
        try:
            with Image.open(first) as im:
                w, h = im.size
        except (OSError, ValueError, SyntaxError) as e:
            raise UsageError(f"{first}: unreadable ({e}); {_HINT}") from e
        if (h, w, 3) != shape:
            raise UsageError(f"{first}: {h}x{w} pixels, the manifest says {shape}; {_HINT}")
    images = np.empty((n, *shape), np.uint8)
    lab = np.empty(n, np.int64)
    for s in man.shards:
        h = hashlib.sha256()
        for i in range(s["start"], s["stop"]):
            label, f = found[i]
            data = f.read_bytes()
            name = f"{dirs[label]}/{i:0{width}d}.png"
            h.update(png_digest_line(name, hashlib.sha256(data).hexdigest()))
            try:
                with Image.open(io.BytesIO(data)) as im:
                    images[i] = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as e:
                raise UsageError(f"{f}: unreadable or wrong size ({e}); {_HINT}") from e
            lab[i] = label
        if verify and h.hexdigest() != s["sha256"]:
            raise UsageError(
                f"{out}: PNG files of shard {s['index']} (images {s['start']}.."
                f"{s['stop'] - 1}) do not match the manifest; {_HINT}"
            )
    return images, lab
