"""`--threads N` on every command (and ``PUREGEN_FAST_THREADS``), recorded in the manifest; the
fast path's first batch announced in the progress bar and its warm-up timed apart in the
manifest; what `info` says about the CPU (issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.pipeline import COMPILING
from puregen_fast.sampling import langevin

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "d.npz", x=x, y=np.zeros(6, np.int64))
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=4), root / "ebm")
    return root


def _purify(root, out, *extra):
    return ["purify", "--dataset", "npz", "--data-dir", str(root / "d.npz"), "--method", "ebm",
            "--ebm", str(root / "ebm"), "--ebm-steps", "2", "--device", "cpu", "--batch-size",
            "4", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("n, where", [(1, "before"), (2, "after")])
def test_threads_are_set_and_recorded(inputs, tmp_path, n, where):
    before = torch.get_num_threads()
    out = tmp_path / "o"
    argv = _purify(inputs, out, "--quiet")
    argv = ["--threads", str(n), *argv] if where == "before" else [*argv, "--threads", str(n)]
    assert main(argv) == 0
    device = json.loads((out / "manifest.json").read_text())["device"]
    assert device["threads"] == n and device["threads_from"] == "--threads"
    assert torch.get_num_threads() == before  # restored for an in-process caller


def test_bad_thread_counts_exit_2(inputs, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--threads", "0", "info"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err
    monkeypatch.setenv("PUREGEN_FAST_THREADS", "many")
    assert main(_purify(inputs, tmp_path / "o", "--quiet")) == 2
    assert "PUREGEN_FAST_THREADS" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_first_fast_batch_is_announced_and_its_warmup_timed_apart(
    inputs, tmp_path, monkeypatch, capsys
):
    # dynamo with its eager backend: the bar and the timings, not inductor, are under test
    monkeypatch.setattr(langevin, "compile_static",
                        lambda fn, fullgraph=True, mode="default": torch.compile(
                            fn, backend="eager", fullgraph=fullgraph, dynamic=False))  # fmt: skip
    out = tmp_path / "o"
    assert main(_purify(inputs, out, "--backend", "fast")) == 0
    assert COMPILING in capsys.readouterr().err
    t = json.loads((out / "manifest.json").read_text())["timings"]
    assert t["warmup_s"] > 0 and t["ranks"][0]["after_warmup_images_per_s"] > 0


def test_auto_on_a_small_cpu_job_says_it_took_the_reference(inputs, tmp_path):
    out = tmp_path / "o"
    assert main(_purify(inputs, out, "--quiet")) == 0
    p = json.loads((out / "manifest.json").read_text())["purifier"]
    assert p["backend"] == "reference" and "image-steps" in p["backend_reason"]


def test_info_describes_the_cpu(capsys):
    assert main(["--threads", "1", "info", "--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)["cpu"]
    assert cpu["threads"] == 1 and cpu["threads_from"] == "--threads"
    assert cpu["bf16_matrix"] in ("AMX", "AVX512-BF16", "none")
    assert "FLOP/cycle" in cpu["peak_fp32"] and cpu["compile_cache"]
