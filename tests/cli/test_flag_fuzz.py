"""Every numeric flag has a checked type with a documented range, and no flag value ends in a
traceback (issue 22, items 8 and 9).

* `test_every_numeric_flag_has_a_range`: no flag of any subcommand takes a bare ``int`` or
  ``float``; each type carries its range, and the help shows it.
* `test_hostile_values_exit_2`: the values that ended in a traceback, a hang or a partial output
  before, each exit 2 naming the flag and its range, with nothing written.
* `test_fuzz_*`: property-based: ``main(argv)`` per subcommand with one flag set to a generated
  value (negative, zero, huge, NaN, inf, empty, non-numeric, just outside the range, or a small
  valid one), on tiny fixtures, each case under a deadline and a memory cap: only exit 0 or the
  command's own usage error (exit 2) may come out, and a value refused while parsing writes
  nothing. A few cases per subcommand by default; ``-m slow`` runs 10,000 each. With
  ``$PUREGEN_FAST_FUZZ_REPORT`` set, the counts per subcommand are written there as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import Hang, no_hang
from helpers import budget_spent, memory_cap, skip_if_cut
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from puregen_fast.cli.argtypes import ranged_actions
from puregen_fast.cli.main import build_parser, main
from puregen_fast.models.checkpoints import save_ddpm, save_ebm
from puregen_fast.models.ebm import EBMSNGAN32
from puregen_fast.models.unet import UNET_PRESETS, UNet2D

pytestmark = pytest.mark.usefixtures("one_thread")

DEADLINE_S = 60.0  # per case; the valid runs below take well under a second
MEMORY_CAP = 3 << 30  # bytes of address space a case may add
SLOW_EXAMPLES = 10_000
DEFAULT_EXAMPLES = 6

SUBCOMMANDS = ("purify", "bench", "train ebm", "train ddpm", "eval trigger", "eval poison",
               "eval run", "eval experiment", "eval photos", "info")  # fmt: skip


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Tiny inputs every subcommand's valid run uses: 8 images of 16x16, an nf=2 EBM, the tiny
    UNet, a 4x4 trigger."""
    root = tmp_path_factory.mktemp("flagfuzz")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "d.npz", x=x, y=(np.arange(8) % 2).astype(np.int64))
    torch.manual_seed(0)
    save_ebm(EBMSNGAN32(nf=2), root / "ebm")
    unet = dict(UNET_PRESETS["tiny"], sample_size=16)
    save_ddpm(UNet2D.from_config(unet), root / "ddpm")
    trigger = root / "t.npy"
    np.save(trigger, np.full((1, 3, 4, 4), 0.05, np.float32))
    return {"root": root, "data": root / "d.npz", "ebm": root / "ebm", "ddpm": root / "ddpm",
            "trigger": trigger}  # fmt: skip


