"""`puregen-fast bench`: throughput of the authors' loop vs our fast path, in one run, one device.

Columns (each a backend timed on the same weights, batch and device):

* ``authors``: the paper's loop as its authors run it: `reference.ebm_purify` /
  `reference.ddpm_purify` with ``noise=None`` (autograd and ``torch.randn``);
* ``fast``: `LangevinSampler` / `DDPMSampler` (compiled, fused kernels, CUDA graph on CUDA);
* ``engine``: the same fast path through the `Purifier`, uint8 NHWC images in and out (what
  ``purify`` runs per batch: conversion, the sampler, the divergence check, rounding);
* ``diffusers`` (DDPM only, where diffusers is installed): its ``UNet2DModel`` and
  ``DDPMScheduler`` loop with the same weights.

Warm-up (compile, capture, autotune) is timed apart from the repeats; the figure is the median of
the repeats (CUDA events on GPU; on a CPU the backends' repeats are taken in turn, so load from
other jobs falls on every row alike). Achieved TFLOP/s counts the model FLOPs of one image-step
with torch's FLOP counter (EBM: forward plus input gradient; DDPM: one UNet forward); every
backend is credited with the plain model's FLOPs (1.088 GFLOP per image-step for the paper's
EBM), so the column compares like with like. "% of peak" counts the FLOPs a row executes (the
fast EBM does 0.670 of them, pooling being folded into its convolutions) against the device's
dense peak for the row's precision: a datasheet figure on a GPU, on a CPU cores x clock x FLOP
per cycle of its matrix units (AMX or AVX512-BF16 for bf16; `runtime.cpu_peak_tflops`), printed
with the table. ``--baseline-precision`` runs the ``authors`` row in another precision than the
others (e.g. the authors' fp32 loop beside a bf16 fast path). Where NVML answers: mean GPU
utilisation, power and joules per image over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.profiler import profile as _legacy_profile

from puregen_fast import paper, reference
from puregen_fast.cli.argtypes import batch_size, int_at_least, out_file
from puregen_fast.config import CONV_IMPLS, MAX_LANGEVIN_STEPS
from puregen_fast.errors import UsageError
from puregen_fast.models.checkpoints import load_ddpm, load_ebm
from puregen_fast.models.ebm import EBMSNGAN32
from puregen_fast.models.ebm_folded import FoldedEBM
from puregen_fast.models.schedule import DDPMSchedule
from puregen_fast.models.unet import UNET_PRESETS, UNet2D
from puregen_fast.purifier import Purifier
from puregen_fast.runtime import (
    COMPILE_MODES,
    PRECISIONS,
    cpu_peak_tflops,
    describe_device,
    precision_context,
    resolve_device,
)
from puregen_fast.sampling import precision as precision_choice
from puregen_fast.sampling.backends import DDPMSampler, LangevinSampler, fast_available

BACKENDS = ("authors", "fast", "engine", "diffusers")
# what each row times, printed under the table (the README's list says the same, checked by a test)
ROW_MEANING = {
    "authors": "the paper's loop as its authors run it (reference.ebm_purify / ddpm_purify with "
    "autograd and torch.randn), the baseline of the speed-up column",
    "fast": "our samplers alone (compiled model, fused kernels, CUDA graphs on a GPU), on a "
    "float batch already on the device",
    "engine": "the fast path through Purifier as purify runs each batch: uint8 images in and out, "
    "conversion, keyed noise and the divergence check included",
    "diffusers": "diffusers' UNet2DModel + DDPMScheduler loop (DDPM only, where diffusers is "
    "installed)",
}

# dense peak TFLOP/s by (device-name fragment, precision); SXM parts, no sparsity
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
}

# --model -> UNet preset (puregen_fast.models.unet.UNET_PRESETS)
UNET_MODELS = {"paper": "paper", "small": "tiny"}
EBM_WIDTHS = {"paper": 128, "small": 16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["ebm", "ddpm"], default="ebm")
    p.add_argument(
        "--model",
        choices=["paper", "small"],
        default="paper",
        help="paper: EBM nf=128 / the 113.7M UNet; small: tiny models for CPUs",
    )
    p.add_argument("--ebm", default=None, help="an EBM checkpoint instead of random weights")
    p.add_argument("--ddpm", default=None, help="a DDPM checkpoint instead of random weights")
    p.add_argument("--unet-preset", choices=sorted(UNET_PRESETS), default=None,
                   help="DDPM: this UNet preset (random weights) instead of --model's")  # fmt: skip
    p.add_argument("--batch-size", type=batch_size, default=512)
    p.add_argument("--steps", type=int_at_least(1, MAX_LANGEVIN_STEPS), default=None,
                   help=f"default: {paper.LANGEVIN_STEPS} (EBM), {paper.DDPM_STEPS} (DDPM; below "
                   "1000)")  # fmt: skip
    p.add_argument("--image-size", type=int_at_least(8, 1024), default=32,
                   help="a multiple of 8")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="model math of the fast and engine rows (and of authors, unless "
                   "--baseline-precision says otherwise)")  # fmt: skip
    p.add_argument("--baseline-precision", choices=PRECISIONS, default=None,
                   help="model math of the authors row (default: --precision), e.g. fp32 "
                   "beside a bf16 fast path")  # fmt: skip
    p.add_argument("--backends", default="authors,fast,engine,diffusers",
                   help="comma-separated subset of " + ",".join(BACKENDS))  # fmt: skip
    p.add_argument("--repeats", type=int_at_least(1, 1000), default=3)
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode of the fast backend's model")  # fmt: skip
    p.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto",
                   help="the fast EBM's convolutions: torch (compiled, cuDNN), triton (the "
                   "conv-block kernels) or auto (on CUDA the faster, timed at the batch shape; "
                   "the report gives both times)")  # fmt: skip
    p.add_argument("--profile", type=int_at_least(0, 1000), default=0, metavar="N",
                   help="after timing, profile one more run of each backend and list its N "
                   "costliest kernels (GPU) or ops (CPU)")  # fmt: skip
    # checked before the run: a folder given here used to fail after minutes of timing
    p.add_argument("--json", type=out_file, default=None, help="write the result as JSON here")
    p.add_argument("--md", type=out_file, default=None, help="append the markdown table here")


class _NvmlSampler:
    """Samples GPU utilisation and power every 50 ms in a thread while timing runs."""

    def __init__(self, index: int) -> None:
        self.util: list[float] = []
        self.power: list[float] = []
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            self._handle = None

    def __enter__(self) -> _NvmlSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                power = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000
            except Exception:  # a card or driver that does not report these: no NVML columns
                return
            self.util.append(util)
            self.power.append(power)
            self._stop.wait(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict[str, float] | None:
        if not self.power:
            return None
        return {"gpu_util_pct": statistics.mean(self.util), "power_w": statistics.mean(self.power)}


def profile_top(device: torch.device, fn: Callable[[], Any], top: int) -> dict[str, Any]:
    """Where one run's time goes: the ``top`` kernels by self device time on CUDA (kernels of
    CUDA graph replays included), the ``top`` ops by self CPU time elsewhere."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [
        e
        for e in prof.key_averages()
        if getattr(e, key) > 0 and (not cuda or e.device_type == DeviceType.CUDA)
    ]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: -getattr(e, key))
    return {
        "clock": "device" if cuda else "cpu",
        "total_ms": total / 1e3,
        "top": [
            {
                "name": e.key,
                "calls": e.count,
                "ms": getattr(e, key) / 1e3,
                "pct": 100 * getattr(e, key) / total,
            }
            for e in events[:top]
        ],
    }


