"""``eval experiment``'s engine flags are made from `EngineConfig` as ``purify``'s are (issue 23):
every engine option purify offers is offered, with the same range and choices, and reaches the
engine."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from puregen_fast.cli.argtypes import _subparsers
from puregen_fast.cli.eval_experiment import ENGINE_ELSEWHERE, _protocol, engine_flags
from puregen_fast.cli.main import build_parser, main
from puregen_fast.config import EngineConfig, flag
from puregen_fast.eval.experiment import _purifier

ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]


def _parser(prog: str) -> argparse.ArgumentParser:
    return next(p for p in _subparsers(build_parser()) if p.prog == f"puregen-fast {prog}")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_eval_experiment_offers_every_engine_option_of_purify(capsys):
    purify, exp = _parser("purify"), _parser("eval experiment")
    purify_help, exp_help = _help(capsys, "purify"), _help(capsys, "eval", "experiment")
    by_dest = {a.dest: a for a in purify._actions}
    flags = engine_flags(exp)
    assert set(flags) == set(ENGINE_FIELDS), "an engine field without an eval experiment flag"
    exp_actions = {s: a for a in exp._actions for s in a.option_strings}
    for name in ENGINE_FIELDS:
        theirs = by_dest[name]
        assert flag(name) in theirs.option_strings and flag(name) in purify_help
        ours = flags[name]
        assert ours in exp_help, f"eval experiment --help lacks {ours} (purify's {flag(name)})"
        if name in ENGINE_ELSEWHERE:  # the method is --defenses, the device the run's --device
            continue
        a = exp_actions[ours]
        # the same check: the same range text, the same choices
        assert getattr(a.type, "range", None) == getattr(theirs.type, "range", None), name
        assert (list(a.choices) if a.choices else None) == (
            list(theirs.choices) if theirs.choices else None), name  # fmt: skip
        assert a.default is None  # not given: the engine's default, not a second copy of it
    # the options this issue names, by their purify flags
    for opt in ("--conv-impl", "--divergence-margin", "--backend", "--precision"):
        assert opt in exp_help


def _args(*extra: str) -> argparse.Namespace:
    argv = ["eval", "experiment", "--dataset", "npz", "--data-dir", "t.npz", "--test-dataset",
            "npz", "--test-data-dir", "s.npz", "--trigger", "t.npy", "--target-class", "1",
            "--out", "o", *extra]  # fmt: skip
    return build_parser().parse_args(argv)


def test_the_engine_flags_reach_the_engine():
    args = _args("--defenses", "jpeg,reps", "--conv-impl", "torch", "--divergence-margin", "2",
                 "--purify-seed", "7", "--reps", "3", "--jpeg-quality", "30")  # fmt: skip
    proto = _protocol(args)
    pur = dict(proto.purify)
    assert pur["conv_impl"] == "torch" and pur["divergence_margin"] == 2.0 and pur["seed"] == 7
    assert "ebm_steps" not in pur and "precision" not in pur  # not given: the engine's default
    p = _purifier("jpeg", pur, {}, torch.device("cpu"))
    c = p.config
    assert (c.conv_impl, c.divergence_margin, c.seed, c.jpeg_quality) == ("torch", 2.0, 7, 30)
    assert c.reps == 1  # --reps is the reps defense's, not a reason to refuse jpeg
    assert p.describe()["jpeg_quality"] == 30


@pytest.mark.parametrize("argv, needle", [
    (("--divergence-margin", "0.001"), "--divergence-margin: must be a number in [0.01, 1e6]"),
    (("--conv-impl", "cudnn"), "--conv-impl: invalid choice"),
    (("--purify-seed", "-1"), "--purify-seed: must be in [0, 2**63 - 1]"),
])  # fmt: skip
def test_a_bad_engine_flag_exits_2_naming_it(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _args(*argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_the_test_split_default_is_one_rule():
    from puregen_fast.data.datasets import default_test_split

    assert default_test_split("tinyimagenet") == "val"
    assert [default_test_split(d) for d in ("cifar10", "cinic10", "npz")] == ["test"] * 3
    assert _protocol(_args()).test.split == "test"
