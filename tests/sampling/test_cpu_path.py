"""The CPU fast path (issue 14): bf16 only where the CPU has bf16 matrix units, the peak it is
measured against, thread control, the compile-cache folder, backend="auto" weighing the work,
and no recompile per step. Compiles here use dynamo with the eager backend (the recompile
question is dynamo's: its guards), so the module stays within a few seconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import assert_rel

import puregen_fast as pg
from puregen_fast import runtime
from puregen_fast.sampling import langevin
from puregen_fast.sampling.backends import AUTO_CPU_MIN_IMAGE_STEPS, fast_available
from puregen_fast.sampling.config import SamplerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend
CPU = torch.device("cpu")

SPR = {"vendor_id": "GenuineIntel", "cpu family": "6", "model name": "Intel Xeon",
       "flags": "fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"}  # fmt: skip
ZEN4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "avx2 fma avx512f avx512_bf16"}
ZEN5 = {"vendor_id": "AuthenticAMD", "cpu family": "26", "flags": "avx2 fma avx512f avx512_bf16"}
AVX2 = {"vendor_id": "GenuineIntel", "cpu family": "6", "flags": "avx2 fma"}


@pytest.fixture
def cpu_as(monkeypatch):
    """Pretend /proc/cpuinfo reads ``fields``."""

    def use(fields: dict[str, str]) -> None:
        monkeypatch.setattr(runtime, "_cpuinfo", lambda: fields)

    return use


@pytest.mark.parametrize(
    "fields, fp32, bf16, isa",
    [(SPR, 64, 1024, "AMX"), (ZEN5, 64, 128, "AVX512-BF16"), (ZEN4, 32, 64, "AVX512-BF16"),
     (AVX2, 32, None, "none")],  # fmt: skip
)
def test_matrix_rates_from_the_cpu_flags(cpu_as, fields, fp32, bf16, isa):
    cpu_as(fields)
    m = runtime.cpu_matrix()
    assert (m.fp32, m.bf16, m.isa) == (fp32, bf16, isa)
    ok, why = runtime.cpu_bf16()
    assert ok == (bf16 is not None) and (isa in why or "no bf16" in why)


def test_bf16_is_refused_on_a_cpu_without_bf16_units(cpu_as):
    """Emulated bf16 would be slower than fp32 and other numbers: refused, with the reason,
    for the fast path and for the engine; allowed where AMX or AVX512-BF16 is found."""
    cpu_as(AVX2)
    ok, why = fast_available(CPU, "bf16")
    assert not ok and "no bf16 matrix support" in why and "fp32" in why
    ebm = pg.EBMSNGAN32(nf=4)
    with pytest.raises(ValueError, match="bf16 matrix"):
        pg.Purifier("ebm", ebm=ebm, device="cpu", backend="fast", precision="bf16")
    r = pg.Purifier("ebm", ebm=ebm, device="cpu", backend="auto", precision="bf16")
    assert r.backend == "reference" and "bf16" in r.backend_reason
    cpu_as(SPR)
    ok, why = fast_available(CPU, "bf16")
    assert ok and "AMX" in why
    p = pg.Purifier("ebm", ebm=ebm, device="cpu", backend="fast", precision="bf16")
    assert p.backend == "fast" and "AMX" in p.backend_reason


def test_peak_is_cores_times_clock_times_rate(cpu_as, monkeypatch):
    cpu_as(SPR)
    monkeypatch.setattr(runtime, "cpu_clock_ghz", lambda: (2.0, "test clock"))
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    peak, how = runtime.cpu_peak_tflops("bf16", threads=4)
    assert peak == pytest.approx(4 * 2.0 * 1024 / 1e3)
    assert "4 core(s) x 2.00 GHz (test clock) x 1024 FLOP/cycle" in how and "AMX" in how
    assert runtime.cpu_peak_tflops("fp32", threads=16)[0] == pytest.approx(8 * 2.0 * 64 / 1e3)
    cpu_as(AVX2)
    assert runtime.cpu_peak_tflops("bf16")[0] is None


def test_the_clock_lies_between_the_reported_clock_and_the_ceiling():
    # on any vendor: at or above /proc/cpuinfo's MHz, at most twice it and the vendor's fastest
    ghz, how = runtime.cpu_clock_ghz()
    reported, top, vendor = runtime._reported_clock()
    if reported is None:
        pytest.skip("this system reports no cpu MHz to check the clock against")
    cap = runtime.VENDOR_MAX_GHZ.get(vendor, runtime._ANY_VENDOR_MAX_GHZ)
    assert ghz is not None and reported <= ghz <= cap, (ghz, how, reported)
    # twice the reported clock, unless it is an idle reading and cpufreq's maximum was used
    assert ghz <= 2 * reported or (top is not None and ghz <= 1.05 * top), (ghz, how, reported)
    if top is not None:
        assert ghz <= 1.05 * top, (ghz, how, top)


def test_the_clock_measurement_is_stable():
    got = [runtime._measure_clock_ghz() for _ in range(3)]
    if got[0][0] is None:
        pytest.skip(f"no clock measurement here: {got[0][1]}")
    ghz = [g for g, _ in got]
    assert max(ghz) <= 1.10 * min(ghz), got


@pytest.mark.parametrize("measured, reported, top, vendor, want, says", [
    (2.97, 2.3, None, "GenuineIntel", 2.97, "measured"),
    (11.96, 2.3, None, "GenuineIntel", 2.3, "above the plausible ceiling of 4.60"),  # folded adds
    (6.0, 3.5, None, "AuthenticAMD", 3.5, "above the plausible ceiling of 5.70"),
    (4.0, 2.0, 3.5, "GenuineIntel", 3.5, "cpufreq"),  # above cpufreq's maximum
    (1.1, 2.3, None, "GenuineIntel", 2.3, "below it"),  # a busy core
    (None, 2.3, None, "GenuineIntel", 2.3, "no C compiler"),
    (None, None, None, "?", None, "unknown"),
    (3.0, None, None, "?", 3.0, "measured"),
    (7.0, None, None, "?", None, "above the plausible ceiling of 6.20"),
])  # fmt: skip
def test_an_implausible_clock_is_refused_with_the_reason(measured, reported, top, vendor, want,
                                                         says):  # fmt: skip
    how = "measured (test)" if measured is not None else "no C compiler"
    ghz, why = runtime.plausible_clock(measured, how, reported, top, vendor)
    assert ghz == want and says in why, (ghz, why)


def test_threads_flag_then_variables_then_the_cores(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.resolve_threads() == (runtime.available_cores(), "cores this process may use")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.resolve_threads() == (3, "$OMP_NUM_THREADS")
    monkeypatch.setenv(runtime.THREADS_ENV, "5")
    assert runtime.resolve_threads() == (5, "$PUREGEN_FAST_THREADS")
    assert runtime.resolve_threads(2) == (2, "--threads")
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(runtime.THREADS_ENV, bad)
        with pytest.raises(ValueError, match="PUREGEN_FAST_THREADS"):
            runtime.resolve_threads()
    with pytest.raises(ValueError, match="--threads"):
        runtime.resolve_threads(0)


def test_set_threads_sets_torch_and_openmp(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        assert runtime.set_threads(1) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        d = runtime.describe_device(CPU)
        assert d["threads"] == 1 and d["threads_from"] == "--threads"
    finally:
        torch.set_num_threads(before)


def test_compile_cache_lives_in_the_project_cache(monkeypatch, tmp_path):
    from puregen_fast.data.download import cache_root

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    for var, value in [("PUREGEN_FAST_CACHE", tmp_path / "a"), ("XDG_CACHE_HOME", tmp_path)]:
        monkeypatch.delenv("PUREGEN_FAST_CACHE", raising=False)
        monkeypatch.setenv(var, str(value))
        assert runtime.compile_cache_dir() == cache_root() / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.compile_cache_dir() == tmp_path / "mine"


def test_auto_on_cpu_weighs_the_work():
    """backend="auto" on a CPU: too little work for the compile to pay runs on the reference,
    saying why; enough runs fast; an explicit backend is never second-guessed."""
    ebm = pg.EBMSNGAN32(nf=4)
    p = pg.Purifier("ebm", ebm=ebm, ebm_steps=150, device="cpu", backend="auto")
    small = AUTO_CPU_MIN_IMAGE_STEPS // 150 - 1
    p.plan(small)
    assert p.backend == "reference" and "image-steps" in p.backend_reason
    p.plan(small + 2)
    assert p.backend == "fast"
    f = pg.Purifier("ebm", ebm=ebm, ebm_steps=150, device="cpu", backend="fast")
    f.plan(1)
    assert f.backend == "fast"


class _Counter:
    """A dynamo backend that counts the graphs it is handed (each a compile) and runs them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_twenty_steps_compile_once(monkeypatch):
    """The fused CPU step (gradient, keyed noise and update in one graph) compiles once for a
    shape: step numbers reach it as tensors, never as new Python ints, so 20 steps and a second
    batch at another step offset add no compile."""
    counter = _Counter()

    def counted(fn, fullgraph=True, mode="default"):
        return torch.compile(fn, backend=counter, fullgraph=fullgraph, dynamic=False)

    monkeypatch.setattr(langevin, "compile_static", counted)
    torch._dynamo.reset()
    torch.manual_seed(0)
    ebm = pg.EBMSNGAN32(nf=4).eval().requires_grad_(False)
    cfg = SamplerConfig(ebm_steps=20, device=CPU, conv_impl="torch")
    fast = langevin.FastLangevin(cfg, ebm)
    assert fast._fused is not None and "compiled into the gradient" in fast.update_impl
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    ids = torch.arange(3)
    a = fast.run(x, ids, stream=1)
    assert counter.graphs == 1
    fast.run(x, ids + 3, stream=1, step_offset=20)
    assert counter.graphs == 1
    # the same numbers as the unfused eager loop on the same keyed noise
    eager = langevin.FastLangevin(SamplerConfig(ebm_steps=20, device=CPU, compile=False), ebm)
    assert eager._fused is None
    assert_rel(a, eager.run(x, ids, stream=1), 1e-5)


