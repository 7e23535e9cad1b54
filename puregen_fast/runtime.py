"""Runtime: device resolution, the precision context, ``torch.compile`` helpers, thread control,
the CPU's bf16 matrix support and peak, and a description of the device. A leaf: it imports
nothing of ours.

Threads: `set_threads` sets torch's intra-op threads and the OpenMP count before work starts:
``--threads N``, else ``$PUREGEN_FAST_THREADS``, else ``$OMP_NUM_THREADS`` (as launchers such as
torchrun set it), else the cores this process may use (``os.sched_getaffinity``). On a machine
other jobs share, fewer threads than cores is often faster: a thread that waits for a busy core
stalls every parallel op at its barrier.

Compile caches: `compile_static` keeps inductor's caches (compiled graphs, AOTAutograd results)
in the project's cache folder (``$PUREGEN_FAST_CACHE/inductor``, the folder `data.download`
downloads into), unless ``$TORCHINDUCTOR_CACHE_DIR`` names another, so a second process on the
same model and shape loads the compiled code instead of compiling it again.

``torch.compile`` as the samplers use it: static shapes, and room for many shapes. Dynamo keeps
at most ``recompile_limit`` (8 by default) compiled versions per code object, and every sampler's
gradient goes through the same code object (``torch.func.grad``'s wrapper), so a long process
(several batch shapes, precisions, models) would hit the limit, which with ``fullgraph=True`` is a
hard error. We raise it once, for the whole process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "BACKENDS",
    "CONV_IMPLS",
    "PRECISIONS",
    "COMPILE_MODES",
    "THREADS_ENV",
    "CPUMatrix",
    "available_cores",
    "cache_dir",
    "check_mode",
    "check_precision",
    "compile_cache_dir",
    "compile_static",
    "cpu_bf16",
    "cpu_clock_ghz",
    "cpu_matrix",
    "cpu_peak_tflops",
    "plausible_clock",
    "describe_device",
    "precision_context",
    "resolve_device",
    "resolve_threads",
    "set_threads",
]

PRECISIONS = ("fp32", "tf32", "bf16")
# which sampler runs (DESIGN 6): the compiled fast path, the eager reference, or auto (fast
# where it runs); here, beside the precisions, so the sampling layer and the configuration
# share one list without the sampling layer importing the configuration
BACKENDS = ("auto", "reference", "fast")
# the EBM's convolutions on the fast path: compiled torch (cuDNN), the Triton conv-block kernels,
# or auto (on CUDA the faster of the two, measured once at the batch shape; torch on CPU)
CONV_IMPLS = ("auto", "torch", "triton")

# the samplers capture their own CUDA graphs, so no mode that makes inductor capture one;
# max-autotune-no-cudagraphs also tries inductor's Triton convolution and matmul templates
# (which take fused epilogues) against cuDNN/cuBLAS, at a much longer compile
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

F = TypeVar("F", bound=Callable)
_LIMITS = {  # the names moved between torch releases; set whichever this torch has
    "recompile_limit": 64,
    "cache_size_limit": 64,
    "accumulated_recompile_limit": 1024,
    "accumulated_cache_size_limit": 1024,
}


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


def describe_device(device: torch.device | None) -> dict[str, Any]:
    """The device as manifests and reports record it: name, torch (and CUDA or CPU threads)."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device is not None and device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        cpu = _cpuinfo()
        info["name"] = cpu.get("model name") or platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
        info["threads_from"] = _threads_from
        info["cores_available"] = available_cores()
        info["bf16"] = cpu_bf16()[1]
    return info


# ----------------------------------------------------------------------------- threads

