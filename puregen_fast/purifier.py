"""The engine: `Purifier` turns a batch of images into purified images.

It converts images to x in [-1, 1], runs the method on a sampler backend with noise keyed by the
images' global sample ids (DESIGN 2.2: an image's result does not depend on its batch), and
converts back (clamp to [0, 1], then to uint8 by ``quantize``: round, or trunc as the authors'
``ToPILImage``). The authors' code wraps out-of-range values through the uint8 cast instead of
clamping; we clamp, in both modes.

Backends (`sampling.backends`): ``reference`` (eager PyTorch, `puregen_fast.reference` on the
keyed stream) and ``fast`` (compiled models, fused kernels, CUDA graphs); ``auto`` picks fast
where it runs and says which it picked in `backend` / `backend_reason`. The engine never reads
settings back from its callers: a data set's filt threshold is an argument of the call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from puregen_fast import methods, paper, reference
from puregen_fast import noise as pgnoise
from puregen_fast.config import (
    DEFAULT_DIVERGENCE_MARGIN,
    METHODS,
    PAPER_LANGEVIN,
    EngineConfig,
)
from puregen_fast.errors import DivergenceError, UsageError
from puregen_fast.models.checkpoints import DEFAULT_DDPM, DEFAULT_EBM, load_ddpm, load_ebm
from puregen_fast.models.schedule import DDPMSchedule
from puregen_fast.runtime import resolve_device
from puregen_fast.sampling import precision as precision_choice
from puregen_fast.sampling.backends import make_sampler
from puregen_fast.sampling.config import SamplerConfig

__all__ = [
    "Purifier",
    "METHODS",
    "ImageSizeError",
    "Models",
    "chain_line",
    "check_filter_threshold",
    "check_image_size",
    "load_models",
]

# runs one model's load: (its flag, the load) -> the model, or None where the caller keeps the
# problem to report it with others (`puregen-fast purify` gathers every problem in one message)
Attempt = Callable[[str, Callable[[], Any]], Any]


class Models(NamedTuple):
    """The models a run uses, loaded (None: the run does not use that model)."""

    ebm: nn.Module | None
    ddpm: nn.Module | None


def load_models(
    method: str | Sequence[str],
    ebm: str | None = None,
    ddpm: str | None = None,
    *,
    attempt: Attempt | None = None,
    named: tuple[str, str] = ("--ebm", "--ddpm"),
) -> Models:
    """The models ``method`` uses (several methods: any of them), from their sources: the rows
    of `puregen_fast.methods` say which (a model a method takes optionally, as filt its DDPM,
    only when its source is given); a source left None is the authors' published checkpoint,
    fetched once into the cache (offline: a `CheckpointError` that says what to place where,
    `puregen_fast.models.checkpoints`). The one loader of the command, Ray and ``eval
    experiment``. ``attempt(flag, load)`` runs each load (``flag``: ``--ebm`` or ``--ddpm``):
    the command's stages it over torchrun ranks and keeps the problem, returning None.
    ``named``: how the caller's user gives each source, for the messages (the commands' flags;
    Python keywords, ``("ebm=", "ddpm=")``, for the API)."""
    rows = [methods.get(m) for m in ([method] if isinstance(method, str) else method)]
    run: Attempt = attempt or (lambda flag, load: load())
    use_ebm = any(r.uses("ebm", ebm is not None) for r in rows)
    use_ddpm = any(r.uses("ddpm", ddpm is not None) for r in rows)
    return Models(
        run("--ebm", lambda: load_ebm(ebm or DEFAULT_EBM, flag=named[0])) if use_ebm else None,
        run("--ddpm", lambda: load_ddpm(ddpm or DEFAULT_DDPM, flag=named[1])) if use_ddpm else None,
    )


class ImageSizeError(UsageError, ValueError):
    """Images of a size the models cannot take (exit 2 on the command line; a ValueError for
    the Python API and Ray)."""


def check_image_size(ebm: nn.Module | None, ddpm: nn.Module | None, h: int, w: int) -> None:
    """The one image-size check of the command and the API: the EBM needs H and W divisible by
    4 * patch_size, the UNet by 2 ** (len(block_out_channels) - 1); ImageSizeError otherwise."""
    if ebm is not None:
        m = 4 * int(getattr(ebm, "patch_size", 1))
        if h % m or w % m:
            raise ImageSizeError(
                f"--ebm: this EBM (patch_size {m // 4}) needs image height and width divisible "
                f"by {m}, but the images are {h}x{w} (H x W); use another data set or an EBM "
                "made for this size"
            )
    cfg = getattr(ddpm, "config", None)
    if ddpm is not None and isinstance(cfg, dict) and cfg.get("block_out_channels"):
        m = 2 ** (len(cfg["block_out_channels"]) - 1)
        if h % m or w % m:
            raise ImageSizeError(
                f"--ddpm: this UNet ({len(cfg['block_out_channels'])} levels) needs image height "
                f"and width divisible by {m}, but the images are {h}x{w} (H x W); use another "
                "data set or a UNet made for this size"
            )


def check_filter_threshold(value: object, name: str = "filter_threshold") -> float:
    """``value`` as a finite float; ValueError naming ``name`` otherwise. A NaN threshold would
    select no image (every comparison is False) and +-inf none or all: filt would quietly purify
    nothing and report success."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"{name} must be a finite number (the 'threshold' of the filter record in a "
            f"puregen-fast purify manifest); got {type(value).__name__} {str(value)[:40]!r}"
        )
    t = float(value)
    if not math.isfinite(t):
        raise ValueError(
            f"{name} must be a finite number (the 'threshold' of the filter record in a "
            f"puregen-fast purify manifest); got {t}"
        )
    return t


