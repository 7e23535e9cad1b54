"""Classifiers for the paper's evaluation: a fast airbench-style net and the CIFAR ResNet-18.

``--arch airbench`` (default) follows the ideas of Keller Jordan's cifar10-airbench (our own
code, not a copy): a frozen 2x2 patch-whitening convolution initialised from the training
images' patch covariance, three conv groups (conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN -
GELU, widths 64/256/256), global max pool and a scaled bias-free linear head; BatchNorm with a
frozen unit scale; SGD with Nesterov momentum on the *summed* label-smoothed loss, norm biases
at a 64x learning rate, a triangular (linear warm-up then linear decay) schedule; flip test-time
augmentation. ``--arch resnet18`` is the CIFAR ResNet-18 the paper trains (3x3 stem, no max
pool, BasicBlocks [2, 2, 2, 2]; torchvision-free), trained as the authors' config does: SGD
(lr 0.1, momentum 0.9, weight decay 5e-4, here with Nesterov), batch 128, 200 epochs, the
learning rate divided by 10 at epochs 100 and 150, plain cross-entropy.

The whole training set lives on the device as one uint8 tensor; each epoch is a permutation
drawn on the device, and each batch is normalised, randomly cropped (reflect padding) and
flipped there, so no DataLoader workers are involved. The running loss and accuracy are summed
on the device as well and read once per epoch (and by the progress bar at most twice a second),
so the host does not wait for the device at every step. Any image size works (the pools adapt),
not only 32x32.

Small sets. A preset made for CIFAR-10's 50,000 images is far too short on a set of a thousand:
airbench's batch 1024 x 10 epochs is 20 optimiser steps on 1,257 images, and such a net is
still far from what the set supports. So each preset, unless the batch size or the
length is given, halves its batch (not below 32) until an epoch has at least 8 steps and runs at
least 400 steps in all (``min_steps_per_epoch``, ``min_steps``; on CIFAR-10 neither rule
changes anything). ``steps`` sets the length in optimiser steps instead of epochs; ``flip`` and
``crop_pad`` turn the augmentation on or off. After training, `fit_accuracy` measures the net on
its own training images without augmentation; under 90% it is undertrained and `eval` warns.

Speed and accuracy as measured on a 2-core x86_64 CPU (torch 2.13, float32); no figure is
claimed for CIFAR-10 or for a GPU:

* full-size nets on 512 synthetic 32x32 images, 2 threads: airbench (64/256/256) trains at
  about 107 images/s and predicts at about 237 images/s with flip TTA (99.6% held-out accuracy
  on that easy 4-class set after 2 epochs); resnet18 (width 64) trains at about 21 images/s
  and predicts at about 116 images/s;
* the small sets of ``tests/eval/test_eval.py`` (320 16x16 images, 4 classes, airbench widths
  16/32/32, 1 thread): 5,000-7,000 training images/s; 99-100% held-out accuracy after 6 epochs
  for seeds 0-5, and 16-44% (chance 25%) with shuffled labels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from puregen_fast.errors import UsageError
from puregen_fast.runtime import resolve_device

__all__ = [
    "ARCHS",
    "NORMALIZE",
    "PAD_MODES",
    "TrainConfig",
    "Classifier",
    "AirbenchNet",
    "ResNet18",
    "build_model",
    "default_config",
    "load_pretrained",
    "fit_accuracy",
    "plan_length",
    "schedule_factor",
    "train_classifier",
    "undertrained_message",
]

# Whitening caveat. The 2x2 whitening filters scale each patch direction by
# 1 / sqrt(eigenvalue + whiten_eps) of the *training* set. A training set without the high
# frequencies the test set has (strong purification or JPEG of tiny images) gets huge gains on
# exactly those directions, and clean test images then land far outside what the net saw:
# trained on JPEG-q75 16x16 synthetic images, it reached 100% train but 29% (chance) test
# accuracy at whiten_eps 5e-4, 82% at 1e-2 and 100% at 5e-2. ``eval run`` warns on that pattern.

ARCHS = ("airbench", "resnet18")
PAD_MODES = ("reflect", "zeros")
SCHEDULES = ("triangular", "step", "milestones")
OPTIMIZERS = ("sgd", "adam")
# the authors' normalisation constants (mean, std), utils/classifier.py lines 32-39; CINIC-10
# and STL-10 use CIFAR-10's
NORMALIZE: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


# ----------------------------------------------------------------------------- models


class _Pool2(nn.Module):
    """2x2 max pool that leaves maps smaller than 2 alone (so tiny images still work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2:
            return x
        return F.max_pool2d(x, 2)


class _BN(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale and a learnt shift (as airbench)."""

    def __init__(self, c: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(c, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class _ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = _Pool2()
        self.norm1 = _BN(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _BN(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """The airbench-style net: whitening conv (2x2, frozen weights, learnt bias) then three
    conv groups, global max pool, bias-free linear head scaled by 1/9."""

    def __init__(
        self, num_classes: int, widths: Sequence[int] = (64, 256, 256), whiten_width: int = 24
    ) -> None:
        super().__init__()
        if whiten_width % 2:
            raise ValueError("whiten_width must be even (filters come in +- pairs)")
        self.whiten = nn.Conv2d(3, whiten_width, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        chans = [whiten_width, *widths]
        self.groups = nn.Sequential(*[_ConvGroup(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        self.scale = 1 / 9
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                # identity-like init of the first in_channels filters (airbench's dirac init)
                w = m.weight.data
                k = min(w.shape[0], w.shape[1])
                torch.nn.init.dirac_(w[:k])

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the 2x2 patches of ``x`` (normalised, (N, 3, H, W)): the
        eigenvectors of their covariance scaled by 1/sqrt(eigenvalue), with their negatives."""
        h, w = x.shape[-2:]
        if h < 2 or w < 2:
            raise ValueError("images must be at least 2x2")
        c = x.shape[1]
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1)  # (N, C, H-1, W-1, 2, 2)
        patches = patches.transpose(1, 3).reshape(-1, c * 4).double()
        patches = patches - patches.mean(0, keepdim=True)
        cov = patches.T @ patches / max(1, patches.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        n = self.whiten.out_channels // 2
        if n > evecs.shape[1]:
            raise ValueError(f"whiten_width {2 * n} > 2 x patch dimension {2 * evecs.shape[1]}")
        filt = (evecs[:, :n] / torch.sqrt(evals[:n].clamp_min(0) + eps)).T
        filt = filt.reshape(n, c, 2, 2).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filt, -filt]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.whiten(x))
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.scale


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max pool; 11.2M parameters for 10 classes). ``width``
    scales the channel counts (64 is the standard net)."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def build_model(arch: str, num_classes: int, *, widths: Sequence[int] | None = None) -> nn.Module:
    """``airbench`` (``widths`` = its three group widths, default 64/256/256) or ``resnet18``
    (``widths`` = one base width, default 64)."""
    if arch == "airbench":
        return AirbenchNet(num_classes, tuple(widths) if widths else (64, 256, 256))
    if arch == "resnet18":
        if widths and len(widths) != 1:
            raise UsageError("--widths: resnet18 takes one base width (default 64)")
        return ResNet18(num_classes, int(widths[0]) if widths else 64)
    raise UsageError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------- transfer


