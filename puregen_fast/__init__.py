"""puregen-fast: PureGen data purification (arXiv 2405.18627) at GPU speed.

Public surface (DESIGN 3): models `EBMSNGAN32`, `UNet2D`; `DDPMSchedule`; checkpoints
`load_ebm`/`save_ebm`/`load_ddpm`/`save_ddpm`; the eager `reference`; the keyed `noise` stream;
the `Purifier` engine; `load_purified` for its output.
"""

from __future__ import annotations

from typing import Any

from puregen_fast import noise, reference
from puregen_fast.checkpoints import load_ddpm, load_ebm, save_ddpm, save_ebm
from puregen_fast.ebm import EBMSNGAN32
from puregen_fast.errors import CheckpointError, UsageError
from puregen_fast.purifier import Purifier
from puregen_fast.schedule import DDPMSchedule

__version__ = "0.1.0"

__all__ = [
    "EBMSNGAN32",
    "UNet2D",
    "DDPMSchedule",
    "Purifier",
    "load_ebm",
    "save_ebm",
    "load_ddpm",
    "save_ddpm",
    "load_purified",
    "noise",
    "reference",
    "UsageError",
    "CheckpointError",
]


def __getattr__(name: str) -> Any:  # modules built alongside, imported on first use
    if name == "UNet2D":
        from puregen_fast.unet import UNet2D

        return UNet2D
    if name == "load_purified":
        from puregen_fast.writer import load_purified

        return load_purified
    raise AttributeError(f"module 'puregen_fast' has no attribute {name!r}")
