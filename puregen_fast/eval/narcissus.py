"""Narcissus trigger synthesis (Zeng et al., "Narcissus: A Practical Clean-Label Backdoor Attack
with Limited Information", CCS 2023): the attack the PureGen paper defends against, made here
rather than only read from the authors' files (`puregen_fast.eval.poisons`).

The attacker knows examples of the target class only, plus public out-of-distribution (POOD)
images. Two steps:

1. **Surrogate.** A classifier is trained on the POOD images (their own classes) together with
   the target-class examples as one more class (`train_classifier`, with its random-crop and
   flip augmentation).
2. **Trigger.** A pattern ``delta`` of shape (1, 3, h, w) in the [-1, 1] image space, bounded by
   ``|delta| <= eps`` (L-inf; default 2 * 16/255, i.e. 16 pixel levels, Narcissus' default), is
   optimised with RAdam so that the surrogate classifies ``clamp(x + delta, -1, 1)`` as the
   target class for augmented (random crop, flip) target-class examples ``x``: the trigger
   becomes the most salient feature of the target class. The pattern is added at the top-left
   corner (offset (0, 0)), as the Narcissus and PureGen code apply it. Each round is one pass
   over the target examples; the pattern of the round with the lowest mean loss is kept.

The result is written in the Narcissus ``.npy`` format (float32 (1, 3, h, w), the
``best_noise_lab<k>.npy`` files `puregen_fast.eval.poisons` reads and
`puregen_fast.eval.poison.apply_trigger` applies). Test time multiplies it (x1, x3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from puregen_fast.errors import UsageError
from puregen_fast.eval.classifier import (
    Classifier,
    TrainConfig,
    default_config,
    train_classifier,
)
from puregen_fast.eval.poison import apply_trigger, check_trigger
from puregen_fast.runtime import resolve_device

__all__ = [
    "NarcissusConfig",
    "NarcissusResult",
    "TriggerReport",
    "check_on_victim",
    "judge_trigger",
    "resize_images",
    "synthesize_narcissus",
    "target_rate",
]


@dataclass
class NarcissusConfig:
    """Settings of `synthesize_narcissus`.

    ``eps``: the L-inf bound in the [-1, 1] space (2 * 16/255 = 16 pixel levels); ``size``:
    the trigger's (h, w), at the top-left corner (Narcissus: 32x32, the whole CIFAR image);
    ``rounds``: passes of the trigger optimisation over the target examples; ``lr``: RAdam's
    rate (Narcissus: 0.01); ``surrogate_*``: the surrogate classifier (`default_config`;
    airbench by default: on 16x16 tiles of scikit-image's photos, with the same 10 epochs and
    100 rounds, a width-16 ResNet-18 surrogate started the trigger's loss at 0.1 (it already
    read the target examples as the target) and its trigger moved 47% of the held-apart
    images at x3, against 100% for a width-16 airbench one);
    ``crop_pad`` / ``flip``: the augmentation of the target examples while the trigger is
    optimised.
    """

    eps: float = 2 * 16 / 255
    size: tuple[int, int] = (32, 32)
    rounds: int = 200
    lr: float = 0.01
    batch_size: int = 128
    crop_pad: int = 4
    flip: bool = True
    surrogate_arch: str = "airbench"
    surrogate_epochs: float = 20.0
    surrogate_batch_size: int = 128
    surrogate_lr: float | None = None
    surrogate_widths: tuple[int, ...] | None = None
    seed: int = 0

    def check(self, image_hw: tuple[int, int]) -> None:
        """UsageError (naming the flag) for a value out of range or a trigger that does not fit."""
        if not (math.isfinite(self.eps) and 0 < self.eps <= 2):
            raise UsageError(f"--eps {self.eps}: must be in (0, 2] (the [-1, 1] image space)")
        h, w = self.size
        if h < 1 or w < 1 or h > image_hw[0] or w > image_hw[1]:
            raise UsageError(
                f"--size {h} {w}: the trigger must fit in the {image_hw[0]}x{image_hw[1]} images"
            )
        for flag, v in (("--rounds", self.rounds), ("--batch-size", self.batch_size)):
            if v < 1:
                raise UsageError(f"{flag} {v}: must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr {self.lr}: must be > 0")


@dataclass
class NarcissusResult:
    """``trigger``: float32 (1, 3, h, w); ``surrogate``: the trained surrogate; its class
    ``target_label`` is the target class (the POOD classes come first); ``history``: the mean
    loss of each round; ``best_round``: the round whose pattern was kept."""

    trigger: np.ndarray
    surrogate: Classifier
    target_label: int
    history: list[float] = field(default_factory=list)
    best_round: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


def resize_images(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 NHWC images resized to ``hw`` (antialiased bilinear; POOD sets such as
    Tiny-ImageNet are 64x64 where CIFAR-10 is 32x32, and Narcissus resizes them the same way)."""
    x = np.asarray(images)
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    out = []
    for s in range(0, len(x), 1024):
        t = torch.from_numpy(np.ascontiguousarray(x[s : s + 1024])).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
        out.append(t.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, *hw, 3), np.uint8)


