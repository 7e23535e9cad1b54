"""The Narcissus clean-label backdoor, applied the way the PureGen authors apply it.

A Narcissus trigger is a float pattern of shape (1, 3, h, w) or (3, h, w) that lives in the
[-1, 1]-normalised image space (``x = 2u - 1``, u in [0, 1]). The authors (PureGen repository,
``get_poisoned_subset_narcissus`` with ``apply_noise_patch(mode='add')``) poison a training set
by:

* taking the images of the target class in data set order and keeping the **last** ``n`` of
  them (their default ``last_n=True``); labels are left unchanged (clean label);
* for each, ``x = Normalize(0.5, 0.5)(ToTensor(img))``, adding the trigger at offset (0, 0)
  (top-left corner; a 32x32 Narcissus trigger covers the whole CIFAR image), clamping to
  [-1, 1], and converting back with ``ToPILImage(Normalize(-1, 2)(x))``.

At test time they add ``trigger * m`` (m = 1, 2: ``range(1, 3)``, utils/classifier.py line 1144;
their headline number is m = 1) to every test image whose true class is not the target, with
the same conversions, and count the fraction classified as the target class (poison success).

Quantisation. torchvision's ``ToPILImage`` turns a float tensor into bytes with
``mul(255).byte()``, which truncates; and the float32 round trip ``(u - .5) / .5`` then
``(x + 1) / 2`` lands just below k/255 for some levels, so the authors' pipeline moves 63 of the
256 levels down by one even where the trigger is zero. ``quantize="trunc"`` (the default)
reproduces those bytes exactly: the same float32 operations in the same order, then truncation.
``quantize="round"`` rounds to the nearest level instead (no systematic -1/2 level bias).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from puregen_fast.data.io import atomic_path
from puregen_fast.errors import UsageError

__all__ = [
    "QUANTIZE",
    "PoisonedSet",
    "load_trigger",
    "make_trigger",
    "check_trigger",
    "apply_trigger",
    "select_poison_indices",
    "poison_dataset",
    "save_poisoned_npz",
    "save_trigger",
]

QUANTIZE = ("trunc", "round")


@dataclass
class PoisonedSet:
    """A poisoned copy of a training set: ``images`` uint8 NHWC, ``labels`` int64 (unchanged),
    ``poison_idx`` (sorted indices of the poisoned images), the target class (the class the
    attack wants; for Gradient Matching and Bullseye Polytope the poisons' class) and the
    trigger (None for the triggerless attacks). ``attack``: its name; ``extra``: more arrays
    for the record (`puregen_fast.eval.poisons`: the trial index, the target image)."""

    images: np.ndarray
    labels: np.ndarray
    poison_idx: np.ndarray
    target_class: int
    trigger: np.ndarray | None
    class_names: list[str]
    attack: str = "narcissus"
    extra: dict = field(default_factory=dict)


def make_trigger(
    kind: str = "uniform",
    shape: tuple[int, int] | tuple[int, int, int] = (32, 32),
    eps: float = 16 / 255 * 2,
    seed: int = 0,
) -> np.ndarray:
    """A synthetic trigger (for tests and demos; real Narcissus triggers are optimised).

    ``kind``: ``"uniform"`` (i.i.d. uniform in [-eps, eps]) or ``"checker"`` (a +-eps
    checkerboard). ``shape``: (h, w) or (3, h, w). Returns float32 (1, 3, h, w) in the
    [-1, 1]-normalised space, so ``eps = 2 * (k / 255)`` changes pixels by at most k levels.
    """
    if len(shape) == 3:
        if shape[0] != 3:
            raise ValueError(f"trigger shape {shape}: the first dimension must be 3 (RGB)")
        shape = shape[1:]
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise ValueError(f"trigger shape {shape}: sizes must be >= 1")
    if not (eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if kind == "uniform":
        rng = np.random.default_rng(seed)
        t = rng.uniform(-eps, eps, size=(1, 3, h, w))
    elif kind == "checker":
        yy, xx = np.mgrid[0:h, 0:w]
        t = np.broadcast_to(np.where((yy + xx) % 2 == 0, eps, -eps), (1, 3, h, w))
    else:
        raise ValueError(f"trigger kind {kind!r}: choose uniform or checker")
    return np.ascontiguousarray(t, dtype=np.float32)


def check_trigger(
    trigger: np.ndarray, image_hw: tuple[int, int] | None = None, *, what: str = "--trigger"
) -> np.ndarray:
    """The trigger as float32 (1, 3, h, w); UsageError (naming ``what``) when it is not a finite
    (1, 3, h, w) or (3, h, w) array or does not fit in images of size ``image_hw``."""
    t = np.asarray(trigger)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[0] != 1 or t.shape[1] != 3:
        raise UsageError(
            f"{what}: expected a trigger of shape (1, 3, h, w) or (3, h, w), got "
            f"{tuple(np.shape(trigger))}"
        )
    if not np.issubdtype(t.dtype, np.floating) and not np.issubdtype(t.dtype, np.integer):
        raise UsageError(f"{what}: expected a numeric (float) array, got dtype {t.dtype}")
    t = t.astype(np.float32)
    if not np.isfinite(t).all():
        raise UsageError(f"{what}: the trigger holds NaN or infinite values")
    if image_hw is not None:
        h, w = image_hw
        if t.shape[2] > h or t.shape[3] > w:
            raise UsageError(
                f"{what}: the trigger is {t.shape[3]}x{t.shape[2]} (w x h) but the images are "
                f"{w}x{h}; it must fit inside the image"
            )
    return t


def load_trigger(
    path: str | os.PathLike[str], image_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a trigger ``.npy`` (the authors publish Narcissus triggers as
    ``best_noise_lab<K>.npy``) and check it (``check_trigger``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--trigger {p}: no such file (a .npy array of shape (1, 3, h, w))")
    try:
        t = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"--trigger {p}: not a readable .npy array ({e})") from e
    if not isinstance(t, np.ndarray):  # an .npz archive
        raise UsageError(f"--trigger {p}: expected a single .npy array, got an archive")
    return check_trigger(t, image_hw, what=f"--trigger {p}")


def apply_trigger(
    images: np.ndarray,
    trigger: np.ndarray,
    scale: float = 1.0,
    *,
    offset: tuple[int, int] = (0, 0),
    quantize: str = "trunc",
) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 with ``scale * trigger`` added at ``offset`` (row, column)
    in the [-1, 1] space, clamped, back to uint8 (module docstring: ``quantize``). Returns a
    new array; pixels outside the trigger's footprint go through the same round trip (as in
    the authors' code, where the zero-padded trigger is added to the whole image)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    t = check_trigger(trigger, x.shape[1:3]).astype(np.float32)
    oy, ox = offset
    th, tw = t.shape[2:]
    if oy < 0 or ox < 0 or oy + th > x.shape[1] or ox + tw > x.shape[2]:
        raise ValueError(f"trigger of size {th}x{tw} at offset {offset} leaves the image")
    # the authors' float32 operations, in their order (ToTensor, Normalize(.5, .5), add, clamp,
    # Normalize(-1, 2), ToPILImage); the trigger * m product is float32 as well
    patch = np.zeros((1, x.shape[1], x.shape[2], 3), np.float32)
    patch[0, oy : oy + th, ox : ox + tw] = (t[0] * np.float32(scale)).transpose(1, 2, 0)
    u = x.astype(np.float32) / np.float32(255)
    v = (u - np.float32(0.5)) / np.float32(0.5)
    v = np.clip(v + patch, np.float32(-1), np.float32(1))
    w = (v - np.float32(-1)) / np.float32(2)
    w = w * np.float32(255)
    if quantize == "round":
        w = np.rint(w)
    return w.astype(np.uint8)  # truncation toward zero, as torch's .byte(); w is in [0, 255]


def select_poison_indices(
    labels: np.ndarray, target_class: int, count: int | None, *, last_n: bool = True,
    seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """Indices of the images to poison: the last ``count`` images of ``target_class`` in data
    set order (the authors' default), or ``count`` random ones of that class (``last_n=False``);
    every image of the class when ``count`` is None. Returned sorted."""
    labels = np.asarray(labels)
    members = np.flatnonzero(labels == target_class)
    if count is None:
        if members.size == 0:
            raise UsageError(f"--count all: class {target_class} has no training images")
        return members.astype(np.int64)
    if count < 1:
        raise UsageError(f"--count must be >= 1, got {count}")
    if count > members.size:
        raise UsageError(
            f"--count {count}: class {target_class} has only {members.size} training images"
        )
    if last_n:
        chosen = members[members.size - count :]
    else:
        chosen = np.random.default_rng(seed).choice(members, count, replace=False)
    return np.sort(chosen).astype(np.int64)


def poison_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    trigger: np.ndarray,
    target_class: int,
    count: int | None,
    *,
    class_names: list[str] | None = None,
    last_n: bool = True,
    seed: int = 0,
    quantize: str = "trunc",
) -> PoisonedSet:
    """Poison ``count`` training images of ``target_class`` with the Narcissus trigger (module
    docstring). Labels are unchanged; images not poisoned are copied bit for bit."""
    x = np.asarray(images)
    y = np.asarray(labels, dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise UsageError(f"images must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise UsageError(f"{x.shape[0]} images but labels of shape {y.shape}")
    k = len(class_names) if class_names is not None else int(y.max()) + 1 if y.size else 0
    if not 0 <= target_class < k:
        raise UsageError(f"--target-class {target_class}: must be in [0, {k - 1}] ({k} classes)")
    t = check_trigger(trigger, x.shape[1:3])
    idx = select_poison_indices(y, target_class, count, last_n=last_n, seed=seed)
    out = np.array(x)  # a writable copy (x may be a read-only memmap)
    out[idx] = apply_trigger(out[idx], t, 1.0, quantize=quantize)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    return PoisonedSet(out, y.copy(), idx, int(target_class), t, names)


def save_poisoned_npz(ps: PoisonedSet, path: str | os.PathLike[str]) -> Path:
    """Write ``ps`` as ``.npz`` with the keys ``puregen-fast purify --dataset npz`` reads
    (``x`` uint8 NHWC, ``y`` int64, ``classes``) plus ``poison_idx``, ``target_class``,
    ``attack``, the ``trigger`` if there is one and ``ps.extra`` (for the record), atomically
    (`puregen_fast.data.io.atomic_path`)."""
    p = Path(path)
    record = {k: np.asarray(v) for k, v in ps.extra.items()}
    if ps.trigger is not None:
        record["trigger"] = ps.trigger.astype(np.float32)
    try:
        with atomic_path(p) as tmp, open(tmp, "wb") as f:  # a file: savez adds no suffix
            np.savez(
                f,
                x=ps.images,
                y=ps.labels.astype(np.int64),
                poison_idx=ps.poison_idx.astype(np.int64),
                classes=np.asarray(ps.class_names, dtype=str),
                target_class=np.int64(ps.target_class),
                attack=np.asarray(ps.attack),
                **record,
            )
    except OSError as e:
        raise UsageError(
            f"--out {p}: cannot write ({e}); the folder must exist, be writable and have free space"
        ) from e
    return p


def save_trigger(trigger: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a trigger as ``.npy`` (what `load_trigger` reads), atomically."""
    p = Path(path)
    with atomic_path(p) as tmp, open(tmp, "wb") as f:  # a file: save adds no suffix
        np.save(f, trigger)
    return p