def _timer(device: torch.device, fn: Callable[[], Any]) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_image_step(method: str, model: nn.Module, hw: int, device: torch.device) -> float:
    """Model FLOPs of one image and one step, counted by torch (convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(2, 3, hw, hw, device=device)
    with FlopCounterMode(display=False) as counter:
        if method == "ebm":  # forward plus the input gradient (parameters are frozen)
            with torch.enable_grad():
                model(x.requires_grad_(True)).sum().backward()
        else:
            with torch.no_grad():
                model(x, torch.tensor(10, device=device))
    return counter.get_total_flops() / 2


def executed_share(
    method: str, model: nn.Module, hw: int, device: torch.device, flops: float
) -> float:
    """The share of the model's FLOPs the fast path executes: the EBM with pooling folded into
    its convolutions (`FoldedEBM`) does fewer; everything else does all of them."""
    if method != "ebm" or not isinstance(model, EBMSNGAN32):
        return 1.0
    return flops_per_image_step(method, FoldedEBM(model), hw, device) / flops


def peak_tflops(device: torch.device, precision: str) -> tuple[str, float | None, str]:
    """The device's name, its dense peak TFLOP/s for ``precision`` (None where unknown), and
    where the figure comes from."""
    if device.type != "cuda":
        peak, how = cpu_peak_tflops(precision)
        return str(describe_device(device)["name"]), peak, how
    name = torch.cuda.get_device_name(device)
    for frag, peaks in PEAK_TFLOPS.items():
        if frag in name:
            return name, peaks[precision], f"{frag} datasheet, dense"
    return name, None, f"{name}: not in the table of peaks"


def _models(args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if args.method == "ebm":
        if args.ebm:
            return load_ebm(args.ebm, device, flag="--ebm")
        return EBMSNGAN32(nf=EBM_WIDTHS[args.model]).to(device).eval().requires_grad_(False)
    if args.ddpm:
        return load_ddpm(args.ddpm, device, flag="--ddpm")
    unet = UNet2D.from_config(UNET_PRESETS[args.unet_preset or UNET_MODELS[args.model]])
    return unet.to(device).eval().requires_grad_(False)


def _runners(
    args: argparse.Namespace, model: nn.Module, device: torch.device, steps: int
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = set(wanted) - set(BACKENDS)
    if bad:
        raise UsageError(f"--backends: unknown {sorted(bad)}; choose from {','.join(BACKENDS)}")
    ids = torch.arange(args.batch_size, device=device)
    sched = DDPMSchedule()
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in wanted:
        if name == "authors":
            if args.method == "ebm":
                out[name] = lambda x: reference.ebm_purify(model, x, steps, check_range=False)
            else:
                out[name] = lambda x: reference.ddpm_purify(
                    model, sched, x, steps, check_range=False
                )
        elif name == "fast":
            if args.method == "ebm":
                try:
                    s = LangevinSampler(
                        model, steps, seed=0, device=device, precision=args.precision,
                        compile_mode=args.compile_mode, conv_impl=args.conv_impl,
                    )  # fmt: skip
                except ValueError as e:
                    raise UsageError(f"--conv-impl {args.conv_impl}: {e}") from e
            else:
                s = DDPMSampler(
                    model, sched, steps, seed=0, device=device, precision=args.precision,
                    compile_mode=args.compile_mode,
                )  # fmt: skip
            out[name] = lambda x, s=s: s(x, ids)
            out[name].sampler = s  # type: ignore[attr-defined]  # its conv_impl, after the runs
        elif name == "engine":
            out[name] = _engine_runner(args, model, device, steps)
        elif name == "diffusers" and args.method == "ddpm":
            try:
                out[name] = _diffusers_runner(model, steps, device)
            except ImportError:
                continue  # diffusers not installed: no third column
    return out


def _engine_runner(
    args: argparse.Namespace, model: nn.Module, device: torch.device, steps: int
) -> Callable[[torch.Tensor], Any]:
    """The fast path through the `Purifier`: the batch as uint8 NHWC (numpy, as ``purify``
    reads it) in, uint8 out; the float batch it is given is quantised once, outside the timing."""
    kw = ({"ebm": model, "ebm_steps": steps} if args.method == "ebm"
          else {"ddpm": model, "ddpm_steps": steps})  # fmt: skip
    try:
        p = Purifier(args.method, seed=0, device=device, backend="fast",
                     precision=args.precision, conv_impl=args.conv_impl, **kw)  # fmt: skip
    except ValueError as e:
        raise UsageError(f"--backends engine: {e}") from e
    ids = np.arange(args.batch_size)
    cache: dict[int, np.ndarray] = {}

    def run(x: torch.Tensor) -> Any:
        u8 = cache.get(id(x))
        if u8 is None:
            u8 = cache[id(x)] = (
                ((x + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
                .permute(0, 2, 3, 1).cpu().numpy()
            )  # fmt: skip
        return p(u8, ids)

    return run


def _diffusers_runner(model: nn.Module, steps: int, device: torch.device):
    import diffusers

    ref = diffusers.UNet2DModel.from_config(dict(model.config)).to(device).eval()
    ref.load_state_dict(model.state_dict())
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = sch.add_noise(x, torch.randn_like(x), torch.tensor([steps], device=device))
        for t in sch.timesteps[-steps:]:
            x = sch.step(ref(x, t).sample, t, x).prev_sample
        return x

    return run


def _check(args: argparse.Namespace) -> tuple[torch.device, int]:
    """The device and step count, or a UsageError naming the flag."""
    if args.profile < 0:
        raise UsageError(f"--profile {args.profile}: need N >= 0 (0: no profile)")
    if args.batch_size < 1 or args.repeats < 1 or args.image_size < 8 or args.image_size % 8:
        raise UsageError(
            "--batch-size and --repeats must be >= 1, --image-size a multiple of 8 (>= 8); got "
            f"{args.batch_size}, {args.repeats}, {args.image_size}"
        )
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from e
    if args.precision == "bf16":  # the fast rows' bf16 needs bf16 matrix units on a CPU
        ok, why = fast_available(device, "bf16")
        if not ok:
            raise UsageError(f"--precision bf16: the fast path cannot run it here ({why})")
    paper_steps = paper.LANGEVIN_STEPS if args.method == "ebm" else paper.DDPM_STEPS
    steps = paper_steps if args.steps is None else args.steps
    if not 1 <= steps < (10**9 if args.method == "ebm" else DDPMSchedule().num_train_timesteps):
        raise UsageError(f"--steps {steps}: need >= 1 (and < 1000 for ddpm)")
    return device, steps


def _time(
    args: argparse.Namespace, name: str, fn: Callable[[], Any], device: torch.device,
    work: float, peak: float | None, precision: str,
) -> dict[str, Any]:  # fmt: skip
    """One backend's row: warm-up apart, the median of the repeats, FLOP/s, memory, NVML."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with precision_context(precision, device):
        warm = _timer(device, fn)
        nv = _NvmlSampler(device.index or 0) if device.type == "cuda" else None
        with nv if nv is not None else _Null():
            times = [_timer(device, fn) for _ in range(args.repeats)]
        prof = profile_top(device, fn, args.profile) if args.profile else None
    row = _row(args, name, precision, warm, times, work, peak, device)
    if prof is not None:
        row["profile"] = prof
    nvs = nv.summary() if nv is not None else None
    if nvs:
        row.update(nvs)
        row["joules_per_image"] = nvs["power_w"] * row["median_s"] / args.batch_size
    return row