def test_bench_refuses_bf16_without_units(cpu_as, capsys):
    from puregen_fast.cli.main import main

    cpu_as(AVX2)
    argv = ["bench", "--device", "cpu", "--model", "small", "--batch-size", "2", "--steps", "1",
            "--precision", "bf16"]  # fmt: skip
    assert main(argv) == 2
    assert "--precision bf16" in capsys.readouterr().err



def test_the_api_picks_the_backend_by_the_commands_rule():
    """8 images through the Python API: as `purify` would, the first call weighs its own batch
    (8 x 3 image-steps) and runs the reference instead of compiling the fast path (issue 24
    item 4); `plan` first keeps the choice for the whole work."""
    ebm = pg.EBMSNGAN32(nf=4)
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    p = pg.Purifier("ebm", ebm=ebm, ebm_steps=3, device="cpu", backend="auto")
    ok, _ = fast_available(torch.device("cpu"), "fp32")
    assert p.backend == ("fast" if ok else "reference")  # before any call: nothing known
    p(x, np.arange(8))
    assert p.backend == "reference"
    if ok:
        assert "24 image-steps" in p.backend_reason
        q = pg.Purifier("ebm", ebm=ebm, ebm_steps=3, device="cpu", backend="auto")
        q.plan(AUTO_CPU_MIN_IMAGE_STEPS)  # the caller knows more work follows
        assert q.backend == "fast"
