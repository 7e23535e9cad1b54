"""`puregen-fast info`: versions, devices, NVML readings, and which code paths run here."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

from puregen_fast.kernels.availability import triton_available
from puregen_fast.sampling.backends import fast_available
from puregen_fast.version import __version__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


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


def collect() -> dict[str, Any]:
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
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        print(f"{k:14s} {json.dumps(v) if isinstance(v, dict | list) else v}")
    return 0
