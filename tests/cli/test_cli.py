"""The console script: subcommands listed, exit codes."""

import subprocess
import sys

from puregen_fast.cli.main import SUBCOMMANDS, main


def test_help_lists_the_subcommands():
    r = subprocess.run(
        [sys.executable, "-m", "puregen_fast.cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    for name in ("purify", "scan", "bench", "train", "eval", "info"):
        assert name in r.stdout
    assert set(SUBCOMMANDS) == {"purify", "scan", "bench", "train", "eval", "info"}


def test_no_subcommand_is_usage_error(capsys):
    assert main([]) == 2


def test_unknown_subcommand_exits_2(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("argparse should exit")
    assert "frobnicate" in capsys.readouterr().err


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"torch"' in out and '"backend_auto"' in out
