"""The fused kernels built for Hopper (sm_90) ahead of time, without a GPU: compile, then read
the machine code. ``python bench/kernel_asm.py [--arch 90]``

Each kernel is launched through its real launcher on CPU tensors shaped like a CIFAR batch, with
Triton's launch intercepted: the arguments it would get (types, the JIT's divisibility-by-16
specialisation, constexprs, warps) are compiled by ``triton.compile`` for the target instead. It
prints, per kernel, the registers, stack and local memory per thread (``cuobjdump``, shipped with
Triton), the shared memory per program and the byte widths of its global loads and stores of
32-bit words. Exit 1 when a kernel does not compile, uses local memory (spills), stores in
accesses narrower than 16 bytes, or loads its fp32 state in accesses narrower than 16 bytes (a
bf16 operand: 8 bytes, four values); the DDPM kernels' scalar coefficient loads are allowed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_asm: unset TRITON_INTERPRET (the interpreter builds no machine code)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from puregen_fast.kernels import _noise, ddpm, langevin  # noqa: E402
from puregen_fast.models.schedule import ddpm_coefficients  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64", torch.uint32: "u32"}


class _Captured(Exception):
    pass


def _capture(call: Callable[[], Any]) -> tuple[JITFunction, tuple, dict]:
    """Run a launcher up to its kernel launch and return (kernel, args, kwargs)."""
    seen: list = []

    def fake_run(self, *args, grid=None, warmup=False, **kwargs):
        seen.append((self, args, kwargs))
        raise _Captured

    saved = JITFunction.run
    patched = [(m, "check_launchable") for m in (_noise, ddpm, langevin)]
    olds = [getattr(m, n) for m, n in patched]
    JITFunction.run = fake_run
    for m, n in patched:
        setattr(m, n, lambda device: None)
    try:
        call()
    except _Captured:
        pass
    finally:
        JITFunction.run = saved
        for (m, n), old in zip(patched, olds):
            setattr(m, n, old)
    if not seen:
        raise RuntimeError("the launcher returned without launching a kernel")
    return seen[0]


def _source(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[ASTSource, dict]:
    """The ASTSource the JIT would build for these arguments (as far as this script needs)."""
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    no_spec = {names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or ())}
    const_names = {p.name for p in fn.params if p.is_constexpr}
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(names):
        v = values[name]
        if name in const_names:
            sig[name], consts[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            aligned = v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            sig[name], aligned = "i1", False
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            aligned = v % 16 == 0
        elif isinstance(v, float):
            sig[name], aligned = "fp32", False
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
        if aligned and name not in no_spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, constexprs=consts, attrs=attrs), options


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def _widths(ptx: str, op: str) -> list[int]:
    """Byte widths of the global accesses of 32-bit words (v4.b32 -> 16), leaving out read-only
    ``.nc`` loads: in these kernels those are only the constant table of sinf/cosf's slow-path
    argument reduction (the state and the operands are plain loads)."""
    return [
        int(vec or 1) * 4
        for vec in re.findall(rf"\b{op}\.global(?!\.nc)(?:\.v(\d))?\.[bfu]32\b", ptx)
    ]


# narrowest acceptable state/operand load per kernel, bytes: fp32 four at a time (16), a bf16
# operand four at a time (8); the noise kernel loads none
MIN_LOAD = {"bf16": 8, "writes only": 0}
# scalar fp32 loads a kernel makes besides its tensors: the DDPM coefficients of step t
SCALAR_LOADS = {"ddpm add_noise": 2, "ddpm step": 5}


def cases() -> dict[str, Callable[[], Any]]:
    """Each fused kernel as the samplers launch it: a batch of 3x32x32 images, seed and step as
    device tensors (the CUDA-graph path) and, for one case, as Python ints."""
    b, shape = 8, (3, 32, 32)
    x = torch.randn(b, *shape)
    ids = torch.arange(b, dtype=torch.int64) + 2**33
    seed = torch.tensor(7, dtype=torch.int64)
    step = torch.arange(4, dtype=torch.int64)[2]
    t = torch.tensor(40, dtype=torch.int64)
    coef = ddpm_coefficients()
    kw = {"seed": seed, "step": step, "sample_ids": ids}
    lkw = {"grad_scale": 7.8e-5, "noise_scale": 1.25e-2}
    return {
        "langevin fp32 grad": lambda: langevin.langevin_step_(x, torch.randn_like(x), **lkw, **kw),
        "langevin bf16 grad": lambda: langevin.langevin_step_(
            x, torch.randn_like(x).bfloat16(), **lkw, **kw
        ),
        "langevin int seed/step": lambda: langevin.langevin_step_(
            x, torch.randn_like(x), **lkw, seed=7, step=3, sample_ids=ids
        ),
        "ddpm add_noise": lambda: ddpm.ddpm_add_noise_(x, t, coefficients=coef, **kw),
        "ddpm step fp32 eps": lambda: ddpm.ddpm_step_(
            x, torch.randn_like(x), t, coefficients=coef, **kw
        ),
        "ddpm step bf16 eps": lambda: ddpm.ddpm_step_(
            x, torch.randn_like(x).bfloat16(), t, coefficients=coef, **kw
        ),
        "noise randn (writes only)": lambda: _noise.randn_triton(
            7, 1, step, ids, shape, device="cpu"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}\n")
    print("| kernel | warps | REG | STACK | LOCAL | shared B | loads B | stores B |")
    print("|---|---|---|---|---|---|---|---|")
    bad = []
    for name, call in cases().items():
        try:
            fn, a, kw = _capture(call)
            src, options = _source(fn, a, kw)
            k = triton.compile(src, target=target, options=options)
        except Exception as e:  # report every kernel, then fail
            print(f"| {name} | compile failed: {type(e).__name__}: {str(e)[:200]} ||||||")
            bad.append(name)
            continue
        res = _resources(k.asm["cubin"])
        lds, sts = _widths(k.asm["ptx"], "ld"), _widths(k.asm["ptx"], "st")
        span = lambda w: "-" if not w else f"{min(w)}" if min(w) == max(w) else f"{min(w)}-{max(w)}"  # noqa: E731
        print(
            f"| {name} | {options.get('num_warps', 4)} | {res.get('REG', '?')} | "
            f"{res.get('STACK', '?')} | {res.get('LOCAL', '?')} | {k.metadata.shared} | "
            f"{span(lds)} | {span(sts)} |"
        )
        min_load = next((v for key, v in MIN_LOAD.items() if key in name), 16)
        scalars = next((v for key, v in SCALAR_LOADS.items() if key in name), 0)
        wide = sorted(lds)[scalars:]  # drop the coefficient loads, the narrowest
        if (
            "REG" not in res
            or res.get("LOCAL", 1) != 0  # local memory: spills (or an unreadable report)
            or not sts
            or min(sts) < 16
            or lds.count(4) > scalars
            or (min_load and (not wide or min(wide) < min_load))
        ):
            bad.append(name)
    if bad:
        print(f"\nFAILED: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