def base_argv(cmd: str, w: dict[str, Path], out: Path) -> list[str]:
    """A valid, tiny run of ``cmd`` writing under ``out``."""
    d, o = str(w["data"]), str(out)
    cpu = ["--device", "cpu"]
    return {
        "purify": ["purify", "--dataset", "npz", "--data-dir", d, "--method", "ebm+ddpm",
                   "--ebm", str(w["ebm"]), "--ddpm", str(w["ddpm"]), "--ebm-steps", "1",
                   "--ddpm-steps", "1", "--backend", "reference", *cpu, "--quiet", "--limit",
                   "2", "--batch-size", "2", "--out", o],
        "bench": ["bench", "--model", "small", *cpu, "--batch-size", "1", "--steps", "1",
                  "--repeats", "1", "--backends", "authors", "--image-size", "8"],
        "train ebm": ["train", "ebm", "--dataset", "npz", "--data-dir", d, "--out", o, "--nf",
                      "2", "--bank-size", "2", "--batch-size", "2", "--mcmc-steps", "1",
                      "--backend", "reference", *cpu, "--no-progress", "--steps", "1",
                      "--epochs", "1", "--sample-every", "1000", "--ckpt-every", "1000"],
        "train ddpm": ["train", "ddpm", "--dataset", "npz", "--data-dir", d, "--out", o,
                       "--unet", "tiny", "--batch-size", "2", *cpu, "--no-progress", "--steps",
                       "1", "--epochs", "1", "--warmup-steps", "0", "--purify-steps", "1",
                       "--sample-every", "1000", "--ckpt-every", "1000"],
        "eval trigger": ["eval", "trigger", "--size", "4", "4", "--out", f"{o}/t.npy"],
        "eval poison": ["eval", "poison", "--dataset", "npz", "--data-dir", d, "--trigger",
                        str(w["trigger"]), "--target-class", "0", "--count", "1", "--out",
                        f"{o}/p.npz", "--quiet"],
        "eval run": ["eval", "run", "--train-npz", d, "--test-dataset", "npz",
                     "--test-data-dir", d, "--arch", "airbench", "--steps", "1", "--batch-size",
                     "2", "--widths", "2,2,2", *cpu, "--quiet", "--json", f"{o}/r.json"],
        "eval experiment": ["eval", "experiment", "--dataset", "npz", "--data-dir", d,
                            "--test-dataset", "npz", "--test-data-dir", d, "--trigger",
                            str(w["trigger"]), "--target-class", "0", "--count", "1",
                            "--defenses", "none", "--classifier",
                            "airbench:widths=2/2/2,steps=1,batch_size=2", "--seeds", "0", *cpu,
                            "--quiet", "--out", o],
        "eval photos": ["eval", "photos", "--out", o, "--size", "8", "--train-per-class", "1",
                        "--test-per-class", "1", "--heldout-per-class", "0"],
        "info": ["info", "--json"],
    }[cmd]  # fmt: skip


@functools.cache  # building the parser takes 70 ms; main() builds its own each case
def flags_of(cmd: str) -> dict[str, argparse.Action]:
    """The ranged flags of subcommand ``cmd`` ("eval run"): option string -> action."""
    prog = "puregen-fast " + cmd
    return {a.option_strings[-1]: a for p, a, _ in ranged_actions(build_parser()) if p == prog}


def with_value(argv: list[str], action: argparse.Action, value: str) -> list[str]:
    """``argv`` with ``action``'s flag set to ``value`` (replacing a value it already has)."""
    n = 2 if action.nargs == 2 else 1
    for opt in action.option_strings:
        if opt in argv:
            i = argv.index(opt)
            argv = argv[:i] + argv[i + 1 + n :]
    if n == 1 and action.nargs is None:  # --flag=value: a value like -inf stays a value
        return [*argv, f"{action.option_strings[-1]}={value}"]
    return [*argv, action.option_strings[-1], *([value] * n)]


def run_case(argv: list[str]) -> tuple[int, str, bool]:
    """``main(argv)`` under the deadline and the memory cap: (exit code, stderr, whether it
    was refused while parsing)."""
    err = io.StringIO()
    parsing = False
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with no_hang(DEADLINE_S), memory_cap(MEMORY_CAP):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: a value its type refused
                rc, parsing = e.code, True
    return rc, err.getvalue(), parsing