def chain_line(purifier: Purifier) -> str:
    """The Langevin chain an engine runs and where each value came from, for the log."""
    c, src = purifier.config, purifier.sampling_from

    def one(k: str, what: str) -> str:
        how = f"--{k.replace('_', '-')}" if src[k] == "given" else src[k]
        return f"{what} {getattr(c, k):g} ({how})"

    return "Langevin chain: " + ", ".join(
        one(k, w) for k, w in (("ebm_steps", "steps"), ("ebm_eps", "eps"), ("ebm_temp", "temp")))


class Purifier:
    """``Purifier(method, ebm, ddpm, ...)(images, sample_ids)``.

    images: uint8 NHWC in [0, 255] or float NCHW in [0, 1], numpy or torch; the result comes back
    in the same form. sample_ids: the images' global indices, which key the noise.
    Methods: the rows of `puregen_fast.methods`, run stage by stage: ebm, ddpm, ebm+ddpm (EBM
    then DDPM), reps (``reps`` rounds of EBM then DDPM), filt (purify only images whose EBM
    energy is at least the ``filter_threshold`` given to the call, or without one the
    ``filter_frac`` highest of the batch, with the EBM and then the DDPM when one is given), jpeg
    (re-encode at ``jpeg_quality``), none, and any method registered there. The options are the
    fields of `EngineConfig` (checked there; ``self.config``). ``ebm_steps``, ``ebm_eps`` and
    ``ebm_temp`` left None come from the EBM's own chain (its ``sampling.json``, which
    ``train ebm`` writes), else the paper's (150, 1.25e-2, 1e-4); ``sampling_from`` says which.
    """

    def __init__(
        self,
        method: str = "ebm",
        ebm: nn.Module | None = None,
        ddpm: nn.Module | None = None,
        ebm_steps: int | None = None,
        ddpm_steps: int = paper.DDPM_STEPS,
        reps: int = 1,
        seed: int = 0,
        device: str | torch.device = "auto",
        backend: str = "auto",
        precision: str = "fp32",
        ebm_eps: float | None = None,
        ebm_temp: float | None = None,
        filter_frac: float = 0.5,
        jpeg_quality: int = paper.JPEG_QUALITY,
        schedule: DDPMSchedule | None = None,
        divergence_margin: float = DEFAULT_DIVERGENCE_MARGIN,
        conv_impl: str = "auto",
        quantize: str = "round",
    ) -> None:
        cfg = EngineConfig(
            method=method, ebm_steps=ebm_steps, ebm_eps=ebm_eps, ebm_temp=ebm_temp,
            ddpm_steps=ddpm_steps, reps=reps, filter_frac=filter_frac, jpeg_quality=jpeg_quality,
            seed=seed, device=str(device), backend=backend, precision=precision,
            divergence_margin=divergence_margin, conv_impl=conv_impl, quantize=quantize,
        )  # fmt: skip
        self._build(cfg, ebm, ddpm, schedule)

    @classmethod
    def from_config(
        cls,
        cfg: EngineConfig,
        ebm: nn.Module | None = None,
        ddpm: nn.Module | None = None,
        *,
        device: str | torch.device | None = None,
        schedule: DDPMSchedule | None = None,
    ) -> Purifier:
        """The engine of ``cfg``: an `EngineConfig`, or a `PurifyConfig` (its data and run
        options are not the engine's), with the models `load_models` gave. ``device``: in place
        of ``cfg.device`` (a torchrun rank's own GPU). The one way the command, Ray and ``eval
        experiment`` build an engine from settings."""
        if type(cfg) is not EngineConfig or device is not None:
            over = {} if device is None else {"device": str(device)}
            cfg = EngineConfig(**{**cfg.engine_dict(), **over})
        engine = cls.__new__(cls)
        engine._build(cfg, ebm, ddpm, schedule)
        return engine

    def _build(self, cfg: EngineConfig, ebm: nn.Module | None, ddpm: nn.Module | None,
               schedule: DDPMSchedule | None) -> None:  # fmt: skip
        method, backend = cfg.method, cfg.backend
        self.row = methods.get(method)  # the method's stages and models
        if self.row.uses("ebm") and ebm is None:
            raise ValueError(f"method {method!r} needs an EBM (ebm=...)")
        if self.row.uses("ddpm") and ddpm is None:
            raise ValueError(f"method {method!r} needs a DDPM (ddpm=...)")
        self.uses_ebm = self.row.uses("ebm", ebm is not None)
        self.uses_ddpm = self.row.uses("ddpm", ddpm is not None)
        # unset Langevin settings: the EBM's own chain (sampling.json), else the paper's
        cfg, self.sampling_from = cfg.resolve_sampling(
            getattr(ebm, "puregen_sampling", None) if self.uses_ebm else None)
        self.config = cfg
        self.method, self.seed, self.precision = method, cfg.seed, cfg.precision
        self.device = resolve_device(cfg.device)
        self.ebm = ebm.to(self.device).eval().requires_grad_(False) if self.uses_ebm else None
        self.ddpm = ddpm.to(self.device).eval().requires_grad_(False) if self.uses_ddpm else None
        self.precision_reason: str | None = None  # why, where precision="auto" chose
        if cfg.precision == precision_choice.AUTO:
            cfg = self.config = self._choose_precision(cfg)
        self.schedule = schedule or DDPMSchedule()
        no_model = self.row.model_free
        self.sampler = make_sampler(
            "reference" if no_model else backend,
            self._sampler_config(),
            self.ebm,
            self.ddpm,
            self.schedule,
        )
        self.backend = self.sampler.name
        self.backend_reason = self.sampler.reason
        if no_model and backend != "reference":
            self.backend_reason = f"method {method!r} has no model"
        self._planned = False  # `plan` not called yet: the first call plans its own batch

    def _timed_model(self) -> tuple[str, nn.Module, tuple[int, int]] | None:
        """The model whose step ``precision="auto"`` times (the EBM, else the DDPM), and its
        image size; None without a model."""
        if self.ebm is not None:
            return "ebm", self.ebm, (32, 32)
        if self.ddpm is not None:
            size = int(dict(getattr(self.ddpm, "config", {})).get("sample_size") or 32)
            return "ddpm", self.ddpm, (size, size)
        return None

    def _choose_precision(self, cfg: EngineConfig) -> EngineConfig:
        timed = self._timed_model()
        if timed is None:
            self.precision, self.precision_reason = "fp32", "fp32: no model to time"
            return dataclasses.replace(cfg, precision="fp32")
        v = precision_choice.choose(*timed, self.device)
        self.precision, self.precision_reason = v.precision, f"auto: {v.reason}"
        return dataclasses.replace(cfg, precision=v.precision)

    def precision_note(self) -> str | None:
        """At fp32: one line when a kept ``auto`` verdict says bf16 is much faster here."""
        timed = self._timed_model()
        if self.config.precision != "fp32" or timed is None:
            return None
        return precision_choice.hint(*timed, self.device)

    def check_image_size(self, h: int, w: int) -> None:
        """ImageSizeError unless this engine's models take H x W images (`check_image_size`)."""
        check_image_size(self.ebm, self.ddpm, h, w)

    def plan(self, images: int) -> None:
        """Before the first call: the number of images this engine will purify. With
        ``backend="auto"`` on a CPU, too little work (`AUTO_CPU_MIN_IMAGE_STEPS` images x steps)
        runs on the reference, which finishes before the fast path would have compiled. Without
        it the first call plans for its own batch, as `purify` plans for its data set: call it
        first when many batches follow."""
        self._planned = True
        c = self.config
        if c.backend != "auto" or self.row.model_free or self.device.type != "cpu":
            return
        per_image = c.reps * (c.ebm_steps * (self.ebm is not None)
                              + c.ddpm_steps * (self.ddpm is not None))  # fmt: skip
        self.sampler = make_sampler("auto", self._sampler_config(), self.ebm, self.ddpm,
                                    self.schedule, image_steps=images * per_image)  # fmt: skip
        self.backend, self.backend_reason = self.sampler.name, self.sampler.reason

    def _sampler_config(self) -> SamplerConfig:
        """The sampler's settings: the resolved chain, seed and precision, on this device (the
        one place the engine's settings are copied into the sampling layer's)."""
        c = self.config
        return SamplerConfig(
            ebm_steps=c.ebm_steps, ebm_eps=c.ebm_eps, ebm_temp=c.ebm_temp,
            ddpm_steps=c.ddpm_steps, seed=c.seed, device=self.device, precision=c.precision,
            conv_impl=c.conv_impl,
        )  # fmt: skip

    @property
    def conv_impl_reason(self) -> str | None:
        """What runs the EBM's convolutions and why (None without an EBM); with ``auto`` on CUDA
        the times measured at the first batch (the sampler's `Sampler.conv_impl_reason`)."""
        return self.sampler.conv_impl_reason if self.ebm is not None else None

    # -- conversion -------------------------------------------------------------------------
    def _to_x(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
        """x in [-1, 1], float32 NCHW on the device; and whether the input was integer NHWC."""
        if isinstance(images, np.ndarray):
            # torch takes only native byte order, non-negative strides and writable memory:
            # copy when (and only when) the array is not like that
            a = np.asarray(images)
            a = np.require(a, a.dtype.newbyteorder("="), ["C", "W"])
            t = torch.from_numpy(a)
        else:
            t = images
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"images must be a numpy array or torch tensor; got {type(images)}")
        if t.dim() != 4:
            raise ValueError(
                f"images must be 4-D (uint8 NHWC or float NCHW); got shape {tuple(t.shape)}"
            )
        if t.dtype.is_floating_point:
            if t.shape[1] != 3:
                raise ValueError(
                    f"float images must be NCHW with 3 channels; got shape {tuple(t.shape)}"
                )
            u = t.to(self.device, torch.float32)
            if not torch.isfinite(u).all() or u.min() < 0 or u.max() > 1:
                raise ValueError("float images must be finite and lie in [0, 1]")
            return u * 2 - 1, False
        if t.dtype == torch.bool or t.shape[3] != 3:
            raise ValueError(
                f"integer images must be uint8 NHWC with 3 channels; got {t.dtype} {tuple(t.shape)}"
            )
        if t.dtype != torch.uint8 and t.numel() and (t.min() < 0 or t.max() > 255):
            raise ValueError(
                f"integer images must lie in [0, 255]; got [{int(t.min())}, {int(t.max())}]"
            )
        u = t.to(self.device).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return u * 2 - 1, True

    @staticmethod
    def _from_x(
        x: torch.Tensor, like: np.ndarray | torch.Tensor, was_uint8: bool, quantize: str = "round"
    ):
        u = ((x + 1) / 2).clamp(0, 1)
        if was_uint8:
            # trunc: the authors' (x - (-1)) / 2, then mul(255).byte(), in float32
            level = u * 255 if quantize == "trunc" else torch.round(u * 255)
            out = level.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        else:
            out = u
        if isinstance(like, torch.Tensor):
            return out.to(like.device, like.dtype if not was_uint8 else torch.uint8)
        return out.cpu().numpy().astype(like.dtype if not was_uint8 else np.uint8, copy=False)

    def _ids(self, sample_ids: Sequence[int] | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
        ids = torch.as_tensor(
            np.asarray(sample_ids) if not isinstance(sample_ids, torch.Tensor) else sample_ids
        )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"sample_ids must be integers; got {ids.dtype}")
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() != n:
            raise ValueError(f"sample_ids has {ids.numel()} entries for {n} images")
        if n and (int(ids.min()) < 0 or int(ids.max()) >= pgnoise.MAX_SAMPLE_ID):
            raise ValueError("sample_ids must lie in [0, 2**48)")
        return ids.to(self.device)

    # -- public -----------------------------------------------------------------------------
    @property
    def chain_steps(self) -> int:
        """The chain steps one call runs, each over its whole batch (Langevin steps and DDPM
        reverse steps, every round): what ``progress`` counts to. 0 without a model."""
        if self.row.model_free:
            return 0
        c = self.config
        return c.reps * (c.ebm_steps * (self.ebm is not None)
                         + c.ddpm_steps * (self.ddpm is not None))  # fmt: skip

    def __call__(
        self,
        images: np.ndarray | torch.Tensor,
        sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        filter_threshold: float | None = None,
        progress: reference.Progress | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Purify ``images``; ``filter_threshold`` (filt): purify the images whose EBM energy is
        at least this (a data set's global threshold), instead of the batch's top fraction.
        ``progress(k)``: told of k more chain steps done, up to `chain_steps` per call (filt
        tells nothing where no image of the batch passes its threshold), counted on the host as
        the steps are issued: it moves within a batch and never changes the output."""
        x, was_uint8 = self._to_x(images)
        ids = self._ids(sample_ids, x.shape[0])
        self.check_image_size(x.shape[2], x.shape[3])
        if not self._planned:  # the command's rule: the work ahead picks the backend
            self.plan(x.shape[0])
        stages = self.row.stages
        if x.shape[0] == 0 or not stages:  # the input itself: round gives back its bytes
            return self._from_x(x, images, was_uint8)
        if self.row.filters:
            frac = self.config.filter_frac
            if filter_threshold is not None:
                filter_threshold = check_filter_threshold(filter_threshold)
            mask = reference.filter_mask(self._energy(x, ids), frac, filter_threshold)
            if bool(mask.any()):
                x = x.clone()
                # a data-dependent subset: let the fast sampler bucket its capture sizes
                x[mask] = self._stages(stages[1:], x[mask], ids[mask], pad_to=x.shape[0],
                                       progress=progress)  # fmt: skip
        else:
            x = self._stages(stages, x, ids, progress=progress)
        return self._from_x(x, images, was_uint8, self.config.quantize)

    def _stages(
        self, stages: Sequence[str], x: torch.Tensor, ids: torch.Tensor, pad_to: int | None = None,
        progress: reference.Progress | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``stages`` in order, ``reps`` rounds (1 unless the method repeats); a stage of an
        optional model not given is skipped."""
        kw: dict[str, Any] = {"pad_to": pad_to}
        if progress is not None:  # only when asked: a sampler-like without it still runs
            kw["progress"] = progress
        for r in range(self.config.reps):
            for stage in stages:
                if stage == "ebm" and self.ebm is not None:
                    stream = pgnoise.stream_id(pgnoise.STREAM_EBM, r)
                    x = self._guard(self.sampler.ebm(x, ids, stream, **kw), ids, "ebm")
                elif stage == "ddpm" and self.ddpm is not None:
                    stream = pgnoise.stream_id(pgnoise.STREAM_DDPM, r)
                    x = self._guard(self.sampler.ddpm(x, ids, stream, **kw), ids, "ddpm")
                elif stage == "jpeg":
                    x = self._jpeg(x)
        return x

    def _jpeg(self, x: torch.Tensor) -> torch.Tensor:
        """JPEG re-encode at ``jpeg_quality``, through uint8 as a file would be (the baseline)."""
        u8 = torch.round(((x + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
        out = reference.jpeg(u8.cpu().numpy(), self.config.jpeg_quality)
        return torch.from_numpy(out).to(self.device).permute(0, 3, 1, 2).float() / 255 * 2 - 1

    def _guard(self, x: torch.Tensor, ids: torch.Tensor, stage: str) -> torch.Tensor:
        """DESIGN 2.4: a non-finite state, or one far outside [-1, 1], is a divergence, never
        an image (clamping would hide it: a NaN cast to uint8 is a black pixel)."""
        flat = x.detach().flatten(1)
        peak = flat.abs().amax(1)
        bad = ~torch.isfinite(flat).all(1) | (peak > 1 + self.config.divergence_margin)
        if bool(bad.any()):
            raise self._diverged(stage, ids[bad].tolist(), float(peak[bad].max()))
        return x

    def _diverged(self, stage: str, ids: list[int], peak: float) -> DivergenceError:
        c = self.config
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        what = "non-finite values" if not math.isfinite(peak) else f"states up to |x| = {peak:.3g}"
        msg = (
            f"the {stage.upper()} stage diverged for {len(ids)} image(s) (sample ids {shown}): "
            f"{what}, outside [-1 - m, 1 + m] with --divergence-margin m = "
            f"{c.divergence_margin:g}; nothing of their batch was written. "
        )
        if math.isfinite(peak) and c.divergence_margin < DEFAULT_DIVERGENCE_MARGIN:
            # finite states past a margin tighter than the default: the flag, not the model
            msg += (
                f"Likely cause: --divergence-margin {c.divergence_margin:g} (default "
                f"{DEFAULT_DIVERGENCE_MARGIN:g}): healthy states can lie a little outside "
                "[-1, 1]; raise it."
            )
            return DivergenceError(msg, ids, flag_cause=True)
        changed = [f"--{k.replace('_', '-')} {getattr(c, k):g} (paper: {v:g})"
                   for k, v in PAPER_LANGEVIN.items() if getattr(c, k) != v]  # fmt: skip
        if stage == "ebm" and changed:
            msg += f"Likely cause: {', '.join(changed)}; go back toward the paper's values."
        elif stage == "ebm":
            msg += (
                "Likely cause: the EBM (--ebm): check that it is the trained checkpoint you meant "
                "(a wrongly scaled or untrained model diverges), or lower --ebm-eps."
            )
        else:
            msg += "Likely cause: the DDPM (--ddpm): check that it is the checkpoint you meant."
        return DivergenceError(msg, ids, flag_cause=stage == "ebm" and bool(changed))

    def _energy(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The EBM's energies; non-finite ones are a divergence (DESIGN 2.4): they cannot be
        ranked or thresholded, so filt would purify nothing and write the inputs as output."""
        if self.ebm is None:
            raise ValueError("energies need an EBM")
        e = reference.energy(self.ebm, x).float()
        bad = ~torch.isfinite(e)
        if bool(bad.any()):
            bad_ids = ids[bad.to(ids.device)].tolist()
            shown = ", ".join(map(str, bad_ids[:8])) + (", ..." if len(bad_ids) > 8 else "")
            raise DivergenceError(
                f"the EBM's energy is non-finite ({float(e[bad][0])}) for {len(bad_ids)} "
                f"image(s) (sample ids {shown}): filt cannot rank them, so nothing was purified "
                f"or written. Likely cause: the EBM (--ebm): check that it is the trained "
                f"checkpoint you meant (a wrongly scaled model overflows)",
                bad_ids,
            )
        return e

    def energy(
        self, images: np.ndarray | torch.Tensor, sample_ids: Sequence[int] | None = None
    ) -> np.ndarray:
        """EBM energies (float64, shape (B,)) of the images, as `filt` ranks them; a non-finite
        one is a DivergenceError naming the sample ids (their positions without ids)."""
        x, _ = self._to_x(images)
        ids = self._ids(range(x.shape[0]) if sample_ids is None else sample_ids, x.shape[0])
        self.check_image_size(x.shape[2], x.shape[3])
        return self._energy(x, ids).double().cpu().numpy()

    def identity(self) -> dict[str, Any]:
        """The settings that decide the output bytes (for resume checks and content-addressed
        names): the method and the settings its stages read, seed, precision, the backend that
        runs, the device type, the noise, each model's config and sha256."""
        return self._record()[0]

    def describe(self) -> dict[str, Any]:
        """`identity` with the diagnostic notes beside it (why this backend and convolution,
        what was asked for, the device in full, where the models and the chain's values came
        from), JSON-serialisable, for manifests and benchmark reports."""
        settings, notes = self._record()
        d = {**settings, **notes}
        for k in ("ebm", "ddpm"):  # a model's notes sit in its own entry
            if k in notes:
                d[k] = {**settings[k], **notes[k]}
        return d

    def _record(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(settings, notes): what decides the bytes, and what only explains the run; each
        value is put in one of them once, here."""
        c = self.config
        settings: dict[str, Any] = {
            "method": c.method,
            "seed": c.seed,
            "precision": c.precision,
            "backend": self.backend,
            "device": self.device.type,  # cuda:0 and cuda:1 write the same bytes
            "noise": "philox4x32-10 keyed (seed, stream, step, sample_id, element)",
        }
        notes: dict[str, Any] = {
            "backend_requested": c.backend,
            "backend_reason": self.backend_reason,
            **({"precision_reason": self.precision_reason} if self.precision_reason else {}),
            "conv_impl": c.conv_impl,
            "conv_impl_reason": self.conv_impl_reason,
            "device": str(self.device),
        }
        if self.ebm is not None:
            settings["ebm"] = {
                "steps": c.ebm_steps,
                "eps": c.ebm_eps,
                "temp": c.ebm_temp,
                "config": dict(getattr(self.ebm, "config", {})),
                "sha256": getattr(self.ebm, "puregen_sha256", None),
            }
            notes["ebm"] = {
                "source": getattr(self.ebm, "puregen_source", None),
                **({"sampling_from": self.sampling_from} if any(
                    v.startswith("the EBM's") for v in self.sampling_from.values()) else {}),
            }
        if self.ddpm is not None:
            settings["ddpm"] = {
                "steps": c.ddpm_steps,
                "schedule": self.schedule.config,
                "sha256": getattr(self.ddpm, "puregen_sha256", None),
            }
            notes["ddpm"] = {"source": getattr(self.ddpm, "puregen_source", None)}
        for k in self.row.recorded:  # reps, filter_frac, jpeg_quality: where the method reads them
            settings[k] = getattr(c, k)
        if c.quantize != "round":  # round is what every earlier run wrote: their records hold
            settings["quantize"] = c.quantize
        return settings, notes
