"""The engine: `Purifier` turns a batch of images into purified images.

It converts images to x in [-1, 1], runs the method on a sampler backend with noise keyed by the
images' global sample ids (DESIGN 2.2: an image's result does not depend on its batch), and
converts back (clamp to [0, 1], round to uint8). The authors' code wraps out-of-range values
through a uint8 cast instead of clamping; we clamp.

Backends: ``reference`` (eager PyTorch, `puregen_fast.reference` on the keyed stream) and ``fast``
(`puregen_fast.fast`: compiled models, fused kernels, CUDA graphs); ``auto`` picks fast where it
runs and says which it picked in `backend` / `backend_reason`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from puregen_fast import noise as pgnoise
from puregen_fast import reference
from puregen_fast.schedule import DDPMSchedule

__all__ = ["Purifier", "METHODS", "PRECISIONS", "ReferenceSampler"]

METHODS = ("ebm", "ddpm", "ebm+ddpm", "reps", "filt", "jpeg", "none")
PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("auto", "reference", "fast")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ValueError for a bad or unavailable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        msg = f"{str(device)!r} is not a device; use auto, cpu, cuda or cuda:N"
        raise ValueError(msg) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but no CUDA device is available; use --device cpu"
        )
    return dev


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Model math in fp32 (tf32 off), tf32 (matmul/conv on tensor cores) or bf16 (autocast).
    The state x stays fp32 in every mode. cuDNN is held to deterministic algorithms, so a fixed
    batch size gives bit-identical results (DESIGN 2.2; some input-gradient convolutions would
    otherwise sum with atomics)."""
    b = torch.backends
    old = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic)
    tf32 = precision == "tf32"
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = tf32
    b.cudnn.deterministic = True
    try:
        if precision == "bf16":
            # no weight-cast cache: CUDA graph capture must not keep autocast's cached casts
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
                yield
        else:
            yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic = old


class ReferenceSampler:
    """The eager reference on the keyed noise stream."""

    name = "reference"

    def __init__(self, p: Purifier) -> None:
        self.p = p

    def _noise(self, stream: int, ids: torch.Tensor, shape: Sequence[int]):
        seed, dev = self.p.seed, ids.device
        return lambda step: pgnoise.randn(seed, stream, step, ids, shape, device=dev)

    def ebm(
        self, x: torch.Tensor, ids: torch.Tensor, rep: int = 0, pad_to: int | None = None
    ) -> torch.Tensor:  # pad_to: a capture hint for the fast sampler; nothing to do here
        p = self.p
        z = self._noise(pgnoise.stream_id(pgnoise.STREAM_EBM, rep), ids, x.shape[1:])
        with precision_context(p.precision, p.device):
            return reference.ebm_purify(
                p.ebm, x, p.ebm_steps, p.ebm_eps, p.ebm_temp, noise=z, check_range=False
            )

    def ddpm(
        self, x: torch.Tensor, ids: torch.Tensor, rep: int = 0, pad_to: int | None = None
    ) -> torch.Tensor:  # pad_to: a capture hint for the fast sampler; nothing to do here
        p = self.p
        z = self._noise(pgnoise.stream_id(pgnoise.STREAM_DDPM, rep), ids, x.shape[1:])
        with precision_context(p.precision, p.device):
            out = reference.ddpm_purify(
                p.ddpm, p.schedule, x, p.ddpm_steps, noise=z, check_range=False
            )
        return out.float()