@pytest.fixture
def env(world, tmp_path, monkeypatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PUREGEN_FAST_THREADS", "1")
    return {**world, "tmp": tmp_path}


# ----------------------------------------------------------------------------- ranges


def _value_flags(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    stack = [parser]
    while stack:
        p = stack.pop()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack += list(dict.fromkeys(a.choices.values()))
            elif a.option_strings and a.nargs != 0 and a.choices is None:
                yield p.prog, a


def test_every_numeric_flag_has_a_range():
    """A flag typed as a bare int or float (or any type but text) must carry its range, and the
    help must show it; before, `bench --batch-size` and every `train` number were bare."""
    bare, undocumented = [], []
    for prog, a in _value_flags(build_parser()):
        if a.type in (None, str):
            continue
        if not getattr(a.type, "range", None):
            bare.append(f"{prog} {a.option_strings[-1]}")
        elif f"range: {a.type.range}" not in (a.help or ""):
            undocumented.append(f"{prog} {a.option_strings[-1]}")
    assert not bare, f"flags without a checked, ranged type: {bare}"
    assert not undocumented, f"flags whose help does not give the range: {undocumented}"


def test_every_range_is_in_the_readme():
    """The README's flag-range table lists every ranged flag with the range its type checks."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("### Flag ranges") :]
    missing = []
    for prog, a, typ in ranged_actions(build_parser()):
        cmd = prog.removeprefix("puregen-fast").strip() or "(all)"
        row = f"| {cmd} | `{a.option_strings[-1]}` | {typ.range} |"
        if (a.option_strings[-1] != "--threads" or cmd == "(all)") and row not in table:
            missing.append(row)
    assert not missing, "README rows missing or stale:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------- the values


HOSTILE = [
    ("train ebm", "--seed", "-1"),
    ("train ebm", "--seed", "99999999999999999999"),
    ("train ddpm", "--seed", "-1"),  # wrote checkpoints before failing
    ("train ebm", "--nf", "65536"),  # 154 GB
    ("train ebm", "--bank-size", "1000000000"),  # 12 TB
    ("train ebm", "--patch-size", "0"),
    ("train ebm", "--data-noise", "inf"),
    ("train ebm", "--watch-window", "99999999999999999999"),
    ("train ebm", "--watch-trend-window", "99999999999999999999"),
    ("train ebm", "--adam-beta1", "1"),
    ("train ebm", "--adam-beta2", "-1"),
    ("train ddpm", "--adam-beta1", "nan"),
    ("train ebm", "--weight-decay", "-1"),
    ("train ddpm", "--weight-decay", "nan"),
    ("train ebm", "--mcmc-steps", "100000000000000000000"),
    ("train ebm", "--mcmc-eps", "1e308"),
    ("train ebm", "--steps", "100000000000000000000"),
    ("eval run", "--lr", "1e-320"),
    ("eval run", "--crop-pad", "99999999999999999999"),
    ("eval run", "--crop-pad", "1024"),  # 53 GB at batch 1024
    ("eval run", "--seed", "99999999999999999999"),
    ("eval trigger", "--size", "65536"),
    ("eval trigger", "--eps", "1e308"),
    ("eval photos", "--size", "65536"),
    ("bench", "--batch-size", "99999999999999999999"),
    ("purify", "--ebm-steps", "100000000000000000000"),
    ("purify", "--ebm-eps", "1e308"),
    ("purify", "--divergence-margin", "1e-320"),  # blamed the EBM, exit 1
    ("purify", "--threads", "65536"),  # OpenMP aborted the process
]


@pytest.mark.parametrize(("cmd", "flag", "value"), HOSTILE, ids=lambda v: str(v)[:12])
def test_hostile_values_exit_2(env, cmd, flag, value):
    out = env["tmp"] / "out"
    action = flags_of(cmd)[flag]
    rc, err, parsing = run_case(with_value(base_argv(cmd, env, out), action, value))
    assert (rc, parsing) == (2, True), err
    assert flag in err and action.type.range in err, err
    assert "Traceback" not in err
    assert not out.exists(), "a refused value wrote output"


@pytest.mark.parametrize("flag", ["--json", "--md"])
def test_bench_output_paths_are_checked_first(env, flag):
    """A folder (or a file where a folder must be) as bench's --json/--md is refused before the
    minutes of timing, not after them."""
    folder = env["tmp"] / "f"
    folder.mkdir()
    a_file = env["tmp"] / "file"
    a_file.write_text("x")
    argv = base_argv("bench", env, env["tmp"])
    for bad in (str(folder), str(a_file / "r.json"), "", "9" * 5000, "r\x00.json", "~0/r.json"):
        rc, err, parsing = run_case([*argv, f"{flag}={bad}"])
        assert (rc, parsing) == (2, True) and flag in err, err


# ----------------------------------------------------------------------------- the fuzz

GENERIC = ["-1", "0", "-0", "1", "1e20", "99999999999999999999", "65536", "1000000000", "nan",
           "inf", "-inf", "", " ", "abc", "1e-320", "1e308", "-1e308", "1e400", "0x10", "1_0",
           "\u0663", str(2**63), str(2**64), "9" * 5000, "1.5", "-0.5", "1e-30", "all"]  # fmt: skip


def outside(action: argparse.Action) -> list[str]:
    """Values just outside the flag's range."""
    lo, hi, lo_open, hi_open = getattr(action.type, "bounds", None) or (None, None, 0, 0)
    if lo is None:
        return []
    if getattr(action.type, "kind", None) in (int, "list"):
        return [str(lo - 1)] + ([] if hi is None else [str(hi + 1)])
    below = lo if lo_open else math.nextafter(lo, -math.inf)
    above = hi if hi_open else math.nextafter(hi, math.inf)
    return [repr(below), repr(above)]


def valid_small(action: argparse.Action) -> st.SearchStrategy[str]:
    """In-range values that keep the run tiny: integers at the bottom of the range, any finite
    number of a float range (their cost does not depend on the value)."""
    lo, hi, lo_open, hi_open = getattr(action.type, "bounds", None) or (None, None, 0, 0)
    if lo is None:
        return st.nothing()
    if getattr(action.type, "kind", None) is float:
        return st.floats(lo, hi, exclude_min=lo_open, exclude_max=hi_open).map(repr)
    top = lo + 2 if hi is None else min(lo + 2, hi)
    return st.integers(lo, top).map(str)


def values(action: argparse.Action) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(GENERIC + outside(action)),
        st.integers(-(2**80), 2**80).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(max_size=6),
        valid_small(action),
    )


def costly(action: argparse.Action, value: str) -> bool:
    """Whether ``value`` is an integer the flag accepts, above the bottom of its range."""
    if getattr(action.type, "kind", None) not in (int, "list"):
        return False
    try:
        v = action.type(value)
    except (argparse.ArgumentTypeError, ValueError):
        return False
    lo = action.type.bounds[0]
    return v is not None and any(x > lo + 2 for x in (v if isinstance(v, tuple) else [v]))


TALLY: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("PUREGEN_FAST_FUZZ_REPORT")
    if path and TALLY:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in TALLY.items()}, indent=2))