THREADS_ENV = "PUREGEN_FAST_THREADS"
# OpenMP aborts the process (no message, no exit code of ours) when it cannot start the threads
# asked for; far more than any machine's cores is a typo
MAX_THREADS = 1024
_threads_from = "torch's default"  # what set the thread count, for describe_device


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(requested: int | None = None) -> tuple[int, str]:
    """The thread count and where it came from: ``requested`` (``--threads``), else
    ``$PUREGEN_FAST_THREADS``, else ``$OMP_NUM_THREADS``, else the cores this process may use.
    ValueError naming the flag or variable for a count outside [1, `MAX_THREADS`] or a variable
    that is not an integer."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise ValueError(
                f"--threads must be an integer in [1, {MAX_THREADS}]; got {requested!r}"
            )
        if not 1 <= requested <= MAX_THREADS:
            raise ValueError(f"--threads must be in [1, {MAX_THREADS}]; got {requested}")
        return requested, "--threads"
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        env = os.environ.get(var, "").strip()
        if not env:
            continue
        try:
            n = int(env)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(
                f"${var}={env!r} is not an integer in [1, {MAX_THREADS}]; set it to a thread "
                "count or unset it (default: the cores this process may use)"
            )
        return n, f"${var}"
    return available_cores(), "cores this process may use"


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads (and MKL's, through torch) and ``OMP_NUM_THREADS`` (read by
    OpenMP in the processes we start, e.g. compile workers) before work starts; see the module
    doc for the default. Returns the count."""
    global _threads_from
    n, _threads_from = resolve_threads(requested)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


# ----------------------------------------------------------------------------- the CPU


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def _flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


@dataclass(frozen=True)
class CPUMatrix:
    """Dense FLOPs per cycle and core of this CPU's matrix units, and how they were found."""

    fp32: int  # FMA lanes: 2 FLOPs per lane and FMA
    bf16: int | None  # None: no bf16 matrix instructions
    isa: str  # what runs bf16 matrix math: "AMX", "AVX512-BF16" or "none"
    cpu: str  # vendor and family, as /proc/cpuinfo gives them
    fp32_how: str
    bf16_how: str


def cpu_matrix() -> CPUMatrix:
    """Per-core, per-cycle dense FLOP rates from the CPU's flags and family (/proc/cpuinfo).

    * AMX (``amx_bf16``): one TDPBF16PS of 16x32 by 32x16 bf16 tiles every 16 cycles, i.e. 512
      multiply-adds = 1024 FLOP/cycle (Intel's figure for Sapphire Rapids and later);
    * AVX512-BF16 (``avx512_bf16``): VDPBF16PS does 32 bf16 multiply-adds per 512-bit register
      (64 FLOP); two per cycle on cores with two full-width FMA pipes (AMD family 26, Zen 5;
      Intel Xeons), one on AMD family 25 (Zen 4, 512-bit ops on 256-bit pipes);
    * fp32: two FMA pipes of 16 (AVX-512) or 8 (AVX2) lanes, halved on Zen 4's AVX-512.
    """
    flags, info = _flags(), _cpuinfo()
    vendor, family = info.get("vendor_id", "?"), info.get("cpu family", "?")
    amd = vendor == "AuthenticAMD"
    half_width = amd and family == "25"  # Zen 4 runs 512-bit ops on 256-bit pipes
    where = f"{vendor} family {family}"
    if "avx512f" in flags:
        fp32, fp32_how = (32, "fp32 AVX-512 FMA on 256-bit pipes") if half_width else (
            64, "fp32: 2 AVX-512 FMA pipes x 16 lanes x 2")
    elif "fma" in flags:
        fp32, fp32_how = 32, "fp32: 2 AVX2 FMA pipes x 8 lanes x 2"
    else:
        fp32, fp32_how = 8, "fp32: no FMA flag read; 8 assumed"
    if {"amx_bf16", "amx_tile"} <= flags:
        bf16, isa, how = 1024, "AMX", "AMX TDPBF16PS: 512 bf16 multiply-adds per cycle"
    elif "avx512_bf16" in flags:
        pipes = 1 if half_width else 2
        bf16, isa = 64 * pipes, "AVX512-BF16"
        how = f"AVX512-BF16 VDPBF16PS: {pipes} x 32 bf16 multiply-adds per cycle"
    else:
        bf16, isa, how = None, "none", "no amx_bf16 or avx512_bf16 flag"
    return CPUMatrix(fp32, bf16, isa, where, fp32_how, how)


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 model math natively (AMX or AVX512-BF16, and oneDNN built in),
    and what was found: emulated bf16 (converting to fp32 and back) is slower than fp32."""
    m = cpu_matrix()
    if m.bf16 is None:
        return False, f"no bf16 matrix support on this CPU ({m.cpu}: {m.bf16_how})"
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False, f"{m.isa} found, but this torch build's oneDNN cannot run bf16"
    return True, f"{m.isa} bf16 matrix units (oneDNN), {m.bf16} FLOP/cycle/core"


_CLOCK_C = r"""
#include <stdint.h>
#include <time.h>
/* seconds for 4 * n dependent operations. x86-64: 64-bit multiplies, 3 cycles each on every
   Intel core since Nehalem and every AMD core since Zen; a chain of adds is not used, since
   recent Intel cores fold immediate adds in the renamer and run several per cycle. */
