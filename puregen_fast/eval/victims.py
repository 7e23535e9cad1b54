"""The victims of `eval experiment`: a classifier architecture and its options, parsed from
``--classifier ARCH[:KEY=VALUE,...]`` (`parse_classifier_spec`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from puregen_fast.errors import UsageError
from puregen_fast.eval.classifier import ARCHS, TrainConfig, default_config

__all__ = ["BP_PRESETS", "ClassifierSpec", "PAPER_RESNET18", "PRESETS", "parse_classifier_spec",
           "SPEC_KEYS"]


def _on_off(v: str) -> bool:
    return {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}[
        v.lower()
    ]


# classifier options a --classifier spec may set (TrainConfig fields), with their parsers
SPEC_KEYS: dict[str, Callable[[str], Any]] = {
    "epochs": float,
    "steps": int,
    "batch_size": int,
    "lr": float,
    "widths": lambda v: tuple(int(w) for w in v.replace("x", "/").split("/") if w),
    "crop_pad": int,
    "flip": _on_off,
    "tta": str,
    "whiten_eps": float,
    "momentum": float,
    "weight_decay": float,
    "label_smoothing": float,
    "schedule": str,
    "warmup_frac": float,
    "nesterov": _on_off,
    "pad_mode": str,
    "normalize": str,
    "optimizer": str,
    "milestones": lambda v: tuple(int(m) for m in v.split("/") if m),
    "pretrained": str,
    "train_params": str,
    "frozen_bn": _on_off,
}


# the authors' CIFAR ResNet-18 recipe (`puregen_fast.eval.protocols`, profile ``paper``);
# ``--classifier resnet18-paper[:KEY=VALUE,...]`` starts from it
PAPER_RESNET18: dict[str, Any] = {
    "epochs": 200.0, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "nesterov": False, "schedule": "step", "label_smoothing": 0.0, "crop_pad": 4,
    "pad_mode": "zeros", "flip": True, "tta": "none", "normalize": "cifar10",
}  # fmt: skip


# the authors' Bullseye Polytope victims (Configs/config.ini 101-140, utils/classifier.py
# 958-1069): their pretrained ResNet-18 (``pretrained=FILE``: ckpt-ResNet18-4800.t7 in their
# <data_dir>/PureGen_Models/transfer_models) with batch norm frozen (eval_BatchNorm) and a new
# linear head; no augmentation (utils/classifier.py 805-806), their normalisation; Adam,
# the rate x0.1 at the milestones (MultiStepLR per epoch). ``resnet18-bp-linear`` trains the
# head alone ([LINEAR_TRANSFER]: lr 0.1, 40 epochs, milestones 15/25/35, batch 64);
# ``resnet18-bp-finetune`` every weight but batch norm's ([FINE_TUNE]: lr 1e-4, 60 epochs,
# milestones 15/30/45, batch 128 from [DEFAULTS]); both weight decay 5e-4
_BP_COMMON: dict[str, Any] = {
    "optimizer": "adam", "weight_decay": 5e-4, "schedule": "milestones", "label_smoothing": 0.0,
    "crop_pad": 0, "flip": False, "tta": "none", "normalize": "cifar10", "frozen_bn": True,
}  # fmt: skip
BP_PRESETS: dict[str, dict[str, Any]] = {
    "resnet18-bp-linear": {**_BP_COMMON, "lr": 0.1, "epochs": 40.0, "batch_size": 64,
                           "milestones": (15, 25, 35), "train_params": "linear"},
    "resnet18-bp-finetune": {**_BP_COMMON, "lr": 1e-4, "epochs": 60.0, "batch_size": 128,
                             "milestones": (15, 30, 45), "train_params": "all"},
}  # fmt: skip
PRESETS = ("resnet18-paper", *BP_PRESETS)


@dataclass(frozen=True)
class ClassifierSpec:
    """One victim of the protocol: ``arch`` (`ARCHS`) with ``options`` (TrainConfig fields set
    over the preset's defaults), shown in the table as ``name``."""

    arch: str
    options: tuple[tuple[str, Any], ...] = ()
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.arch

    def config(self, seed: int) -> TrainConfig:
        return default_config(self.arch, seed=seed, **dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        opts = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        return {"arch": self.arch, "options": opts, "name": self.label}


def parse_classifier_spec(text: str) -> ClassifierSpec:
    """``ARCH[:KEY=VALUE,...]``, e.g. ``airbench:widths=32/64/64,steps=300`` or
    ``resnet18:widths=16,batch_size=64,flip=off``; ``name=...`` sets the table label.
    UsageError naming ``--classifier`` for an unknown architecture, key or value."""
    arch, _, rest = text.strip().partition(":")
    opts: dict[str, Any] = {}
    name = ""
    preset = arch
    if arch == "resnet18-paper":
        arch, opts, name = "resnet18", dict(PAPER_RESNET18), "resnet18-paper"
    elif arch in BP_PRESETS:
        arch, opts, name = "resnet18", dict(BP_PRESETS[arch]), arch
    if arch not in ARCHS:
        raise UsageError(f"--classifier {text!r}: unknown architecture {arch!r}; "
                         f"choose one of {', '.join([*ARCHS, *PRESETS])}")  # fmt: skip
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise UsageError(f"--classifier {text!r}: {item!r} is not KEY=VALUE")
        if key == "name":
            name = val.strip()
            continue
        if key not in SPEC_KEYS:
            raise UsageError(f"--classifier {text!r}: unknown option {key!r}; choose from "
                             f"{', '.join(['name', *SPEC_KEYS])}")  # fmt: skip
        try:
            opts[key] = SPEC_KEYS[key](val.strip())
        except (ValueError, KeyError):
            raise UsageError(f"--classifier {text!r}: bad value {val!r} for {key}") from None
    if arch == "airbench" and "widths" in opts and len(opts["widths"]) != 3:
        raise UsageError(f"--classifier {text!r}: airbench takes three widths, e.g. 32/64/64")
    if arch == "resnet18" and "widths" in opts and len(opts["widths"]) != 1:
        raise UsageError(f"--classifier {text!r}: resnet18 takes one base width, e.g. 16")
    if preset in BP_PRESETS and "pretrained" not in opts:  # else it would train from scratch
        raise UsageError(f"--classifier {text!r}: the authors' transfer victim starts from their "
                         f"pretrained ResNet-18; add pretrained=FILE (ckpt-ResNet18-4800.t7 of "
                         f"their <data_dir>/PureGen_Models/transfer_models)")  # fmt: skip
    return ClassifierSpec(arch, tuple(sorted(opts.items())), name)
