"""Training data: the data layer's readers (`puregen_fast.data.datasets.open_dataset`) behind a
small checked wrapper, with a minimal ``.npz`` reader of our own for builds without them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from puregen_fast.errors import UsageError

__all__ = ["TrainData", "load_train_data", "to_x"]


@dataclass
class TrainData:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path:
        raise UsageError("--dataset npz needs --data-dir FILE.npz (uint8 NHWC 'x', integer 'y')")
    if not os.path.isfile(path):
        raise UsageError(f"--data-dir {path!r}: no such .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise UsageError(f"{path!r}: no array 'x' (uint8 NHWC images) in the .npz")
            x = np.asarray(z["x"])
            y = np.asarray(z["y"]) if "y" in z else np.zeros(len(x), np.int64)
            names = [str(n) for n in z["classes"]] if "classes" in z else None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path!r} as .npz: {e}") from e
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1)] if y.size else []
    return x, y, names


def _open(dataset: str, data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray, list]:
    try:
        from puregen_fast.data.datasets import open_dataset
    except ImportError:
        open_dataset = None
    if open_dataset is None:
        if dataset != "npz":
            raise UsageError(
                f"--dataset {dataset}: the data readers are not in this build; "
                "use --dataset npz --data-dir FILE.npz"
            )
        return _read_npz(data_dir or "")
    try:
        ds = open_dataset(dataset, data_dir, split, download=True)
    except UsageError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--dataset {dataset} --data-dir {data_dir}: {e}") from e
    return ds.images, ds.labels, list(ds.class_names)


def _select_classes(spec: str, labels: np.ndarray, names: list[str]) -> list[int]:
    chosen = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok in names:
            chosen.append(names.index(tok))
        elif tok.isdigit() and int(tok) < max(len(names), int(labels.max(initial=-1)) + 1):
            chosen.append(int(tok))
        else:
            raise UsageError(
                f"--classes: unknown class {tok!r}; the data set has {', '.join(names) or 'none'}"
            )
    if not chosen:
        raise UsageError("--classes is empty; name at least one class")
    return sorted(set(chosen))


def load_train_data(
    dataset: str,
    data_dir: str | None,
    split: str = "train",
    *,
    limit: int | None = None,
    classes: str | None = None,
    need_classes: bool = False,
    min_hw: int = 1,
) -> TrainData:
    """Read, check and select the training images.

    Raises `UsageError` for an empty data set (after ``classes``/``limit``), images that are not
    uint8 NHWC RGB, and, where ``need_classes``, fewer than two classes.
    """
    images, labels, names = _open(dataset, data_dir, split)
    where = f"--dataset {dataset}" + (f" --data-dir {data_dir}" if data_dir else "")
    images = np.asarray(images) if not isinstance(images, np.ndarray) else images
    labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UsageError(
            f"{where}: images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}"
        )
    if len(labels) != len(images):
        raise UsageError(f"{where}: {len(images)} images but {len(labels)} labels")
    if classes:
        keep = np.isin(labels, _select_classes(classes, labels, names))
        images, labels = images[keep], labels[keep]
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be >= 1; got {limit}")
        images, labels = images[:limit], labels[:limit]
    if len(images) == 0:
        raise UsageError(
            f"{where}: the data set is empty" + (f" for --classes {classes}" if classes else "")
        )
    if need_classes and len(np.unique(labels)) < 2:
        raise UsageError(
            f"{where}: needs at least two classes; found only "
            f"{', '.join(str(names[i]) if i < len(names) else str(i) for i in np.unique(labels))}"
        )
    h, w = images.shape[1:3]
    if h % min_hw or w % min_hw:
        raise UsageError(
            f"{where}: image size {h}x{w} must be divisible by {min_hw} for this model"
        )
    return TrainData(images, labels, names, where)


def to_x(u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1] on ``device``."""
    u = u8.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return u * 2 - 1  # the same arithmetic as the Purifier's conversion
