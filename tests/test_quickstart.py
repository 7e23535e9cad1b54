"""The README's quick start (issue 24 item 1): the commands are read out of its block, so the
README and what is tested cannot drift; the recipe they name is what the README says it is."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puregen_fast.cli.main import build_parser
from puregen_fast.errors import UsageError
from puregen_fast.train.config import (
    EBM_RECIPES,
    EBMConfig,
    check_config,
    config_from_args,
    ebm_recipe,
    recipe_flags,
)

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Quick start"


def quickstart_section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    return text[start : text.index("\n## ", start + 1)]


def quickstart_commands() -> list[list[str]]:
    """The argv of each command of the section's second bash block (the first installs the
    extra), continuation lines joined and comments dropped."""
    blocks = quickstart_section().split("```bash\n")[1:]
    block = blocks[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


def _flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_the_block_is_puregen_commands_that_use_the_recipe():
    cmds = quickstart_commands()
    assert [c[0] for c in cmds] == ["puregen-fast"] * 3
    train = next(c for c in cmds if "train" in c)
    assert _flag_value(train, "--recipe") == "cpu-small"
    purify = next(c for c in cmds if "purify" in c)
    assert _flag_value(purify, "--ebm") == _flag_value(train, "--out")
    # no flag of the recipe is spelled out beside it: the recipe is the one place they live
    assert not {f"--{k.replace('_', '-')}" for k in EBM_RECIPES["cpu-small"]} & set(train)


def test_the_recipe_is_what_the_readme_says():
    """The README names every value of cpu-small (as the flags they stand for), and they are the
    PCD values of its CPU experiment, stopped after 200 updates."""
    assert f"`--recipe cpu-small` stands for `{recipe_flags(EBM_RECIPES['cpu-small'])}`" in (
        " ".join(quickstart_section().split())
    )
    assert EBM_RECIPES["cpu-small"] == {
        "objective": "pcd", "nf": 16, "mcmc_steps": 15, "bank_size": 641, "batch_size": 64,
        "lr": 2e-4, "epochs": 70, "lr_milestones": "60,65", "steps": 200, "device": "cpu",
        "backend": "reference",
    }  # fmt: skip
    for name in EBM_RECIPES:  # every value passes its field's check
        check_config(ebm_recipe(name, out="x"))


def test_flags_given_override_the_recipe_wherever_they_stand():
    parser = build_parser()

    def cfg(*extra: str) -> EBMConfig:
        args = parser.parse_args(["train", "ebm", "--out", "x", *extra])
        return config_from_args(EBMConfig, args)

    assert cfg("--recipe", "cpu-small") == ebm_recipe("cpu-small", out="x")
    # before or after --recipe, and a value equal to the paper's default is still the user's
    assert cfg("--nf", "128", "--recipe", "cpu-small").nf == 128
    assert cfg("--recipe=cpu-small", "--steps", "5", "--no-progress").steps == 5
    assert cfg("--rec", "cpu-small").nf == 16  # an abbreviation the parser accepts
    assert cfg() == EBMConfig(out="x")  # the parser is not changed by an earlier parse
    assert ebm_recipe("cpu-small", out="x", nf=32).nf == 32
    with pytest.raises(UsageError, match="unknown recipe 'nope'"):
        ebm_recipe("nope")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "ebm", "--out", "x", "--recipe", "nope"])
    with pytest.raises(SystemExit):  # only train ebm has recipes
        parser.parse_args(["train", "ddpm", "--out", "x", "--recipe", "cpu-small"])


@pytest.mark.slow  # about 6 minutes on 2 CPU cores: trains an EBM and purifies 1000 images
def test_the_quick_start_runs_as_written(tmp_path):
    """Every command of the block, as written, in an empty folder with an empty cache and the
    Hugging Face hub offline (nothing downloaded): each exits 0 and leaves its outputs."""
    pytest.importorskip("skimage")
    env = {**os.environ, "PUREGEN_FAST_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("PUREGEN_FAST_THREADS", None)
    start = time.perf_counter()
    for argv in quickstart_commands():
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "puregen_fast.cli", *argv[1:]], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
        assert run.returncode == 0, (argv, run.stderr[-4000:])
        print(f"{shlex.join(argv[:4])} ...: {time.perf_counter() - t:.1f} s")
        out = tmp_path / _flag_value(argv, "--out")
        if "photos" in argv:
            assert {p.name for p in out.iterdir()} >= {"train.npz", "heldout.npz", "test.npz"}
        elif "train" in argv:
            assert (out / "model.safetensors").is_file() and (out / "sampling.json").is_file()
            assert (out / "samples" / "step_00000200.png").is_file()
        else:
            assert (out / "manifest.json").is_file() and (out / "images-00000.npy").is_file()
            if "--preview" in argv:
                assert (out / "preview.png").stat().st_size > 0
    print(f"quick start: {time.perf_counter() - start:.1f} s in all")