def _time_in_turn(
    args: argparse.Namespace, fns: dict[str, tuple[Callable[[], Any], str]],
    device: torch.device, work: float, peaks: dict[str, tuple[float | None, str]],
) -> list[dict[str, Any]]:  # fmt: skip
    """CPU rows: every backend warmed up first, then the repeats taken in turn (authors, fast,
    engine, authors, ...), so load from other jobs on a shared machine, which comes and goes,
    falls on every row alike and the ratios stay fair."""
    warm: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, (fn, prec) in fns.items():
        with precision_context(prec, device):
            warm[name] = _timer(device, fn)
    for _ in range(args.repeats):
        for name, (fn, prec) in fns.items():
            with precision_context(prec, device):
                times[name].append(_timer(device, fn))
    rows = []
    for name, (fn, prec) in fns.items():
        row = _row(args, name, prec, warm[name], times[name], work, peaks[prec][0], device)
        if args.profile:
            with precision_context(prec, device):
                row["profile"] = profile_top(device, fn, args.profile)
        rows.append(row)
    return rows


def _row(
    args: argparse.Namespace, name: str, precision: str, warm: float, times: list[float],
    work: float, peak: float | None, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    med = statistics.median(times)
    achieved = work / med / 1e12
    return {
        "backend": name,
        "precision": precision,
        "warmup_s": warm,
        "median_s": med,
        "times_s": times,
        "images_per_s": args.batch_size / med,
        "tflops": achieved,
        "pct_of_peak": 100 * achieved / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device, steps = _check(args)
    if args.profile and device.type == "cuda":
        # start the profiler's CUDA tracing once before any graph is captured, so the kernels
        # of graph replays are recorded later (torch's advice for profiling CUDA graphs)
        with _legacy_profile():
            pass
    model = _models(args, device)
    flops = flops_per_image_step(args.method, model, args.image_size, device)
    base_prec = args.baseline_precision or args.precision
    dev_name, peak, peak_how = peak_tflops(device, args.precision)
    peaks = {args.precision: (peak, peak_how)}
    if base_prec != args.precision:
        peaks[base_prec] = peak_tflops(device, base_prec)[1:]
    torch.manual_seed(1)
    x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    runners = _runners(args, model, device, steps)
    if not runners:
        raise UsageError(
            f"--backends {args.backends}: nothing to time for --method {args.method} here "
            "(diffusers is a DDPM column and needs the diffusers package)"
        )
    work = flops * steps * args.batch_size
    fns = {name: (lambda fn=fn: fn(x0), base_prec if name == "authors" else args.precision)
           for name, fn in runners.items()}  # fmt: skip
    if device.type == "cpu":
        rows = _time_in_turn(args, fns, device, work, peaks)
    else:
        rows = [_time(args, name, fn, device, work, peaks[prec][0], prec)
                for name, (fn, prec) in fns.items()]  # fmt: skip
    for r, fn in zip(rows, runners.values()):
        s = getattr(fn, "sampler", None)
        if isinstance(s, LangevinSampler):  # measured (auto) or requested, after the warm-up
            r["conv_impl"], r["conv_impl_reason"] = s.conv_impl, s.conv_impl_reason
    # % of peak counts the FLOPs a row executes: the fast EBM's folded convolutions do fewer
    folded = executed_share(args.method, model, args.image_size, device, flops)
    for r in rows:
        share = folded if r["backend"] in ("fast", "engine") else 1.0
        r["executed_share"] = share
        peak_r = peaks[r["precision"]][0]
        r["pct_of_peak"] = 100 * r["tflops"] * share / peak_r if peak_r else None
    base = next((r for r in rows if r["backend"] == "authors"), None)
    for r in rows:
        r["speedup_vs_authors"] = r["images_per_s"] / base["images_per_s"] if base else None
    return {
        "method": args.method,
        "model": (args.ebm or args.ddpm) or (
            f"unet {args.unet_preset}" if args.unet_preset and args.method == "ddpm"
            else args.model),  # fmt: skip
        "batch_size": args.batch_size,
        "steps": steps,
        "image_size": args.image_size,
        "precision": args.precision,
        "baseline_precision": base_prec,
        "compile_mode": args.compile_mode,
        "conv_impl": args.conv_impl if args.method == "ebm" else None,
        "device": dev_name,
        "torch": torch.__version__,
        "flops_per_image_step": flops,
        "peak_tflops": peak,
        "peaks": {k: {"tflops": v[0], "how": v[1]} for k, v in peaks.items()},
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "rows": rows,
        "precision_auto": _precision_auto(args.method, model, args.image_size, device),
    }


def _precision_auto(method: str, model: nn.Module, size: int, device: torch.device) -> str:
    """What ``--precision auto`` decided (or would decide) here for this model, from the kept
    verdicts: nothing is timed for it."""
    v = precision_choice.kept(method, model, (size, size), device)
    if v is None:
        return ("not measured on this machine for this model yet (purify --precision auto "
                "times it once)")  # fmt: skip
    return f"{v.precision}: {v.reason}"

class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def markdown(res: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    same = res.get("baseline_precision", res["precision"]) == res["precision"]

    head = (
        f"**{res['method'].upper()}-{res['steps']}**, model {res['model']}, batch "
        f"{res['batch_size']}, {res['precision']}"
        f"{'' if same else ' (authors ' + res['baseline_precision'] + ')'}, {res['device']}"
        f"{'' if not res.get('threads') else ', ' + str(res['threads']) + ' thread(s)'}"
        f" (torch {res['torch']}; "
        f"{'' if res['compile_mode'] == 'default' else 'compile ' + res['compile_mode'] + '; '}"
        f"{res['flops_per_image_step'] / 1e9:.3f} GFLOP per image-step)\n\n"
        "| backend | images/s | speed-up vs authors | median s (min-max) | warm-up s | TFLOP/s "
        "| % of peak "
        "| peak GiB | GPU util % | W | J/image |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['backend']}{'' if same else ' (' + r['precision'] + ')'} | "
        f"{r['images_per_s']:.1f} | {f(r['speedup_vs_authors'], '.2f')}"
        f"{'x' if r['speedup_vs_authors'] is not None else ''} | "
        f"{r['median_s']:.3f} ({min(r['times_s']):.3f}-{max(r['times_s']):.3f}) | "
        f"{r['warmup_s']:.2f} | {r['tflops']:.3f} | "
        f"{f(r['pct_of_peak'], '.1f')} | {f(r['peak_mem_gib'], '.2f')} | "
        f"{f(r.get('gpu_util_pct'), '.0f')} | {f(r.get('power_w'), '.0f')} | "
        f"{f(r.get('joules_per_image'), '.3f')} |"
        for r in res["rows"]
    ]
    auto = res.get("precision_auto")
    auto = f"\n--precision auto here: {auto}\n" if auto else ""
    out = head + "\n".join(lines) + "\n" + auto + "\nRows:\n"
    for r in res["rows"]:
        out += f"- `{r['backend']}`: {ROW_MEANING[r['backend']]}\n"
    out += (
        "\nimages/s: batch / median time of one purification of the batch (warm-up apart); "
        "TFLOP/s credits every row with the plain model's FLOPs; % of peak counts the FLOPs a "
        "row executes against the dense peak of its precision on this device (below)\n"
    )
    for prec, pk in res.get("peaks", {}).items():
        out += f"\nPeak {prec}: {pk['how']}\n"
    for r in res["rows"]:
        if r.get("conv_impl_reason"):
            out += (
                f"\n`{r['backend']}` EBM convolutions (--conv-impl {res.get('conv_impl')}): "
                f"{r['conv_impl']}, {r['conv_impl_reason']}\n"
            )
    for r in res["rows"]:
        prof = r.get("profile")
        if not prof:
            continue
        what = "kernels by device time" if prof["clock"] == "device" else "ops by self CPU time"
        out += (
            f"\nWhere the time goes, `{r['backend']}` (one run under torch.profiler, {what}; "
            f"{prof['total_ms']:.1f} ms in all)\n\n"
            "| kernel or op | calls | ms | % |\n|---|---|---|---|\n"
        )
        if not prof["top"]:
            out += "| (nothing recorded) | | | |\n"
        for e in prof["top"]:
            name = e["name"].replace("|", "/")
            name = name if len(name) <= 90 else name[:87] + "..."
            out += f"| `{name}` | {e['calls']} | {e['ms']:.2f} | {e['pct']:.1f} |\n"
    return out


def _out_of_memory(e: BaseException) -> bool:
    """An allocation the machine could not serve (CPU or GPU)."""
    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def run(args: argparse.Namespace) -> int:
    try:
        res = benchmark(args)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        # a batch within --batch-size's range can still be more than this machine holds
        raise UsageError(
            f"--batch-size {args.batch_size} (--image-size {args.image_size}, --model "
            f"{args.model}): not enough memory on this device; lower --batch-size"
        ) from None
    md = markdown(res)
    print(md)
    try:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2))
        if args.md:
            args.md.parent.mkdir(parents=True, exist_ok=True)
            with args.md.open("a") as fh:
                fh.write(md + "\n")
    except OSError as e:
        flag = "--json" if args.json and e.filename == str(args.json) else "--md"
        raise UsageError(f"{flag}: cannot write {e.filename!r}: {e.strerror}") from None
    return 0