def load_pretrained(model: nn.Module, path: str) -> None:
    """``model``'s weights, all but its linear head, from ``path``: a torch.save file of a state
    dict or of {"net": state dict} (the Bullseye Polytope checkpoints the authors load,
    utils/classifier.py 981-986, keys "module."-prefixed), read by the restricted reader of the
    poison files (no code in it runs). UsageError naming ``pretrained`` when the file is not
    such a state dict or does not fit the net."""
    from pathlib import Path

    from puregen_fast.eval.poisons import read_torch_file

    obj = read_torch_file(Path(path).expanduser(), "pretrained")
    sd = obj.get("net", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"pretrained {path}: not a state dict (or {{'net': state dict}}) of "
                         "tensors")  # fmt: skip
    sd = {str(k).removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    body = {k: v for k, v in sd.items() if not k.startswith("linear.")}
    missing = [k for k in own if not k.startswith("linear.") and k not in body]
    extra = [k for k in body if k not in own]
    shapes = [k for k in body if k in own and tuple(body[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        raise UsageError(
            f"pretrained {path}: does not fit the net (missing {missing[:3]}, unexpected "
            f"{extra[:3]}, other shapes {shapes[:3]}); a CIFAR ResNet-18 of this width expected"
        )
    with torch.no_grad():
        for k, v in body.items():
            own[k].copy_(v.to(own[k].dtype))


def _freeze(model: nn.Module, cfg: TrainConfig) -> None:
    """What does not train: batch norm's scale and shift (``frozen_bn``), everything but the
    linear head (``train_params="linear"``)."""
    for name, p in model.named_parameters():
        in_bn = isinstance(model.get_submodule(name.rpartition(".")[0]), nn.BatchNorm2d)
        if (cfg.frozen_bn and in_bn) or (cfg.train_params == "linear"
                                         and not name.startswith("linear.")):  # fmt: skip
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- training


# the crop pads each batch before it crops: a pad of 1024 at batch 1024 asked for 53 GB; the
# paper pads 4, and a pad past the image's own size crops mostly padding
MAX_CROP_PAD = 32


@dataclass
class TrainConfig:
    """Training settings. ``default_config(arch)`` gives each architecture's defaults.

    airbench: ``lr`` is per kilo-step (airbench's convention: divided by
    ``1024 * (1 + 1 / (1 - momentum))`` and applied to the summed loss) and ``weight_decay``
    is scaled the same way; resnet18: plain SGD values on the mean loss.
    """

    arch: str = "airbench"
    epochs: float = 10.0
    batch_size: int = 1024
    lr: float = 11.5
    momentum: float = 0.85
    weight_decay: float = 0.0153
    label_smoothing: float = 0.2
    bias_scaler: float = 64.0
    warmup_frac: float = 0.23
    schedule: str = "triangular"
    crop_pad: int = 2  # at most MAX_CROP_PAD
    # ``reflect`` (ours) or ``zeros``: black pixels, torchvision's RandomCrop(padding=4) as the
    # authors use it (the padding is added before normalisation)
    pad_mode: str = "reflect"
    flip: bool = True
    tta: str = "flip"
    whiten_bias_epochs: float = 3.0
    whiten_eps: float = 5e-4
    widths: tuple[int, ...] | None = None
    nesterov: bool = True  # the authors' ResNet-18: plain momentum SGD
    # ``data``: the training set's own per-channel mean and std; ``cifar10`` or
    # ``tinyimagenet``: the authors' fixed constants (`NORMALIZE`)
    normalize: str = "data"
    seed: int = 0
    # length by optimiser steps: ``steps`` (when set) replaces ``epochs``
    steps: int | None = None
    # sized to the set (module docstring, "Small sets"): at least ``min_steps`` optimiser steps
    # in all and ``min_steps_per_epoch`` per epoch (the batch is halved until it fits); 0 = off
    min_steps: int = 0
    min_steps_per_epoch: int = 0
    # transfer learning (resnet18; the authors' Bullseye Polytope victims, utils/classifier.py
    # 958-1069): ``optimizer`` ``sgd`` (momentum, ``nesterov``) or ``adam`` (betas 0.9, 0.999,
    # the decay added to the gradient as torch.optim.Adam does); ``schedule="milestones"``: the
    # rate x0.1 at each epoch of ``milestones`` (MultiStepLR stepped per epoch); ``pretrained``:
    # a torch.save file of a state dict (or {"net": state dict}, keys maybe "module."-prefixed)
    # whose weights the net starts from, all but the linear head, which starts fresh;
    # ``train_params`` ``all`` or ``linear`` (a linear probe: only the head trains);
    # ``frozen_bn``: batch norm's statistics, scale and shift kept as loaded (their
    # eval_BatchNorm, models/Classifiers.py 118-130)
    optimizer: str = "sgd"
    milestones: tuple[int, ...] = ()
    pretrained: str | None = None
    train_params: str = "all"
    frozen_bn: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths) if self.widths else None
        d["milestones"] = list(self.milestones)
        return d


def default_config(arch: str, **overrides) -> TrainConfig:
    """The defaults for ``arch``, with ``overrides`` (None values are ignored).

    The presets size themselves to small sets (module docstring): an explicit ``batch_size``
    turns the batch rule off, an explicit ``epochs`` or ``steps`` the minimum length."""
    if arch == "airbench":
        cfg = TrainConfig(arch="airbench", min_steps=400, min_steps_per_epoch=8)
    elif arch == "resnet18":
        cfg = TrainConfig(
            arch="resnet18",
            epochs=200.0,
            batch_size=128,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            label_smoothing=0.0,
            bias_scaler=1.0,
            warmup_frac=0.0,
            schedule="step",
            crop_pad=4,
            tta="none",
            whiten_bias_epochs=0.0,
            min_steps=400,
            min_steps_per_epoch=8,
        )
    else:
        raise UsageError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    for k, v in overrides.items():
        if v is None:
            continue
        if not hasattr(cfg, k):
            raise TypeError(f"unknown training setting {k!r}")
        setattr(cfg, k, v)
    if overrides.get("batch_size") is not None:
        cfg.min_steps_per_epoch = 0
    if overrides.get("epochs") is not None or overrides.get("steps") is not None:
        cfg.min_steps = 0
    return cfg


def batch_starts(n: int, bs: int) -> list[int]:
    """Where each batch of an epoch over ``n`` images starts: every ``bs``, except that a last
    batch of one image joins the one before (batch norm cannot train on one image)."""
    starts = list(range(0, n, bs))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return starts


def plan_length(n: int, cfg: TrainConfig) -> tuple[int, int]:
    """The batch size and the total number of optimiser steps ``cfg`` gives on ``n`` images."""
    bs = max(1, min(cfg.batch_size, n))
    while cfg.min_steps_per_epoch and bs > 32 and math.ceil(n / bs) < cfg.min_steps_per_epoch:
        bs //= 2
    per_epoch = len(batch_starts(n, bs))
    total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * per_epoch)
    return bs, max(1, total, cfg.min_steps)


def _to_float(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    x = x_u8.permute(0, 3, 1, 2).float().div_(255)
    return (x - mean) / std


def _augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator | None,
             fill: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Random crop and horizontal flip of a batch, on its device. The crop pads by ``pad``:
    reflecting the image, or with ``fill`` (per channel, (1, C, 1, 1): black after the
    normalisation, for the authors' zero padding)."""
    n, _, h, w = x.shape
    if pad > 0:
        if fill is not None:
            xp = F.pad(x - fill, (pad,) * 4) + fill
        else:
            mode = "reflect" if pad < min(h, w) else "replicate"
            xp = F.pad(x, (pad,) * 4, mode=mode)
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
        idx = torch.arange(n, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)  # (n, c, h, w)
    if flip:
        m = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


@dataclass
class Classifier:
    """A trained classifier: the model, the input normalisation and the test-time
    augmentation. ``predict``/``logits`` take uint8 NHWC images."""

    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    tta: str = "none"
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images_per_s: float = 0.0

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        self.model.eval()
        out = []
        for s in range(0, len(images), batch_size):
            xb = torch.from_numpy(np.array(images[s : s + batch_size], dtype=np.uint8))
            x = _to_float(xb.to(self.device), self.mean, self.std)
            z = self.model(x)
            if self.tta == "flip":
                z = z + self.model(x.flip(-1))
            out.append(z.float().cpu())
        if not out:
            return np.zeros((0, 0), np.float32)
        return torch.cat(out).numpy()

    def predict(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class indices (int64) of uint8 NHWC ``images``."""
        if len(images) == 0:
            return np.zeros(0, np.int64)
        return self.logits(images, batch_size).argmax(1).astype(np.int64)


def _lr_factor(step: int, total: int, warmup_frac: float, schedule: str = "triangular") -> float:
    """``triangular``: 0.2 -> 1 linearly over the warm-up, then linearly to 0. ``step``: 1, then
    0.1 from half-way and 0.01 from three quarters (the paper's ResNet-18 MultiStepLR at
    epochs 100 and 150 of 200)."""
    if schedule == "step":
        return 1.0 if step < total // 2 else 0.1 if step < (3 * total) // 4 else 0.01
    w = max(1, int(warmup_frac * total))
    if step < w:
        return 0.2 + 0.8 * step / w
    return max(0.0, (total - step) / max(1, total - w))


def schedule_factor(cfg: TrainConfig, step: int, total: int, epoch: int) -> float:
    """The factor on the base rate at optimiser step ``step`` of ``total`` in epoch ``epoch``:
    ``milestones`` x0.1 from each milestone epoch on (MultiStepLR, gamma 0.1, stepped once per
    epoch), else `_lr_factor`."""
    if cfg.schedule == "milestones":
        return 0.1 ** sum(epoch >= m for m in cfg.milestones)
    return _lr_factor(step, total, cfg.warmup_frac, cfg.schedule)


def _check_inputs(x: np.ndarray, y: np.ndarray, num_classes: int, cfg: TrainConfig) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise UsageError(f"training images must be uint8 (N, H, W, 3), got {x.dtype}")
    if y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise UsageError(f"{x.shape[0]} training images but labels of shape {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise UsageError(f"training labels must be in [0, {num_classes - 1}]")
    if cfg.epochs <= 0 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise UsageError("--epochs, --batch-size and --lr must be > 0")
    if min(cfg.batch_size, x.shape[0]) < 2:  # batch norm cannot train on one image
        raise UsageError(
            f"training needs batches of at least 2 images (batch norm); got --batch-size "
            f"{cfg.batch_size} and {x.shape[0]} training image(s)"
        )
    if cfg.steps is not None and cfg.steps < 1:
        raise UsageError(f"--steps {cfg.steps}: must be >= 1")
    if not 0 <= cfg.crop_pad <= MAX_CROP_PAD:
        raise UsageError(f"--crop-pad {cfg.crop_pad}: must be in [0, {MAX_CROP_PAD}]")
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if cfg.schedule == "milestones" and (
        not cfg.milestones or any(not 0 < m for m in cfg.milestones)
        or list(cfg.milestones) != sorted(set(cfg.milestones))
    ):  # fmt: skip
        raise UsageError(f"milestones {list(cfg.milestones)}: schedule milestones needs "
                         "increasing epochs > 0, e.g. milestones=15/25/35")  # fmt: skip
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.train_params not in ("all", "linear"):
        raise UsageError(f"train_params {cfg.train_params!r}: choose all or linear")
    transfer = cfg.pretrained is not None or cfg.train_params != "all" or cfg.frozen_bn
    if transfer and cfg.arch != "resnet18":
        raise UsageError(f"pretrained, train_params and frozen_bn apply to resnet18, not "
                         f"{cfg.arch}")  # fmt: skip
    if cfg.pad_mode not in PAD_MODES:
        raise UsageError(f"pad_mode {cfg.pad_mode!r}: choose one of {', '.join(PAD_MODES)}")
    if cfg.normalize != "data" and cfg.normalize not in NORMALIZE:
        raise UsageError(f"normalize {cfg.normalize!r}: choose data or one of "
                         f"{', '.join(NORMALIZE)}")  # fmt: skip


def _to_device(x: np.ndarray, y: np.ndarray, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """The whole training set on the device: images uint8 NHWC, labels int64."""
    def writable(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        # read-only arrays (load_purified's memmaps): torch warns on them, and wants writable
        return a if a.flags.writeable else a.copy()

    return torch.from_numpy(writable(x)).to(dev), torch.from_numpy(writable(y)).to(dev)


def _channel_stats(x_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the training set, in one pass on the device."""
    xf = x_u8.float().div_(255)
    mean = xf.mean(dim=(0, 1, 2)).view(1, 3, 1, 1)
    std = xf.std(dim=(0, 1, 2)).clamp_min(1e-3).view(1, 3, 1, 1)
    return mean, std


def _optimizer(model: nn.Module, cfg: TrainConfig, bs: int) -> torch.optim.Optimizer:
    """SGD (or Adam: ``cfg.optimizer``) over the parameters that train, each group's base rate
    in ``initial_lr`` (the schedule scales it)."""
    if cfg.arch == "airbench":
        kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
        lr = cfg.lr / kilostep
        wd = cfg.weight_decay * bs / kilostep
        whiten_bias = model.whiten.bias
        norm_biases = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
        others = [
            p
            for k, p in model.named_parameters()
            if "norm" not in k and p.requires_grad and p is not whiten_bias
        ]
        # SGD couples decay to the learning rate; dividing by it makes the decay per step
        # independent of the lr (airbench's convention)
        lr_b = lr * cfg.bias_scaler
        groups = [
            {"params": norm_biases, "lr": lr_b, "weight_decay": wd / lr_b},
            {"params": [whiten_bias], "lr": lr, "weight_decay": wd / lr},
            {"params": others, "lr": lr, "weight_decay": wd / lr},
        ]
    else:
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
             "weight_decay": cfg.weight_decay}
        ]  # fmt: skip
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov)


@dataclass
class _Run:
    """What every training step needs: the data on the device, the model and its optimiser,
    and the step count."""

    cfg: TrainConfig
    dev: torch.device  # as resolved (``cuda``, not the tensors' ``cuda:0``): the record says it
    x_u8: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    gen: torch.Generator
    model: nn.Module
    fmt: torch.memory_format
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    summed: bool  # loss summed over the batch (airbench), else its mean
    bs: int
    total_steps: int
    step: int = 0
    seen: int = 0


def _prepare(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    cfg: TrainConfig,
    device: str | torch.device,
) -> _Run:
    """Checks, the data on the device, its statistics, the model (whitening initialised from
    the data) and the optimiser. Seeds first, so a seed fixes the whole run."""
    x_np = np.asarray(images)
    y_np = np.asarray(labels, dtype=np.int64)
    _check_inputs(x_np, y_np, num_classes, cfg)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    x_u8, y = _to_device(x_np, y_np, dev)
    n = x_u8.shape[0]
    if cfg.normalize == "data":
        mean, std = _channel_stats(x_u8)
    else:
        m, sd = NORMALIZE[cfg.normalize]
        mean = torch.tensor(m, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(sd, device=dev).view(1, 3, 1, 1)

    model = build_model(cfg.arch, num_classes, widths=cfg.widths)
    if cfg.pretrained is not None:  # the head stays as built: fresh, as the authors' new Linear
        load_pretrained(model, cfg.pretrained)
    _freeze(model, cfg)
    model = model.to(dev)
    if isinstance(model, AirbenchNet):
        sample = x_u8[torch.randperm(n, device=dev, generator=gen)[:5000]]
        model.init_whitening(_to_float(sample, mean, std), eps=cfg.whiten_eps)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)

    bs, total_steps = plan_length(n, cfg)
    summed = cfg.arch == "airbench"
    loss_fn = nn.CrossEntropyLoss(
        label_smoothing=cfg.label_smoothing, reduction="sum" if summed else "mean"
    )
    opt = _optimizer(model, cfg, bs)
    return _Run(
        cfg, dev, x_u8, y, mean, std, gen, model, fmt, opt, loss_fn, summed, bs, total_steps
    )


def _step(run: _Run, idx: torch.Tensor, yb: torch.Tensor, epoch: int) -> tuple[torch.Tensor, ...]:
    """One optimiser step on the images ``idx``; the loss and the logits stay on the device."""
    cfg = run.cfg
    fill = (0 - run.mean) / run.std if cfg.pad_mode == "zeros" else None
    xb = _augment(_to_float(run.x_u8[idx], run.mean, run.std), cfg.crop_pad, cfg.flip, run.gen,
                  fill)  # fmt: skip
    xb = xb.contiguous(memory_format=run.fmt)
    f = schedule_factor(cfg, run.step, run.total_steps, epoch)
    for g in run.opt.param_groups:
        g["lr"] = g["initial_lr"] * f
    if cfg.arch == "airbench" and epoch >= cfg.whiten_bias_epochs:
        run.opt.param_groups[1]["lr"] = 0.0  # airbench: the whitening bias trains early only
    out = run.model(xb)
    loss = run.loss_fn(out, yb)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.step += 1
    return loss.detach(), out.detach()


_LOG_EVERY_S = 0.5  # seconds between the progress bar's loss readings


def _epoch(run: _Run, epoch: int, bar: Any, t0: float) -> dict:
    """One pass over a fresh permutation (cut short at the last step). The running loss and
    accuracy are summed on the device and read at the end of the epoch (and when the bar shows
    the loss), so the host does not wait for the device at every step."""
    run.model.train()
    if run.cfg.frozen_bn:  # statistics kept as loaded (the authors' eval_BatchNorm)
        for m in run.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    dev = run.dev
    n = run.x_u8.shape[0]
    perm = torch.randperm(n, device=dev, generator=run.gen)
    acc = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
    loss_sum = torch.zeros((), dtype=acc, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    sizes: dict[int, torch.Tensor] = {}  # batch sizes as device scalars (see below)
    count, logged = 0, time.perf_counter()
    starts = batch_starts(n, run.bs)
    for i, s in enumerate(starts):
        if run.step >= run.total_steps:
            break
        idx = perm[s : starts[i + 1] if i + 1 < len(starts) else n]
        yb = run.y[idx]
        loss, out = _step(run, idx, yb, epoch)
        m = idx.shape[0]
        if m not in sizes:
            sizes[m] = torch.full((), m, dtype=acc, device=dev)
        # the per-image loss as float64 host arithmetic gives it: a true division (CUDA turns
        # division by a host scalar into a multiplication by its reciprocal)
        lv = loss.to(acc) / sizes[m] if run.summed else loss.to(acc)
        loss_sum += lv * m
        correct += (out.argmax(1) == yb).sum()
        count += m
        run.seen += m
        bar.update(m)
        now = time.perf_counter()
        if not bar.disable and now - logged >= _LOG_EVERY_S:  # reading lv waits for the device
            logged = now
            rate = run.seen / max(1e-9, now - t0)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(lv):.3f}", img_s=f"{rate:.0f}")
    return {
        "epoch": epoch + 1,
        "loss": float(loss_sum) / max(1, count),
        "train_acc": int(correct) / max(1, count),
        "images": count,
        "seconds": time.perf_counter() - t0,
    }


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    quiet: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> Classifier:
    """Train ``config.arch`` on ``images`` (uint8 NHWC) and ``labels`` from scratch.

    The data set is moved to the device once; normalisation uses the training set's
    per-channel mean and std. Deterministic for a seed on one device (CPU; cuDNN may pick
    non-deterministic kernels on a GPU). ``on_epoch`` receives each epoch's record.
    """
    from tqdm.auto import tqdm

    cfg = config or default_config("airbench")
    run = _prepare(images, labels, num_classes, cfg, device)
    dev = run.dev
    n = run.x_u8.shape[0]
    full, rem = divmod(run.total_steps, len(batch_starts(n, run.bs)))
    history: list[dict] = []
    t0 = time.perf_counter()
    with tqdm(
        total=full * n + min(rem * run.bs, n),
        disable=quiet,
        unit="img",
        desc=f"train {cfg.arch}",
        dynamic_ncols=True,
        leave=False,
    ) as bar:
        epoch = 0
        while run.step < run.total_steps:
            rec = _epoch(run, epoch, bar, t0)
            history.append(rec)
            if on_epoch is not None:
                on_epoch(rec)
            epoch += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    tta = cfg.tta if cfg.tta in ("none", "flip") else "none"
    rate = run.seen / secs if secs > 0 else 0.0
    record = {**cfg.as_dict(), "batch_size_used": run.bs, "total_steps": run.total_steps}
    return Classifier(run.model.eval(), run.mean, run.std, dev, tta, record, history, secs, rate)


UNDERTRAINED_FIT = 0.9  # below this accuracy on its own (clean, unaugmented) training images


def fit_accuracy(
    clf: Classifier, images: np.ndarray, labels: np.ndarray, max_images: int = 2000
) -> float:
    """Accuracy of ``clf`` on (at most ``max_images`` evenly spaced) training images, without
    augmentation. A net that does not fit its own training set was stopped too early: its test
    accuracy is below what the set supports (see `undertrained_message`)."""
    n = len(labels)
    if n == 0:
        return float("nan")
    idx = np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64)
    pred = clf.predict(np.asarray(images)[idx])
    return float((pred == np.asarray(labels)[idx]).mean())


def undertrained_message(fit: float, clf: Classifier) -> str | None:
    """A warning when ``fit`` (`fit_accuracy`) is under `UNDERTRAINED_FIT`, else None."""
    if not fit < UNDERTRAINED_FIT:
        return None
    c = clf.config
    return (
        f"the {c.get('arch')} net reached only {100 * fit:.0f}% accuracy on its own training "
        f"images after {c.get('total_steps')} optimiser steps of batch {c.get('batch_size_used')}: "
        f"it is undertrained, so its natural accuracy and poison success say little about the "
        f"data; train longer (--steps or --epochs) or with a smaller --batch-size"
    )
