"""Scale-out (issue 3, acceptance 5): `torchrun --nproc_per_node=2` on CPU (gloo) writes output
byte-identical to one process with the same batch size and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import write_cinic10

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.errors import UsageError
from puregen_fast.pipeline import Dist, _check_same_config, _config_hash

REPO = Path(__file__).resolve().parents[2]


def _run_torchrun(argv: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "puregen_fast.cli", *argv,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("method", ["ebm", "filt"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, monkeypatch, method):
    write_cinic10(tmp_path / "cinic", n_cifar=1, n_imagenet=2, seed=5)
    torch.manual_seed(1)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), tmp_path / "ebm")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(cache))

    def argv(out: Path) -> list[str]:
        return [
            "purify", "--dataset", "cinic10", "--data-dir", str(tmp_path / "cinic"),
            "--method", method, "--ebm", str(tmp_path / "ebm"), "--ebm-steps", "3",
            "--backend", "reference", "--device", "cpu", "--batch-size", "5",
            "--shard-size", "7", "--seed", "3", "--out", str(out),
        ]  # fmt: skip

    env = {**os.environ, "PUREGEN_FAST_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = _run_torchrun(argv(tmp_path / "multi"), env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    # torchrun runs each rank with OMP_NUM_THREADS=1; the thread count can change CPU float
    # summation order, so the single-process run uses one thread too
    assert main(argv(tmp_path / "single") + ["--threads", "1", "--quiet"]) == 0

    multi, single = tmp_path / "multi", tmp_path / "single"
    names = sorted(p.name for p in single.glob("*.npy"))
    assert len(names) == 10  # 5 shards: ranks take shards 0-1 and 2-4
    assert sorted(p.name for p in multi.glob("*.npy")) == names
    for n in names:
        assert (multi / n).read_bytes() == (single / n).read_bytes(), n
    mm = json.loads((multi / "manifest.json").read_text())
    ms = json.loads((single / "manifest.json").read_text())
    assert mm["world_size"] == 2 and ms["world_size"] == 1
    assert mm["shards"] == ms["shards"] and mm["config"] == ms["config"]
    assert [t["rank"] for t in mm["timings"]["ranks"]] == [0, 1]
    assert [t["shards_written"] for t in mm["timings"]["ranks"]] == [2, 3]
    d = pg.load_purified(multi)
    np.testing.assert_array_equal(np.asarray(d.images), np.asarray(pg.load_purified(single).images))
    if method == "filt":
        assert mm["filter"] == ms["filter"]


def test_ranks_with_another_configuration_are_refused():
    class FakeDist(Dist):
        """Rank ``rank`` of 3; the other ranks' configuration hashes are given."""

        def __init__(self, rank, others):
            super().__init__(rank, 3)
            self.others = others

        def gather(self, obj):
            out = list(self.others)
            out.insert(self.rank, obj)
            return out

    cfg = {"seed": 0, "purifier": {"ebm": {"sha256": "a" * 64}}}
    other = {"seed": 0, "purifier": {"ebm": {"sha256": "b" * 64}}}
    same, diff = _config_hash(cfg), _config_hash(other)
    assert _config_hash(dict(reversed(cfg.items()))) == same  # key order does not matter
    _check_same_config(FakeDist(1, [same, same]), cfg)  # all agree
    for rank, others, bad in [(0, [same, diff], "2"), (1, [same, diff], "1, 2")]:
        me = cfg if rank == 0 else other
        with pytest.raises(UsageError, match=rf"rank\(s\) {bad} of 3 .*checkpoints"):
            _check_same_config(FakeDist(rank, others), me)
    _check_same_config(Dist(), cfg)  # one process: nothing to compare


@pytest.mark.slow
def test_torchrun_over_webdataset_shards_equals_one_process(tmp_path, monkeypatch):
    """Slow (two torchrun ranks: about 20 s on 2 CPUs): 4 input shards of unequal size, 2 ranks
    taking 2 whole shards each, webdataset output equal to one process, byte for byte."""
    from puregen_fast.data.webdataset import write_tar

    x = np.random.default_rng(7).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    for k, (s, e) in enumerate([(0, 3), (3, 5), (5, 9), (9, 11)]):
        write_tar(tmp_path / "in" / f"{k:02d}.tar", [f"s{i}" for i in range(s, e)], x[s:e],
                  np.arange(s, e) % 2)  # fmt: skip
    torch.manual_seed(1)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), tmp_path / "ebm")
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))

    def argv(out: Path) -> list[str]:
        return [
            "purify", "--dataset", "webdataset", "--data-dir", str(tmp_path / "in/{00..03}.tar"),
            "--method", "ebm", "--ebm", str(tmp_path / "ebm"), "--ebm-steps", "3",
            "--backend", "reference", "--device", "cpu", "--batch-size", "2", "--seed", "3",
            "--format", "webdataset", "--out", str(out),
        ]  # fmt: skip

    env = {**os.environ, "PUREGEN_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = _run_torchrun(argv(tmp_path / "multi"), env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    # one thread, as each torchrun rank runs
    assert main(argv(tmp_path / "single") + ["--threads", "1", "--quiet"]) == 0
    multi, single = tmp_path / "multi", tmp_path / "single"
    names = [f"shard-{k:05d}.tar" for k in range(4)]
    assert sorted(p.name for p in single.glob("*.tar")) == names
    for n in names:
        assert (multi / n).read_bytes() == (single / n).read_bytes(), n
    mm = json.loads((multi / "manifest.json").read_text())
    ms = json.loads((single / "manifest.json").read_text())
    assert mm["shards"] == ms["shards"] and mm["config"] == ms["config"]
    assert [s["count"] for s in mm["config"]["input_shards"]] == [3, 2, 4, 2]
    assert [t["shards_written"] for t in mm["timings"]["ranks"]] == [2, 2]
    assert pg.load_purified(multi).keys == [f"s{i}" for i in range(11)]
