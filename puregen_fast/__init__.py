"""puregen-fast: PureGen data purification (arXiv 2405.18627) at GPU speed.

Public surface (DESIGN 3): models `EBMSNGAN32`, `UNet2D`; `DDPMSchedule`; checkpoints
`load_ebm`/`save_ebm`/`load_ddpm`/`save_ddpm`; the eager `reference`; the keyed `noise` stream;
the `Purifier` engine and its `PurifyConfig`; the samplers `LangevinSampler` and `DDPMSampler`;
`load_purified` for the engine's output; `make_preview` (`Preview`) for a before/after picture.

Each name is imported on first use (PEP 562), so importing one layer (``import
puregen_fast.sampling``) loads what that layer imports and nothing else: the package face does
not pull the data readers, the configuration and the engine into every import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from puregen_fast.version import __version__

if TYPE_CHECKING:  # the same names for type checkers and editors
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

# each public name -> the module that defines it (for `noise` and `reference`: the module itself)
_WHERE = {
    "EBMSNGAN32": "puregen_fast.models.ebm",
    "UNet2D": "puregen_fast.models.unet",
    "DDPMSchedule": "puregen_fast.models.schedule",
    "Purifier": "puregen_fast.purifier",
    "PurifyConfig": "puregen_fast.config",
    "LangevinSampler": "puregen_fast.sampling.backends",
    "DDPMSampler": "puregen_fast.sampling.backends",
    "load_ebm": "puregen_fast.models.checkpoints",
    "save_ebm": "puregen_fast.models.checkpoints",
    "load_ddpm": "puregen_fast.models.checkpoints",
    "save_ddpm": "puregen_fast.models.checkpoints",
    "load_purified": "puregen_fast.data.reader",
    "make_preview": "puregen_fast.data.preview",
    "Preview": "puregen_fast.data.preview",
    "noise": "puregen_fast.noise",
    "reference": "puregen_fast.reference",
    "UsageError": "puregen_fast.errors",
    "CheckpointError": "puregen_fast.errors",
    "DivergenceError": "puregen_fast.errors",
}

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


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(where)
    value = module if where == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