double run(uint64_t n) {
  struct timespec a, b;
  uint64_t x = 3;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (uint64_t i = 0; i < n; i++) {
#if defined(__x86_64__)
    __asm__ volatile("imul %0, %0; imul %0, %0; imul %0, %0; imul %0, %0" : "+r"(x));
#elif defined(__aarch64__)
    __asm__ volatile("add %0, %0, #1; add %0, %0, #1; add %0, %0, #1; add %0, %0, #1"
                     : "+r"(x));
#else
    return -1.0;
#endif
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  return (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
}
"""
# cycles per chained operation in _CLOCK_C, and what the chain is, per machine architecture
_CLOCK_CHAIN = {"x86_64": (3, "dependent 64-bit multiplies, 3 cycles each"),
                "aarch64": (1, "dependent integer adds, 1 cycle each")}  # fmt: skip
# The highest clock any shipping part of the vendor reaches (GHz): Intel Core i9-14900KS 6.2,
# AMD Ryzen 9 7950X/9950X 5.7. A measurement above it is wrong, whatever else the system says.
VENDOR_MAX_GHZ = {"GenuineIntel": 6.2, "AuthenticAMD": 5.7}
_ANY_VENDOR_MAX_GHZ = 6.2


def _measure_clock_ghz() -> tuple[float | None, str]:
    """One measurement of a busy core's clock: the rate of `_CLOCK_C`'s dependent chain, compiled
    with the C compiler inductor uses; the fastest of 201 short runs (another job taking the core
    only slows a run). (None, why) where nothing can be compiled or run."""
    chain = _CLOCK_CHAIN.get(platform.machine())
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if chain is None:
        return None, f"no clock probe for {platform.machine()}"
    if cc is None:
        return None, "no C compiler"
    try:
        with tempfile.TemporaryDirectory() as d:
            src, lib = Path(d, "clock.c"), Path(d, "clock.so")
            src.write_text(_CLOCK_C)
            subprocess.run([cc, "-O1", "-shared", "-fPIC", str(src), "-o", str(lib)],
                           check=True, capture_output=True, timeout=60)  # fmt: skip
            fn = ctypes.CDLL(str(lib)).run
        fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_uint64]
        # 0.4 ms a run (1.2M cycles at 3 GHz): far inside one scheduler slice, so on a busy
        # machine most runs still go uninterrupted, and the fastest of 201 is the clock
        n = 100_000
        best = min(fn(n) for _ in range(201))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the clock probe failed ({type(e).__name__})"
    if best <= 0:
        return None, "the clock probe returned no time"
    return 4 * n * chain[0] / best / 1e9, f"measured ({chain[1]})"


def _reported_clock() -> tuple[float | None, float | None, str]:
    """What the system says: the highest ``cpu MHz`` in /proc/cpuinfo (GHz; often the base
    clock on a virtual machine, the current one elsewhere), cpufreq's ``cpuinfo_max_freq`` (GHz)
    where the kernel exposes it, and the vendor's id."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    mhz = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            with contextlib.suppress(ValueError):
                mhz.append(float(value))
    top = None
    with contextlib.suppress(OSError, ValueError):
        top = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    return (max(mhz) / 1e3 if mhz else None), top, _cpuinfo().get("vendor_id", "?")


def plausible_clock(measured: float | None, how: str, reported: float | None,
                    max_freq: float | None, vendor: str) -> tuple[float | None, str]:  # fmt: skip
    """The clock to use, given a measurement and what the system reports (all GHz): the
    measurement where it lies between the reported clock and the ceiling, else the reported
    clock with the reason. The ceiling is the lowest of twice the reported clock, cpufreq's
    maximum (+5%) and the fastest part the vendor ships (`VENDOR_MAX_GHZ`)."""
    cap = VENDOR_MAX_GHZ.get(vendor, _ANY_VENDOR_MAX_GHZ)
    ceiling = min(x for x in (cap, 2 * reported if reported else None,
                              1.05 * max_freq if max_freq else None) if x)  # fmt: skip
    fallback = max_freq or reported
    src = ("cpufreq cpuinfo_max_freq" if max_freq
           else "/proc/cpuinfo cpu MHz (may be the base clock)")  # fmt: skip
    if measured is None:
        return fallback, (src if fallback else "unknown") + f"; {how}"
    if measured > ceiling:
        return (fallback or None), (
            f"{src if fallback else 'unknown'}; the measured {measured:.2f} GHz is above the "
            f"plausible ceiling of {ceiling:.2f} GHz, refused")
    if reported and measured < reported:
        return reported, (f"/proc/cpuinfo cpu MHz; the measured {measured:.2f} GHz was below "
                          "it (a busy core), refused")  # fmt: skip
    return measured, how


@functools.cache
def cpu_clock_ghz() -> tuple[float | None, str]:
    """The clock a busy core runs at, and how it was found: measured (`_measure_clock_ghz`),
    then checked against what the system reports (`plausible_clock`). Virtual machines often
    report only the base clock in /proc/cpuinfo, below what the cores run at; it is the floor
    and the fallback."""
    reported, top, vendor = _reported_clock()
    return plausible_clock(*_measure_clock_ghz(), reported, top, vendor)


def cpu_peak_tflops(precision: str, threads: int | None = None) -> tuple[float | None, str]:
    """Dense peak TFLOP/s of ``threads`` cores (default: torch's intra-op threads, at most the
    cores available) for the model math of ``precision`` (tf32 is fp32 on a CPU), and how it is
    derived: cores x clock x FLOP per cycle and core (`cpu_matrix`)."""
    check_precision(precision)
    cores = min(threads or torch.get_num_threads(), available_cores())
    m = cpu_matrix()
    bf16 = precision == "bf16"
    rate, rate_how = (m.bf16, m.bf16_how) if bf16 else (m.fp32, m.fp32_how)
    ghz, clock_how = cpu_clock_ghz()
    if rate is None or ghz is None:
        return None, f"no {precision} peak: {m.cpu}: {rate_how}; clock {clock_how}"
    peak = cores * ghz * rate / 1e3
    how = (f"{cores} core(s) x {ghz:.2f} GHz ({clock_how}) x {rate} FLOP/cycle ({m.cpu}, "
           f"{rate_how}) = {peak:.3f} TFLOP/s")  # fmt: skip
    return peak, how


# ----------------------------------------------------------------------------- compile caches


def cache_dir() -> Path:
    """The project's cache folder: ``$PUREGEN_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/puregen-fast``, else ``~/.cache/puregen-fast``."""
    root = os.environ.get("PUREGEN_FAST_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "puregen-fast"


def compile_cache_dir() -> Path:
    """Where inductor's caches persist: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else
    `cache_dir` + ``/inductor``."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(env) if env else cache_dir() / "inductor"


def _use_compile_cache() -> None:
    # inductor reads the variable when it first compiles and then fixes it for the process
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Model math in fp32 (tf32 off), tf32 (matmul/conv on tensor cores) or bf16 (autocast).
    The state x stays fp32 in every mode. cuDNN is held to deterministic algorithms, so a fixed
    batch size gives bit-identical results (DESIGN 2.2; some input-gradient convolutions would
    otherwise sum with atomics)."""
    check_precision(precision)
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


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_static(fn: F, fullgraph: bool = True, mode: str = "default") -> F:
    """``torch.compile`` with static shapes, after raising dynamo's recompile limits."""
    check_mode(mode)
    _use_compile_cache()
    cfg = torch._dynamo.config
    for name, value in _LIMITS.items():
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))
    return torch.compile(fn, fullgraph=fullgraph, dynamic=False, mode=mode)