class Purifier:
    """``Purifier(method, ebm, ddpm, ...)(images, sample_ids)``.

    images: uint8 NHWC in [0, 255] or float NCHW in [0, 1], numpy or torch; the result comes back
    in the same form. sample_ids: the images' global indices, which key the noise.
    Methods: ebm, ddpm, ebm+ddpm (EBM then DDPM), reps (``reps`` rounds of EBM then DDPM),
    filt (purify only images whose EBM energy is at least ``filter_threshold``, or without one the
    ``filter_frac`` highest of the batch, with the EBM and then the DDPM when one is given),
    jpeg (re-encode at ``jpeg_quality``), none.
    """

    def __init__(
        self,
        method: str = "ebm",
        ebm: nn.Module | None = None,
        ddpm: nn.Module | None = None,
        ebm_steps: int = 150,
        ddpm_steps: int = 75,
        reps: int = 1,
        seed: int = 0,
        device: str | torch.device = "auto",
        backend: str = "auto",
        precision: str = "fp32",
        ebm_eps: float = 1.25e-2,
        ebm_temp: float = 1e-4,
        filter_frac: float = 0.5,
        jpeg_quality: int = 75,
        schedule: DDPMSchedule | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        needs_ebm = method in ("ebm", "ebm+ddpm", "reps", "filt")
        needs_ddpm = method in ("ddpm", "ebm+ddpm", "reps")
        if needs_ebm and ebm is None:
            raise ValueError(f"method {method!r} needs an EBM (ebm=...)")
        if needs_ddpm and ddpm is None:
            raise ValueError(f"method {method!r} needs a DDPM (ddpm=...)")
        if reps < 1 or (reps > 1 and method != "reps"):
            raise ValueError(f"reps must be >= 1, and > 1 only with method 'reps'; got {reps}")
        if needs_ebm and (ebm_steps < 1 or ebm_eps <= 0 or ebm_temp <= 0):
            raise ValueError("ebm_steps must be >= 1 and ebm_eps, ebm_temp > 0")
        if needs_ddpm and not 1 <= ddpm_steps < 1000:
            raise ValueError(f"ddpm_steps must lie in [1, 1000); got {ddpm_steps}")
        if not 0.0 < filter_frac <= 1.0:
            raise ValueError(f"filter_frac must lie in (0, 1]; got {filter_frac}")
        if not 1 <= jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must lie in [1, 95]; got {jpeg_quality}")
        if not 0 <= seed < (1 << 63):
            raise ValueError(f"seed must lie in [0, 2**63); got {seed}")

        self.method = method
        self.device = resolve_device(device)
        self.uses_ebm = needs_ebm
        self.uses_ddpm = needs_ddpm or (method == "filt" and ddpm is not None)
        self.ebm = ebm.to(self.device).eval().requires_grad_(False) if self.uses_ebm else None
        self.ddpm = ddpm.to(self.device).eval().requires_grad_(False) if self.uses_ddpm else None
        self.ebm_steps, self.ddpm_steps, self.reps = ebm_steps, ddpm_steps, reps
        self.ebm_eps, self.ebm_temp = ebm_eps, ebm_temp
        self.seed, self.precision = seed, precision
        self.filter_frac, self.jpeg_quality = filter_frac, jpeg_quality
        self.filter_threshold: float | None = None
        self.schedule = schedule or DDPMSchedule()
        self.requested_backend = backend
        self.sampler, self.backend_reason = self._pick_backend(backend)
        self.backend = self.sampler.name

    def _pick_backend(self, backend: str) -> tuple[Any, str]:
        if backend == "reference" or self.method in ("jpeg", "none"):
            why = "requested" if backend == "reference" else f"method {self.method!r} has no model"
            return ReferenceSampler(self), why
        try:
            from puregen_fast import fast
        except ImportError as e:
            ok, why = False, f"fast path not importable ({e})"
        else:
            ok, why = fast.available(self.device, self.precision)
        if ok:
            return fast.FastSampler(self), why
        if backend == "fast":
            raise ValueError(f"backend 'fast' cannot run here: {why}; use backend 'reference'")
        return ReferenceSampler(self), f"fast path unavailable: {why}"

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
    def _from_x(x: torch.Tensor, like: np.ndarray | torch.Tensor, was_uint8: bool):
        u = ((x + 1) / 2).clamp(0, 1)
        if was_uint8:
            out = torch.round(u * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
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
    def __call__(
        self,
        images: np.ndarray | torch.Tensor,
        sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
    ) -> np.ndarray | torch.Tensor:
        x, was_uint8 = self._to_x(images)
        ids = self._ids(sample_ids, x.shape[0])
        if x.shape[0] == 0 or self.method == "none":
            return self._from_x(x, images, was_uint8)
        if self.method == "jpeg":
            u8 = torch.round(((x + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
            out = reference.jpeg(u8.cpu().numpy(), self.jpeg_quality)
            x = torch.from_numpy(out).to(self.device).permute(0, 3, 1, 2).float() / 255 * 2 - 1
            return self._from_x(x, images, was_uint8)
        if self.method == "filt":
            mask = reference.filter_mask(self._energy(x), self.filter_frac, self.filter_threshold)
            if bool(mask.any()):
                x = x.clone()
                # a data-dependent subset: let the fast sampler bucket its capture sizes
                x[mask] = self._stages(x[mask], ids[mask], pad_to=x.shape[0])
        else:
            x = self._stages(x, ids)
        return self._from_x(x, images, was_uint8)

    def _stages(
        self, x: torch.Tensor, ids: torch.Tensor, pad_to: int | None = None
    ) -> torch.Tensor:
        for r in range(self.reps):
            if self.ebm is not None:
                x = self.sampler.ebm(x, ids, r, pad_to)
            if self.ddpm is not None:
                x = self.sampler.ddpm(x, ids, r, pad_to)
        return x

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        if self.ebm is None:
            raise ValueError("energies need an EBM")
        return reference.energy(self.ebm, x).float()

    def energy(
        self, images: np.ndarray | torch.Tensor, sample_ids: Sequence[int] | None = None
    ) -> np.ndarray:
        """EBM energies (float64, shape (B,)) of the images, as `filt` ranks them."""
        x, _ = self._to_x(images)
        return self._energy(x).double().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """The configuration, JSON-serialisable, for manifests and benchmark reports."""
        d: dict[str, Any] = {
            "method": self.method,
            "seed": self.seed,
            "precision": self.precision,
            "backend": self.backend,
            "backend_requested": self.requested_backend,
            "backend_reason": self.backend_reason,
            "device": str(self.device),
            "noise": "philox4x32-10 keyed (seed, stream, step, sample_id, element)",
        }
        if self.ebm is not None:
            d["ebm"] = {
                "steps": self.ebm_steps,
                "eps": self.ebm_eps,
                "temp": self.ebm_temp,
                "config": dict(getattr(self.ebm, "config", {})),
                "source": getattr(self.ebm, "puregen_source", None),
                "sha256": getattr(self.ebm, "puregen_sha256", None),
            }
        if self.ddpm is not None:
            d["ddpm"] = {
                "steps": self.ddpm_steps,
                "schedule": self.schedule.config,
                "source": getattr(self.ddpm, "puregen_source", None),
                "sha256": getattr(self.ddpm, "puregen_sha256", None),
            }
        if self.method == "reps":
            d["reps"] = self.reps
        if self.method == "filt":
            d["filter_frac"] = self.filter_frac
            d["filter_threshold"] = self.filter_threshold
        if self.method == "jpeg":
            d["jpeg_quality"] = self.jpeg_quality
        return d
