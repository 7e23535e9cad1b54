"""`puregen-fast info`: versions, devices, NVML readings, which code paths run here, and the CPU
as the fast path sees it (bf16 matrix units, threads, peaks, the compile cache)."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

from puregen_fast.cli.argtypes import int_at_least
from puregen_fast.config import MAX_BATCH
from puregen_fast.kernels.availability import triton_available
from puregen_fast.runtime import (
    compile_cache_dir,
    cpu_bf16,
    cpu_matrix,
    cpu_peak_tflops,
    describe_device,
)
from puregen_fast.sampling.backends import fast_available
from puregen_fast.sampling.precision import GAIN, cache_file, verdicts
from puregen_fast.version import __version__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--conv-probe", type=int_at_least(0, MAX_BATCH), default=0, metavar="BATCH",
        help="on CUDA: time the EBM gradient with torch and with the Triton conv-block kernels "
        "at this batch (the paper's EBM, 32x32, fp32 and bf16) and say which --conv-impl auto "
        "picks (compiles both: about a minute)",
    )  # fmt: skip


def nvml_readings() -> list[dict[str, Any]] | str:
    """Per-GPU name, memory, utilisation, power and clocks from NVML, or why there are none."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver on this machine
        return f"NVML unavailable ({type(e).__name__})"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            out.append(
                {
                    "index": i,
                    "name": pynvml.nvmlDeviceGetName(h),
                    "memory_used_mib": mem.used // 2**20,
                    "memory_total_mib": mem.total // 2**20,
                    "gpu_util_pct": util.gpu,
                    "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                    "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                }
            )
        return out
    finally:
        pynvml.nvmlShutdown()


def conv_impl_info(device: torch.device, probe_batch: int = 0) -> dict[str, Any]:
    """What ``--conv-impl auto`` does on ``device``; with ``probe_batch`` on CUDA, both times."""
    from puregen_fast.models.ebm import EBMSNGAN32
    from puregen_fast.sampling.backends import LangevinSampler
    from puregen_fast.sampling.conv_grad import conv_kernels_usable

    ebm = EBMSNGAN32(nf=128).to(device).requires_grad_(False)
    ok, why = conv_kernels_usable(ebm, device, "fp32")
    out: dict[str, Any] = {"triton_kernels": ok, "why": why}
    if device.type != "cuda":
        out["auto"] = "torch (auto on CPU; the Triton interpreter is for tests)"
        return out
    out["auto"] = "the faster of torch and triton, timed once at each sampler's first batch shape"
    if probe_batch > 0 and ok:
        x = torch.rand(probe_batch, 3, 32, 32, device=device) * 2 - 1
        for prec in ("fp32", "bf16"):
            s = LangevinSampler(ebm, 1, device=device, precision=prec, cuda_graph=False)
            s.fast.grad(x)  # auto: measures both
            out[f"probe_{prec}"] = s.conv_impl_reason
    return out


def collect(conv_probe: int = 0) -> dict[str, Any]:
    info: dict[str, Any] = {
        "puregen_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "nvml": nvml_readings(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    ok, why = triton_available()
    info["kernels"] = {
        "triton": ok,
        "why": why,
        "else": "eager twins (plain torch; compiled by the CPU fast path)",
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ok, why = fast_available(device, "fp32")
    info["backend_auto"] = {"device": str(device), "fast": ok, "why": why,
                            "picks": "fast" if ok else "reference"}  # fmt: skip
    ok16, why16 = fast_available(device, "bf16")
    info["backend_auto"]["bf16"] = {"fast": ok16, "why": why16}
    info["conv_impl"] = conv_impl_info(device, conv_probe)
    info["cpu"] = cpu_info()
    info["precision_auto"] = precision_auto_info()
    return info


def precision_auto_info() -> dict[str, Any]:
    """What ``--precision auto`` decided on this machine so far (kept in the project cache):
    per device and model, the precision and the step times that decided it."""
    kept = verdicts()
    return {
        "cache": str(cache_file()),
        "rule": f"bf16 where it runs a step at least {GAIN:g}x as fast as fp32, else fp32",
        "verdicts": {k: {"precision": v.get("precision"), "seconds": v.get("seconds"),
                         "measured": v.get("measured")}
                     for k, v in kept.items() if isinstance(v, dict)}  # fmt: skip
        or "none yet (the first run with --precision auto times it)",
    }


def cpu_info() -> dict[str, Any]:
    """The CPU as the fast path sees it: bf16 matrix units (AMX / AVX512-BF16, from the CPU's
    flags), threads and where their count came from, and the dense peaks `bench` compares with."""
    dev = describe_device(torch.device("cpu"))
    ok, why = cpu_bf16()
    m = cpu_matrix()
    return {
        "name": dev["name"],
        "family": m.cpu,
        "cores_available": dev["cores_available"],
        "threads": dev["threads"],
        "threads_from": dev["threads_from"],
        "bf16_matrix": m.isa,
        "bf16": ok,
        "bf16_why": why,
        "peak_fp32": cpu_peak_tflops("fp32")[1],
        "peak_bf16": cpu_peak_tflops("bf16")[1],
        "compile_cache": str(compile_cache_dir()),
    }


def run(args: argparse.Namespace) -> int:
    info = collect(getattr(args, "conv_probe", 0))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        print(f"{k:14s} {json.dumps(v) if isinstance(v, dict | list) else v}")
    return 0
