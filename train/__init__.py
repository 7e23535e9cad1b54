"""Training of the paper's EBM and DDPM (`puregen-fast train ebm|ddpm`).

Python API::

    from puregen_fast.train import EBMConfig, DDPMConfig, train_ebm, train_ddpm
    res = train_ebm(EBMConfig(dataset="npz", data_dir="x.npz", out="runs/ebm", steps=100))
    ebm = pg.load_ebm(res.out_dir)
"""

from __future__ import annotations

from typing import Any

from puregen_fast.train.config import DDPMConfig, EBMConfig
from puregen_fast.train.loop import TrainingDiverged, TrainResult

__all__ = ["EBMConfig", "DDPMConfig", "TrainResult", "TrainingDiverged", "train_ebm", "train_ddpm"]


def train_ebm(cfg: EBMConfig, data: Any = None) -> TrainResult:
    from puregen_fast.train.ebm import train_ebm as _train

    return _train(cfg, data)


def train_ddpm(cfg: DDPMConfig, data: Any = None) -> TrainResult:
    from puregen_fast.train.ddpm import train_ddpm as _train

    return _train(cfg, data)