def _fuzz(cmd: str, env: dict[str, Path], data: st.DataObject, run: bool = True) -> None:
    """One case; ``run=False`` draws it alike (hypothesis wants every case to draw as it did
    before) but runs nothing: what a case does once the run's time budget has ended."""
    flags = flags_of(cmd)
    action = flags[data.draw(st.sampled_from(sorted(flags)), label="flag")]
    value = data.draw(values(action), label="value")
    # an in-range integer above the bottom of its range is a valid run that may be long (10**5
    # Langevin steps): not what this test is for
    assume(not costly(action, value))
    if not run:
        return
    n = TALLY[cmd]["cases"]
    out = env["tmp"] / f"case{n}"
    argv = with_value(base_argv(cmd, env, out), action, value)
    TALLY[cmd]["cases"] += 1
    try:
        rc, err, parsing = run_case(argv)
    except Hang:
        TALLY[cmd]["hangs"] += 1
        raise
    except BaseException:
        TALLY[cmd]["other exceptions"] += 1
        raise
    TALLY[cmd]["exit 0" if rc == 0 else "clean errors (exit 2)" if rc == 2 else f"exit {rc}"] += 1
    assert rc in (0, 2), f"{argv}: exit {rc}\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    if parsing:  # refused while parsing: the flag and its range are named, nothing is written
        assert action.option_strings[-1] in err or "unrecognized" in err, err
        assert not out.exists()


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
@settings(
    max_examples=DEFAULT_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(data=st.data())
def test_fuzz(env, cmd, data):
    """A few generated values per subcommand, in the default run (fixed seed)."""
    _fuzz(cmd, env, data)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_fuzz_slow(env, cmd):
    """10,000 generated values per subcommand (-m slow)."""

    @settings(
        max_examples=SLOW_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(data=st.data())
    def one(data):
        # past the run's time budget a case is drawn but not run (a case drawing less than it
        # did before reads to hypothesis as a flaky strategy); never once one has failed, so
        # that the failure is shrunk and reported
        try:
            _fuzz(cmd, env, data, run=not (budget_spent() and not failed))
        except BaseException as e:
            if not type(e).__module__.startswith("hypothesis"):  # not its assume() or stop
                failed.append(True)
            raise

    before, failed = TALLY[cmd]["cases"], []
    one()
    skip_if_cut(f"{cmd} flag fuzz", TALLY[cmd]["cases"] - before, SLOW_EXAMPLES)


# ----------------------------------------------------------------------------- past the parser


def test_train_configs_built_in_python_are_checked(env):
    """The recipe fields' ranges hold for the Python API too: nothing is loaded or written."""
    from puregen_fast.errors import UsageError
    from puregen_fast.train import DDPMConfig, EBMConfig, train_ddpm, train_ebm

    out = env["tmp"] / "run"
    data = str(env["data"])
    with pytest.raises(UsageError, match=r"--seed: must be in \[0, 2\*\*63 - 1\]"):
        train_ddpm(DDPMConfig(dataset="npz", data_dir=data, out=str(out), seed=-1))
    with pytest.raises(UsageError, match=r"--adam-beta2: must be a number in \[0, 1\)"):
        train_ebm(EBMConfig(dataset="npz", data_dir=data, out=str(out), adam_beta2=1.0))
    assert not out.exists()


def test_thread_count_from_the_environment_is_bounded(env, monkeypatch, capsys):
    """$PUREGEN_FAST_THREADS=65536 made OpenMP abort the process with no message."""
    monkeypatch.setenv("PUREGEN_FAST_THREADS", "65536")
    assert main(["info"]) == 2
    assert "PUREGEN_FAST_THREADS" in capsys.readouterr().err


def test_bench_out_of_memory_is_exit_2(env, monkeypatch, capsys):
    """A batch in range that this machine cannot hold names --batch-size (was a traceback)."""
    from puregen_fast.cli import bench

    def alloc(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1")

    monkeypatch.setattr(bench, "benchmark", alloc)
    assert main(base_argv("bench", env, env["tmp"])) == 2
    assert "--batch-size 1" in capsys.readouterr().err


def test_a_classifier_batch_of_one_image_is_exit_2(env, capsys):
    """Batch norm cannot train on one image: eval run --batch-size 1 (or one training image)
    on 16x16 images was a ValueError from torch."""
    argv = base_argv("eval run", env, env["tmp"] / "o")
    i = argv.index("--batch-size")
    assert main([*argv[: i + 1], "1", *argv[i + 2 :]]) == 2
    assert "at least 2 images" in capsys.readouterr().err


def test_a_double_dash_value_is_refused_by_every_one_value_flag(capsys):
    """``--flag=--``: Python before 3.12 hands the command an empty list as the value (the
    slow fuzz found `eval run --limit-train=--` reaching a slice); every one-value flag of
    every subcommand refuses it while parsing, exit 2, naming the flag."""
    seen = 0
    for prog, action in _value_flags(build_parser()):
        if action.nargs is not None or action.type is None:
            continue
        words = prog.split()[1:]  # "puregen-fast eval run" -> ["eval", "run"]
        flag = action.option_strings[-1]
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*words, f"{flag}=--"])
        assert e.value.code == 2 and flag in capsys.readouterr().err, (prog, flag)
        seen += 1
    assert seen > 50
