"""Helpers shared by the training tests (tests/train): a small family of synthetic images and the
`puregen-fast train` command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from puregen_fast.cli.main import main


def shapes(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """One family of images: a bright disc of random place, size and colour on a flat, darker
    background. uint8 NHWC."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = np.broadcast_to(r.uniform(0.2, 0.5, 3), (size, size, 3)).copy()
        cy, cx = r.uniform(4, size - 4, 2)
        rad = r.uniform(2.5, 5)
        img[((yy - cy) ** 2 + (xx - cx) ** 2) <= rad**2] = r.uniform(0.6, 1.0, 3)
        out[i] = img
    return (out * 255).round().astype(np.uint8)


def write_npz(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """``x`` (and ``y``, zeros by default) as the ``--dataset npz`` file ``path``."""
    np.savez(path, x=x, y=np.zeros(len(x), np.int64) if y is None else y)
    return path


def to_x(u8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def train_argv(recipe: str, data: Path, out: Path, *extra: str) -> list[str]:
    """``train RECIPE`` on the npz file ``data`` into ``out``, then ``extra``."""
    return ["train", recipe, "--dataset", "npz", "--data-dir", str(data), "--out", str(out),
            *extra]  # fmt: skip


def run_train(recipe: str, data: Path, out: Path, *extra: str) -> int:
    """`train_argv` run in this process; the command's exit code (argparse exits 2 itself for a
    flag out of its range)."""
    try:
        return main(train_argv(recipe, data, out, *extra))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def final_and_initial(out: Path, load: Callable[[Path], Any]) -> tuple[Any, Any]:
    """A run's final weights and its step-0 checkpoint's (untrained), each through ``load``."""
    return load(out), load(out / "checkpoints" / "step_00000000")


def weights(d: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(d / name))