def _augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (reflect padding ``pad``) and horizontal flip of each image of a batch."""
    n, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad,) * 4, mode="reflect" if pad < min(h, w) else "replicate")
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        idx = torch.arange(n, device=x.device)[:, None, None, None]
        ch = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[idx, ch, rows, cols]
    if flip:
        m = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x


def _optimise_trigger(
    clf: Classifier,
    target_u8: np.ndarray,
    label: int,
    cfg: NarcissusConfig,
    dev: torch.device,
    progress: Callable[[int, float], None] | None,
) -> tuple[np.ndarray, list[float], int]:
    """Step 2 of the module doc. Returns the best pattern, the per-round losses, its round."""
    model = clf.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(np.ascontiguousarray(target_u8)).to(dev)
    x = x.permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)  # [-1, 1], as the trigger's space
    n, _, hh, ww = x.shape
    th, tw = cfg.size
    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    delta = torch.zeros(1, 3, th, tw, device=dev, requires_grad=True)
    opt = torch.optim.RAdam([delta], lr=cfg.lr)
    y = torch.full((min(cfg.batch_size, n),), label, dtype=torch.long, device=dev)
    bs = min(cfg.batch_size, n)
    best = torch.zeros(1, 3, th, tw, device=dev)
    best_loss, best_round, history = math.inf, 0, []
    for r in range(cfg.rounds):
        perm = torch.randperm(n, device=dev, generator=gen)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for s in range(0, n, bs):
            xb = _augment(x[perm[s : s + bs]], cfg.crop_pad, cfg.flip, gen)
            d = delta.clamp(-cfg.eps, cfg.eps)
            patch = F.pad(d, (0, ww - tw, 0, hh - th))  # at offset (0, 0), zero elsewhere
            u = (xb + patch).clamp(-1, 1).add(1).div(2)
            logits = model((u - clf.mean) / clf.std)
            loss = F.cross_entropy(logits, y[: xb.shape[0]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double() * xb.shape[0]
        mean_loss = float(loss_sum) / n  # one read of the device per round
        history.append(mean_loss)
        if mean_loss < best_loss:
            # the pattern the round's loss was measured with (Narcissus keeps the same one)
            best_loss, best_round = mean_loss, r
            best = delta.detach().clamp(-cfg.eps, cfg.eps).clone()
        if progress is not None:
            progress(r, mean_loss)
    return best.cpu().numpy().astype(np.float32), history, best_round


def synthesize_narcissus(
    target_images: np.ndarray,
    ood_images: np.ndarray,
    ood_labels: np.ndarray,
    config: NarcissusConfig | None = None,
    *,
    device: str | torch.device = "auto",
    quiet: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> NarcissusResult:
    """A Narcissus trigger for the class of ``target_images`` (module doc).

    ``target_images``: uint8 (N, H, W, 3), the attacker's examples of the target class;
    ``ood_images`` / ``ood_labels``: POOD images (resized to H x W if their size differs) and
    their classes (any integers; renumbered). ``progress(round, loss)`` is called per round.
    """
    cfg = config or NarcissusConfig()
    t0 = time.perf_counter()
    xt = np.asarray(target_images)
    xo = np.asarray(ood_images)
    if xt.dtype != np.uint8 or xt.ndim != 4 or xt.shape[-1] != 3 or len(xt) == 0:
        raise UsageError(f"target-class images: uint8 (N, H, W, 3) expected, got {xt.shape}")
    if xo.dtype != np.uint8 or xo.ndim != 4 or xo.shape[-1] != 3 or len(xo) == 0:
        raise UsageError(f"--ood-dataset images: uint8 (N, H, W, 3) expected, got {xo.shape}")
    yo = np.asarray(ood_labels)
    if yo.shape != (len(xo),):
        raise UsageError(f"{len(xo)} POOD images but labels of shape {yo.shape}")
    hw = (int(xt.shape[1]), int(xt.shape[2]))
    cfg.check(hw)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    classes, yo = np.unique(yo, return_inverse=True)
    label = len(classes)  # the target class comes after the POOD classes
    # the target class repeated up to the mean POOD class size: a few target examples among
    # many POOD images would otherwise leave a surrogate that hardly knows the target class
    reps = max(1, round(len(xo) / len(classes) / len(xt)))
    x = np.concatenate([resize_images(xo, hw), np.tile(xt, (reps, 1, 1, 1))])
    y = np.concatenate([yo.astype(np.int64), np.full(reps * len(xt), label, np.int64)])
    sur = default_config(
        cfg.surrogate_arch,
        epochs=cfg.surrogate_epochs,
        batch_size=cfg.surrogate_batch_size,
        lr=cfg.surrogate_lr,
        widths=cfg.surrogate_widths,
        seed=cfg.seed,
        tta="none",  # the trigger is optimised against the plain forward pass
    )
    clf = train_classifier(x, y, label + 1, sur, device=dev, quiet=quiet)
    trig, history, best_round = _optimise_trigger(clf, xt, label, cfg, dev, progress)
    d = asdict(cfg)
    d["size"] = list(cfg.size)
    return NarcissusResult(
        check_trigger(trig, hw, what="synthesised trigger"),
        clf,
        label,
        history,
        best_round,
        time.perf_counter() - t0,
        d,
    )


def target_rate(
    result: NarcissusResult, images: np.ndarray, scale: float | None = 1.0, batch_size: int = 1000
) -> float:
    """The share of ``images`` (uint8 NHWC) the surrogate classifies as the target class, with
    the trigger added at ``scale`` (`apply_trigger`, the authors' quantisation) or, with
    ``scale`` None, as they are."""
    x = np.asarray(images)
    if len(x) == 0:
        return float("nan")
    if scale is not None:
        x = apply_trigger(x, result.trigger, scale)
    pred = result.surrogate.predict(x, batch_size)
    return float(np.mean(pred == result.target_label))


# ----------------------------------------------------------------------------- an honest report
#
# A surrogate's rates alone can say nothing: a surrogate that calls most clean images the target
# (it was trained on the target examples and POOD only) "succeeds" with any pattern, and a
# trigger that fools the surrogate may never be learnt by a victim trained on poisoned data.

MAX_CLEAN_RATE = 0.5  # surrogate: above it, clean images already read as the target
MIN_LIFT = 0.2  # the trigger must move at least this share of images to the target
MIN_BUDGET_USE = 0.5  # below it, the pattern barely uses its L-inf budget


@dataclass
class TriggerReport:
    """What `judge_trigger` found: ``verdict`` is ``works on a victim``, ``fails on a victim``,
    ``works on the surrogate (not checked on a victim)`` or ``not shown to work``; ``reasons``
    say why, ``warnings`` what else to know."""

    verdict: str
    reasons: list[str]
    warnings: list[str]
    budget_used: float  # max |trigger| / eps
    surrogate: dict[str, float]  # target rates: clean, x1, x3
    victim: dict[str, Any] | None = None

    @property
    def success(self) -> bool:
        return self.verdict in ("works on a victim",
                                "works on the surrogate (not checked on a victim)")  # fmt: skip

    def lines(self) -> list[str]:
        out = [f"verdict: {self.verdict}" + (f": {'; '.join(self.reasons)}" if self.reasons
                                               else "")]  # fmt: skip
        return out + [f"warning: {w}" for w in self.warnings]


def judge_trigger(rates: dict[str, float], trigger: np.ndarray, eps: float,
                  victim: dict[str, Any] | None = None) -> TriggerReport:  # fmt: skip
    """Judge a trigger by the surrogate's target rates (``clean``, ``x1``, ``x3`` on images of
    the other classes), its use of the budget ``eps`` and, where given, a victim trained on a
    set poisoned with it (`check_on_victim`)."""
    used = float(np.abs(np.asarray(trigger, np.float64)).max()) / eps if eps > 0 else 0.0
    reasons: list[str] = []
    warnings: list[str] = []
    if used < MIN_BUDGET_USE:
        warnings.append(f"the pattern uses {used:.2f} of its budget (max |delta| "
                        f"{used * eps * 127.5:.1f} of {eps * 127.5:.1f} pixel levels)")  # fmt: skip
    clean, x1 = rates.get("clean", float("nan")), rates.get("x1", float("nan"))
    if not clean < MAX_CLEAN_RATE:
        reasons.append(f"the surrogate already calls {100 * clean:.1f}% of clean other-class "
                       f"images the target (over {100 * MAX_CLEAN_RATE:.0f}%): its rates say "
                       f"nothing about the trigger")  # fmt: skip
    elif not x1 - clean >= MIN_LIFT:
        reasons.append(f"on the surrogate the trigger x1 moves {100 * (x1 - clean):.1f}% of "
                       f"other-class images to the target (under {100 * MIN_LIFT:.0f}%)")
    if victim is not None:
        lift = victim["x1"] - victim["clean"]
        what = (f"a {victim['arch']} victim trained on {victim['poisoned']} poisoned images "
                f"calls {100 * victim['x1']:.1f}% of held-apart other-class images the target "
                f"with the trigger x1, {100 * victim['clean']:.1f}% without")  # fmt: skip
        if lift >= MIN_LIFT:
            return TriggerReport("works on a victim", [what], warnings + reasons, used, rates,
                                 victim)  # fmt: skip
        return TriggerReport("fails on a victim", [what, *reasons], warnings, used, rates, victim)
    if reasons:
        return TriggerReport("not shown to work", reasons, warnings, used, rates)
    warnings.append("not checked on a victim trained on a poisoned set (--check-victim ARCH, "
                    "or eval experiment)")  # fmt: skip
    return TriggerReport("works on the surrogate (not checked on a victim)", [], warnings, used,
                         rates)  # fmt: skip


def check_on_victim(
    trigger: np.ndarray, images: np.ndarray, labels: np.ndarray, target: int, poison_idx:
    np.ndarray, arch: str = "airbench", *, seed: int = 0, held_frac: float = 0.2,
    device: str | torch.device = "cpu", quiet: bool = True, config: TrainConfig | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train a fresh ``arch`` victim (its preset sized to the set, or ``config``) on ``images``
    with the trigger added to ``poison_idx`` (clean label: images of ``target``), leaving a random
    ``held_frac`` of the other classes' images out, and measure on those: the share called the
    target with the trigger x1 and x3 and without it."""
    y = np.asarray(labels, np.int64)
    rng = np.random.default_rng(seed)
    others = np.flatnonzero(y != target)
    held = np.sort(rng.choice(others, max(1, int(held_frac * others.size)), replace=False))
    keep = np.setdiff1d(np.arange(y.size), held)
    x = np.array(images, np.uint8)
    x[poison_idx] = apply_trigger(x[poison_idx], trigger, 1.0)
    k = int(y.max()) + 1
    cfg = config or default_config(arch, seed=seed)
    clf = train_classifier(x[keep], y[keep], k, cfg,
                           device=resolve_device(str(device)), quiet=quiet)  # fmt: skip
    xh = np.asarray(images)[held]

    def rate(m: float | None) -> float:
        xi = xh if m is None else apply_trigger(xh, trigger, m)
        return float(np.mean(clf.predict(xi) == target))

    return {"arch": cfg.arch, "seed": cfg.seed, "poisoned": int(len(poison_idx)),
            "held_apart": int(held.size), "clean": rate(None), "x1": rate(1.0),
            "x3": rate(3.0)}  # fmt: skip
