"""A small real-image classification set that needs no download: the sample photographs bundled
with scikit-image, cut into square tiles, each tile labelled with the photograph it came from.

Why: the paper's evaluation needs real photographs (a defense that only works on synthetic
images proves little), and a CPU-only machine cannot train on CIFAR-10 in minutes. Each class
is one photograph (a cat, a coffee cup, a rocket launch, a retina, ...), so telling tiles apart
takes colour, texture and shape, as natural-image classification does.

The photographs are scaled so their longer side is at most ``max_side`` pixels (a 32x32 tile of
a 1411-pixel retina scan is mostly flat orange), cut into non-overlapping ``size`` x ``size``
tiles, and tiles that are nearly flat (grey-level std under ``min_std``: the black sky of the
Hubble field, the border of the retina scan) are dropped, since they carry no class. The tiles
of each class are shuffled with ``seed`` and split, with no tile in two splits, into

* ``train``: the set that is poisoned, purified and trained on;
* ``test``: the clean test set;
* ``heldout``: images kept apart for training the generative model (the EBM), plus every tile
  of the ``extra`` photographs (too small to be classes), as the paper trains its models on
  data apart from the classifier's;
* ``pood``: the tiles of the ``extra`` photographs alone, labelled by photograph: the public
  out-of-distribution images a Narcissus attacker trains its surrogate on.

Each split is written as an ``.npz`` with uint8 NHWC ``x``, int64 ``y`` and ``classes``: what
``--dataset npz`` reads everywhere (``purify``, ``train ebm``, ``eval``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from puregen_fast.data.io import atomic_path
from puregen_fast.errors import UsageError

__all__ = ["CLASS_PHOTOS", "EXTRA_PHOTOS", "PhotoSets", "load_photo", "photo_tiles",
           "make_photo_sets", "write_photo_sets"]  # fmt: skip

# photographs shipped inside scikit-image (no pooch download) with at least 150 informative
# 32x32 tiles each: the classes (the last four are grey-scale)
CLASS_PHOTOS = (
    "astronaut",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "camera",
    "brick",
    "grass",
    "gravel",
)
# the ones with fewer tiles, used only for the held-apart set
EXTRA_PHOTOS = ("chelsea", "rocket", "moon", "coins", "clock", "page")


def _skimage_data():
    try:
        import skimage.data as d
    except ImportError as e:
        raise UsageError(
            "the photo set needs scikit-image: pip install 'puregen-fast[photos]' "
            "(or pip install scikit-image)"
        ) from e
    return d


def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as uint8 (H, W, 3) (grey ones repeated over 3 channels)."""
    d = _skimage_data()
    if name == "motorcycle":
        img = d.stereo_motorcycle()[0]  # the left view
    elif name in CLASS_PHOTOS or name in EXTRA_PHOTOS:
        img = getattr(d, name)()
    else:
        raise UsageError(f"unknown photo {name!r}; choose from {', '.join(CLASS_PHOTOS)}")
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def photo_tiles(
    img: np.ndarray, size: int = 32, max_side: int = 1024, min_std: float = 8.0
) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` tiles (N, size, size, 3) of ``img`` after scaling its
    longer side down to ``max_side``; nearly flat tiles (grey std < ``min_std``) dropped."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        img = np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.LANCZOS))
        h, w = img.shape[:2]
    ny, nx = h // size, w // size
    t = img[: ny * size, : nx * size].reshape(ny, size, nx, size, 3).swapaxes(1, 2)
    t = t.reshape(ny * nx, size, size, 3)
    grey = t.astype(np.float32).mean(-1)
    keep = grey.reshape(len(t), -1).std(1) >= min_std
    return np.ascontiguousarray(t[keep])


@dataclass
class PhotoSets:
    """The three splits (images uint8 NHWC, labels int64) and the class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_heldout: np.ndarray
    y_heldout: np.ndarray
    x_pood: np.ndarray
    y_pood: np.ndarray
    classes: list[str]
    pood_classes: list[str]


def make_photo_sets(
    *,
    size: int = 32,
    train_per_class: int = 100,
    test_per_class: int = 30,
    heldout_per_class: int = 20,
    classes: tuple[str, ...] = CLASS_PHOTOS,
    extra: tuple[str, ...] = EXTRA_PHOTOS,
    seed: int = 0,
) -> PhotoSets:
    """The splits of the module docstring; every class gets exactly the counts asked for, and
    a class whose photograph has too few tiles is a UsageError naming it and its count."""
    if size < 8:
        raise UsageError(f"--size {size}: tiles must be at least 8 pixels")
    rng = np.random.default_rng(seed)
    need = train_per_class + test_per_class + heldout_per_class
    parts: dict[str, list] = {"train": [], "test": [], "heldout": []}
    for k, name in enumerate(classes):
        t = photo_tiles(load_photo(name), size)
        if len(t) < need:
            raise UsageError(
                f"photo {name!r} gives {len(t)} tiles of {size}x{size}, fewer than the "
                f"{need} asked for per class; lower the per-class counts or --size"
            )
        t = t[rng.permutation(len(t))]
        a, b = train_per_class, train_per_class + test_per_class
        for split, sl in (("train", t[:a]), ("test", t[a:b]), ("heldout", t[b:need])):
            parts[split].append((sl, np.full(len(sl), k, np.int64)))
    out = {}
    for split, chunks in parts.items():
        x = np.concatenate([c[0] for c in chunks])
        y = np.concatenate([c[1] for c in chunks])
        out[split] = (x, y)
    # the held-apart set also holds every tile of the extra photographs (labelled as none of
    # the classes would be wrong for a classifier, but the EBM ignores labels: give them 0)
    ex = [photo_tiles(load_photo(n), size) for n in extra]
    xe = np.concatenate(ex) if ex else np.zeros((0, size, size, 3), np.uint8)
    ye = np.concatenate([np.full(len(t), i, np.int64) for i, t in enumerate(ex)]) if ex else []
    xh, yh = out["heldout"]
    out["heldout"] = (np.concatenate([xh, xe]), np.concatenate([yh, np.zeros(len(xe), np.int64)]))
    pood = (xe, np.asarray(ye, np.int64))
    return PhotoSets(*out["train"], *out["test"], *out["heldout"], *pood, list(classes),
                     list(extra))  # fmt: skip


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray, classes: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file: savez adds no suffix
        np.savez(f, x=x, y=y.astype(np.int64), classes=np.asarray(classes, dtype=str))


def write_photo_sets(
    out_dir: str | os.PathLike[str], sets: PhotoSets | None = None, **kwargs
) -> dict[str, Path]:
    """Write ``train.npz``, ``test.npz``, ``heldout.npz`` and ``pood.npz`` into ``out_dir``
    (created), each atomically; ``kwargs`` go to `make_photo_sets`. Returns the paths by split."""
    sets = sets or make_photo_sets(**kwargs)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = {s: out / f"{s}.npz" for s in ("train", "test", "heldout", "pood")}
        _save_npz(paths["train"], sets.x_train, sets.y_train, sets.classes)
        _save_npz(paths["test"], sets.x_test, sets.y_test, sets.classes)
        _save_npz(paths["heldout"], sets.x_heldout, sets.y_heldout, sets.classes)
        if len(sets.x_pood):
            _save_npz(paths["pood"], sets.x_pood, sets.y_pood, sets.pood_classes)
        else:
            del paths["pood"]
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write ({e})") from e
    return paths
