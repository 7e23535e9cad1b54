"""The fused kernels built for Hopper (sm_90) ahead of time, without a GPU: compile, then read
the machine code. ``python bench/kernel_asm.py [--arch 90] [--only update|conv]``

Each kernel is launched through its real launcher on CPU tensors shaped like a CIFAR batch, with
Triton's launch intercepted: the arguments it would get (types, the JIT's divisibility-by-16
specialisation, constexprs, warps) are compiled by ``triton.compile`` for the target instead. It
prints, per kernel, the registers, stack and local memory per thread (``cuobjdump``, shipped with
Triton), the shared memory per program and the byte widths of its global loads and stores of
32-bit words. Exit 1 when a kernel does not compile, uses local memory (spills), stores in
accesses narrower than 16 bytes, or loads its fp32 state in accesses narrower than 16 bytes (a
bf16 operand: 8 bytes, four values); the DDPM kernels' scalar coefficient loads are allowed.

A second table covers the EBM conv-block kernels (`puregen_fast.kernels.ebm_conv`), launched as
the paper's EBM (nf 128) runs them at batch 512: registers, local memory, shared memory, and the
matrix instructions in the SASS (``HGMMA``: Hopper's warpgroup MMA, wgmma; ``HMMA``: the older
warp-level MMA; ``FFMA`` when neither). Exit 1 also when a conv kernel spills (local memory) or
has no matrix instruction in a bf16 or tf32 build.
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

from puregen_fast.kernels import _noise, ddpm, ebm_conv, langevin  # noqa: E402
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
    patched = [(m, "check_launchable") for m in (_noise, ddpm, langevin, ebm_conv)]
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


def conv_cases() -> dict[str, Callable[[], Any]]:
    """The conv-block kernels at the paper's EBM shapes (nf 128, batch 512): each kernel shape,
    forward with the ReLU prologue and residual epilogue, input gradient with mask and residual;
    bf16 (what a bf16 run launches), fp32 with TF32 products, and IEEE fp32."""
    b, nf = 512, 128
    out: dict[str, Callable[[], Any]] = {}
    for dt, tag, tf32 in ((torch.bfloat16, "bf16", False), (torch.float32, "tf32", True),
                          (torch.float32, "fp32", False)):  # fmt: skip
        for shape, hw, cin in (("3x3", 16, nf), ("4x4s2", 32, nf), ("2x2s2", 32, nf),
                               ("3x3", 32, 3), ("1x1", 16, nf)):  # fmt: skip
            if tag != "bf16" and (shape != "3x3" or cin != nf):
                continue  # fp32/tf32: the main shape only
            k, st, pad = ebm_conv.CONV_SHAPES[shape]
            ho, wo = ebm_conv.conv_out_hw(hw, hw, (k, k), st, pad)
            x = torch.empty(b, hw, hw, cin, dtype=dt)
            wp = torch.empty(k, k, cin, nf, dtype=dt)
            bias = torch.empty(nf)
            res = torch.empty(b, ho, wo, nf, dtype=dt)
            dy = torch.empty(b, ho, wo, nf, dtype=dt)
            kw = {"stride": st, "padding": pad, "tf32": tf32}
            name = f"{shape} {cin}->{nf} @{hw}x{hw} {tag}"
            out[f"fwd {name}"] = lambda x=x, wp=wp, bias=bias, res=res, kw=kw: (
                ebm_conv.conv2d_nhwc(x, wp, bias, relu_in=True, residual=res, **kw)
            )
            out[f"dgrad {name}"] = lambda dy=dy, wp=wp, x=x, kw=kw, hw=hw: (
                ebm_conv.conv2d_input_grad_nhwc(dy, wp, (hw, hw), mask=x, residual=x, **kw)
            )
    return out


def _mma_counts(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [str(_cuobjdump()), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    ops = re.findall(r"\b(HGMMA|HMMA|FFMA)\b", sass)
    return {op: ops.count(op) for op in ("HGMMA", "HMMA", "FFMA")}


def _conv_table(target: GPUTarget) -> list[str]:
    print("\n| conv kernel | warps | stages | REG | STACK | LOCAL | shared B | HGMMA | HMMA "
          "| FFMA |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    bad = []
    for name, call in conv_cases().items():
        try:
            fn, a, kw = _capture(call)
            src, options = _source(fn, a, kw)
            k = triton.compile(src, target=target, options=options)
        except Exception as e:
            print(f"| {name} | compile failed: {type(e).__name__}: {str(e)[:200]} |||||||||")
            bad.append(name)
            continue
        res = _resources(k.asm["cubin"])
        mma = _mma_counts(k.asm["cubin"])
        print(
            f"| {name} | {options.get('num_warps', 4)} | {options.get('num_stages', 3)} | "
            f"{res.get('REG', '?')} | {res.get('STACK', '?')} | {res.get('LOCAL', '?')} | "
            f"{k.metadata.shared} | {mma['HGMMA']} | {mma['HMMA']} | {mma['FFMA']} |"
        )
        matrix = mma["HGMMA"] + mma["HMMA"]
        if "REG" not in res or res.get("LOCAL", 1) != 0 or ("fp32" not in name and not matrix):
            bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    p.add_argument("--only", choices=("update", "conv"), default=None,
                   help="only the update kernels' table, or only the conv kernels'")  # fmt: skip
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}\n")
    bad = [] if args.only == "update" else _conv_table(target)
    if args.only == "conv":
        if bad:
            print(f"\nFAILED: {', '.join(bad)}")
        return 1 if bad else 0
    print()
    print("| kernel | warps | REG | STACK | LOCAL | shared B | loads B | stores B |")
    print("|---|---|---|---|---|---|---|---|")
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
