"""``precision="auto"``: fp32 or bf16 model math, whichever runs a purification step faster here.

bf16 is not faster on every CPU: on an Intel Xeon with AVX512-BF16 and no AMX exposed, oneDNN's
bf16 convolutions ran at fp32's speed, while an AMD Zen 5 ran bf16 much faster. So ``auto`` times
one step of each model (the EBM's energy gradient, the DDPM's UNet forward) in both precisions,
eagerly, at a batch of `PROBE_BATCH` images of the model's size, and takes bf16 only when it is
at least `GAIN` times faster. The verdict is kept per device (the CPU's model name or the GPU's)
and model shape in the project cache (`cache_file`), so the timing runs once per machine; `info`
lists the kept verdicts and `hint` reads them for a run left at fp32. The default stays fp32:
``auto`` may give other bytes on another machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puregen_fast.data.io import atomic_write_json
from puregen_fast.runtime import cache_dir, cpu_bf16, describe_device, precision_context

__all__ = [
    "AUTO", "GAIN", "PROBE_BATCH", "Verdict", "cache_file", "choose", "hint", "key", "kept",
    "verdicts",
]

AUTO = "auto"
GAIN = 1.15  # bf16 is taken (and suggested) only when this much faster than fp32
PROBE_BATCH = 32
_REPEATS = 3  # timed runs per precision, after one warm-up, the fastest kept


@dataclass(frozen=True)
class Verdict:
    """What ``auto`` chose (``precision``), the fastest step time of each precision (s), and
    why, for the manifest and `info`."""

    precision: str
    seconds: dict[str, float]
    reason: str


def cache_file() -> Path:
    return cache_dir() / "precision-auto.json"


def _device_name(device: torch.device) -> str:
    return str(describe_device(device).get("name", device.type))


def key(device: torch.device, kind: str, model: nn.Module, shape: tuple[int, ...]) -> str:
    """The kept verdict's key: the device, torch, the model and the probe's batch shape."""
    params = sum(p.numel() for p in model.parameters())
    batch = "x".join(map(str, shape))
    return (f"{device.type}: {_device_name(device)} | torch {torch.__version__} | {kind} "
            f"{type(model).__name__} ({params} parameters) | batch {batch}")  # fmt: skip


def _step(kind: str, model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One purification step of the model: the EBM's energy gradient, or a UNet forward."""
    if kind == "ebm":

        def run() -> torch.Tensor:
            xg = x.detach().requires_grad_(True)
            return torch.autograd.grad(model(xg).sum(), xg)[0]

        return run
    t = torch.full((x.shape[0],), 75, device=x.device, dtype=torch.long)

    def forward() -> Any:
        with torch.no_grad():
            return model(x, t)

    return forward


def _time_steps(kind: str, model: nn.Module, shape: tuple[int, ...], device: torch.device
                ) -> dict[str, float]:  # fmt: skip
    """The fastest of `_REPEATS` timed steps per precision (fp32, bf16), taken in turn so that
    other load falls on both alike."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    run = _step(kind, model, x)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for i in range(_REPEATS + 1):
        for prec in best:
            with precision_context(prec, device):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:  # the first round warms up
                    best[prec] = min(best[prec], time.perf_counter() - t0)
    return best


def verdicts() -> dict[str, dict[str, Any]]:
    """The kept verdicts, by key (device, torch, model, batch); empty when none or unreadable."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _verdict(rec: dict[str, Any], cached: bool) -> Verdict:
    s = rec["seconds"]
    ratio = s["fp32"] / s["bf16"]
    where = "kept from an earlier run" if cached else "measured now"
    why = (f"bf16 {ratio:.2f}x the speed of fp32 ({1e3 * s['bf16']:.1f} vs {1e3 * s['fp32']:.1f} "
           f"ms a step, {where}); bf16 is taken at {GAIN:g}x or more")  # fmt: skip
    return Verdict(rec["precision"], dict(s), why)


def kept(kind: str, model: nn.Module, size: tuple[int, int], device: torch.device,
         verdicts_: dict[str, dict[str, Any]] | None = None) -> Verdict | None:  # fmt: skip
    """The kept verdict for ``model`` on ``device`` (None when none, or damaged); nothing is
    timed. ``verdicts_``: the kept verdicts, where the caller has read them already."""
    rec = (verdicts() if verdicts_ is None else verdicts_).get(
        key(device, kind, model, (PROBE_BATCH, 3, *size)))
    if not isinstance(rec, dict) or not isinstance(rec.get("seconds"), dict):
        return None
    try:
        return _verdict(rec, cached=True)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def choose(kind: str, model: nn.Module, size: tuple[int, int], device: torch.device,
           timer: Callable[..., dict[str, float]] | None = None) -> Verdict:  # fmt: skip
    """fp32 or bf16 for ``model`` (``kind`` ``ebm`` or ``ddpm``, images of ``size``) on
    ``device``: the kept verdict, or timed now (``timer``, for tests) and kept."""
    if device.type == "cpu" and not cpu_bf16()[0]:
        return Verdict("fp32", {}, f"fp32: no bf16 matrix units ({cpu_bf16()[1]})")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Verdict("fp32", {}, "fp32: this GPU has no bf16 support")
    shape = (PROBE_BATCH, 3, *size)
    known = verdicts()
    v = kept(kind, model, size, device, known)
    if v is not None:
        return v  # else none kept, or a damaged record: time again
    s = (timer or _time_steps)(kind, model, shape, device)
    rec = {"precision": "bf16" if s["fp32"] >= GAIN * s["bf16"] else "fp32", "seconds": s,
           "measured": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file(), {**known, key(device, kind, model, shape): rec})
    except OSError:
        pass  # a read-only cache: the verdict holds for this run only
    return _verdict(rec, cached=False)


def hint(kind: str, model: nn.Module, size: tuple[int, int], device: torch.device) -> str | None:
    """For a run at fp32: one line when a kept verdict says bf16 is much faster here (nothing
    is timed); None otherwise."""
    v = kept(kind, model, size, device)
    if v is None or v.precision != "bf16":
        return None
    ratio = v.seconds["fp32"] / v.seconds["bf16"]
    return (f"note: bf16 ran {ratio:.1f}x as fast as fp32 on this {device.type} for this model; "
            "--precision auto (or bf16) would use it. fp32 is the default so that every "
            "machine writes the same bytes")  # fmt: skip
