"""puregen-fast: PureGen data purification (arXiv 2405.18627) at GPU speed.

Public surface (DESIGN 3): models `EBMSNGAN32`, `UNet2D`; `DDPMSchedule`; checkpoints
`load_ebm`/`save_ebm`/`load_ddpm`/`save_ddpm`; the eager `reference`; the keyed `noise` stream;
the `Purifier` engine and its `PurifyConfig`; the samplers `LangevinSampler` and `DDPMSampler`;
`load_purified` for the engine's output; `make_preview` (`Preview`) for a before/after picture.
"""

from __future__ import annotations

from puregen_fast import noise, reference
from puregen_fast.config import PurifyConfig
from puregen_fast.data.preview import Preview, make_preview
from puregen_fast.data.reader import load_purified
from puregen_fast.errors import CheckpointError, DivergenceError, UsageError
from puregen_fast.models.checkpoints import load_ddpm, load_ebm, save_ddpm, save_ebm
from puregen_fast.models.ebm import EBMSNGAN32
from puregen_fast.models.schedule import DDPMSchedule
from puregen_fast.models.unet import UNet2D
from puregen_fast.purifier import Purifier
from puregen_fast.sampling.backends import DDPMSampler, LangevinSampler
from puregen_fast.version import __version__

__all__ = [
    "EBMSNGAN32",
    "UNet2D",
    "DDPMSchedule",
    "Purifier",
    "PurifyConfig",
    "LangevinSampler",
    "DDPMSampler",
    "load_ebm",
    "save_ebm",
    "load_ddpm",
    "save_ddpm",
    "load_purified",
    "make_preview",
    "Preview",
    "noise",
    "reference",
    "UsageError",
    "CheckpointError",
    "DivergenceError",
    "__version__",
]
