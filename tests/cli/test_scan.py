"""`puregen-fast scan` (issue 25): the table, scan.json and pictures from the command line on
an .npz and on WebDataset shards; a killed scan resumed gives the same table bytes; bad input
exits 2 naming the flag or file."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import puregen_fast as pg
import puregen_fast.scan as scan_mod
from puregen_fast.cli.main import main
from puregen_fast.data.webdataset import write_tar
from puregen_fast.scan import CHAIN_COLUMNS, COLUMNS, SCAN_JSON, SCAN_TABLE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), root / "ebm")
    rng = np.random.default_rng(5)
    x = rng.integers(90, 166, (26, 32, 32, 3), dtype=np.uint8)
    x[[3, 20]] = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    y = np.arange(26) % 2
    np.savez(root / "set.npz", x=x, y=y, classes=np.array(["plane", "car"]))
    return SimpleNamespace(root=root, ebm=root / "ebm", npz=root / "set.npz", x=x, y=y)


@pytest.fixture(autouse=True)
def _cache(env, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(env.root / "cache"))


def _argv(env, out, *extra) -> list[str]:
    return ["scan", "--dataset", "npz", "--data-dir", str(env.npz), "--ebm", str(env.ebm),
            "--device", "cpu", "--batch-size", "4", "--shard-size", "6", "--quiet",
            "--out", str(out), *extra]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((out / SCAN_TABLE).read_text())))


def test_scan_writes_the_table_summary_and_pictures(env, tmp_path):
    out = tmp_path / "o"
    assert main(_argv(env, out, "--top", "3")) == 0
    rows = _rows(out)
    assert tuple(rows[0]) == COLUMNS and len(rows) == 26
    # the energies are the engine's, in the command's batches of 4
    ebm = pg.load_ebm(env.ebm)
    p = scan_mod.energy_purifier(ebm, "cpu")
    want = np.zeros(26)  # shards of 6 cut the batches: 0-3, 4-5 (padded), 6-9, ...
    for s0 in range(0, 26, 6):
        for s in range(s0, min(s0 + 6, 26), 4):
            stop = min(s + 4, s0 + 6, 26)
            xb = np.concatenate([env.x[s:stop], np.repeat(env.x[stop - 1:stop], 4 - (stop - s), 0)])
            want[s:stop] = p.energy(xb, np.arange(s, s + 4))[: stop - s]
    e = np.zeros(26)
    for r in rows:
        e[int(r["id"])] = float(r["energy"])
    np.testing.assert_array_equal(e, want)
    order = sorted(range(26), key=lambda i: (-e[i], i))
    assert [int(r["id"]) for r in rows] == order
    for r in rows:
        i = int(r["id"])
        m = env.y == env.y[i]
        assert float(r["z_class"]) == pytest.approx((e[i] - e[m].mean()) / e[m].std(), abs=1e-12)
        assert float(r["z_all"]) == pytest.approx((e[i] - e.mean()) / e.std(), abs=1e-12)
        assert r["class"] == ["plane", "car"][env.y[i]] and r["source"] == ""
    rec = json.loads((out / SCAN_JSON).read_text())
    assert rec["model"]["sha256"] == ebm.puregen_sha256
    assert rec["cut"] == pytest.approx(np.quantile(e, 0.5), abs=0)
    assert rec["settings"]["kind"] == "scan" and rec["settings"]["batch_size"] == 4
    assert rec["command"]["top"] == 3 and rec["num_images"] == 26
    for name in rec["files"].values():
        assert (out / name).is_file()


def test_chain_steps_rank_by_the_energy_drop_along_the_models_chain(env, tmp_path, capsys):
    out = tmp_path / "o"
    argv = _argv(env, out, "--chain-steps", "2", "--batch-size", "26", "--shard-size", "26")
    assert main([a for a in argv if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "ranked by the energy drop along a Langevin chain: steps 2 (--chain-steps)" in err
    rows = _rows(out)
    assert tuple(rows[0]) == CHAIN_COLUMNS and len(rows) == 26
    ebm = pg.load_ebm(env.ebm)
    p = scan_mod.energy_purifier(ebm, "cpu")
    chain = scan_mod.energy_purifier(ebm, "cpu", ebm_steps=2)  # the model's eps and temp
    ids = np.arange(26)
    want = p.energy(env.x, ids) - p.energy(chain(env.x, ids), ids)
    got = np.zeros(26)
    for r in rows:
        got[int(r["id"])] = float(r["drop"])
    np.testing.assert_array_equal(got, want)
    rec = json.loads((out / SCAN_JSON).read_text())
    assert rec["score"] == "drop" and rec["command"]["chain_steps"] == 2
    assert rec["chain"]["ebm"]["steps"] == 2


def test_a_killed_scan_resumes_to_the_same_bytes(env, tmp_path, monkeypatch):
    assert main(_argv(env, tmp_path / "whole")) == 0
    want = (tmp_path / "whole" / SCAN_TABLE).read_bytes()
    real = scan_mod._write_shard

    def interrupted(out, k, *a):
        if k == 1:  # after the first shard: Ctrl-C
            raise KeyboardInterrupt
        real(out, k, *a)

    monkeypatch.setattr(scan_mod, "_write_shard", interrupted)
    out = tmp_path / "o"
    assert main(_argv(env, out)) == 130
    assert not (out / SCAN_TABLE).exists()
    monkeypatch.setattr(scan_mod, "_write_shard", real)
    assert main(_argv(env, out, "--resume")) == 0
    assert (out / SCAN_TABLE).read_bytes() == want
    rec = json.loads((out / SCAN_JSON).read_text())
    assert rec["timings"]["images_reused"] == 6 and rec["timings"]["images_computed"] == 20


def test_webdataset_input_names_each_image_by_its_key(env, tmp_path):
    keys = [f"img{i:03d}" for i in range(26)]
    for k, sl in enumerate((slice(0, 10), slice(10, 26))):
        write_tar(tmp_path / f"in-{k}.tar", keys[sl], env.x[sl], env.y[sl])
    out = tmp_path / "o"
    argv = _argv(env, out)
    argv[2:4] = ["webdataset", "--data-dir"]
    argv[4] = str(tmp_path / "in-{0..1}.tar")
    assert main(argv) == 0
    rows = _rows(out)
    assert {r["source"] for r in rows} == set(keys)
    assert all(r["source"] == keys[int(r["id"])] for r in rows)
    # the energies do not depend on the reader
    assert main(_argv(env, tmp_path / "npz")) == 0
    npz = {r["id"]: r["energy"] for r in _rows(tmp_path / "npz")}
    assert {r["id"]: r["energy"] for r in rows} == npz


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["--filter-frac", "0"], "--filter-frac"),
        (["--filter-frac", "nan"], "--filter-frac"),
        (["--batch-size", "0"], "--batch-size"),
        (["--top", "65"], "--top"),
        (["--chain-steps", "-1"], "--chain-steps"),
        (["--chain-steps", "10001"], "--chain-steps"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_flags_exit_2(env, tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        main(_argv(env, tmp_path / "o", *extra))
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_input_exits_2_naming_it(env, tmp_path, capsys):
    def run(argv) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    out = tmp_path / "o"
    argv = _argv(env, out)
    missing = argv.copy()
    missing[missing.index(str(env.npz))] = str(tmp_path / "none.npz")
    assert "none.npz" in run(missing) and not out.exists()
    no_ebm = argv.copy()
    no_ebm[no_ebm.index(str(env.ebm))] = str(tmp_path / "no-ebm")
    both = no_ebm.copy()
    both[both.index(str(env.npz))] = str(tmp_path / "none.npz")
    err = run(both)  # every missing input in one message
    assert "2 problems" in err and "no-ebm" in err and "none.npz" in err
    split = argv.copy()
    split[split.index("npz")] = "cifar10"
    assert "--split" in run([*split, "--split", "bogus"]) and not out.exists()
    (tmp_path / "file").write_text("x")
    assert "not a folder" in run(_argv(env, tmp_path / "file"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("x")
    assert "not empty" in run(_argv(env, tmp_path / "foreign"))
    np.savez(tmp_path / "odd.npz", x=np.zeros((3, 30, 30, 3), np.uint8), y=np.zeros(3, int))
    odd = argv.copy()
    odd[odd.index(str(env.npz))] = str(tmp_path / "odd.npz")
    assert "divisible by 4" in run(odd)
    assert main(argv) == 0
    assert "finished scan" in run(argv)  # neither --resume nor --overwrite
    assert main([*argv, "--overwrite", "--filter-frac", "0.1"]) == 0
    assert json.loads((out / SCAN_JSON).read_text())["at_or_above_cut"] == 3


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_table_of_one_process(env, tmp_path):
    """Under torchrun each rank scans a contiguous run of shards and rank 0 writes the table:
    the same bytes as one process (one thread in both, as torchrun's ranks run). Slow: about
    10 s on 2 busy cores, most of it starting the two ranks."""
    import os
    import subprocess
    import sys

    run_env = {**os.environ, "PUREGEN_FAST_CACHE": str(env.root / "cache"),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
    run_env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "puregen_fast.cli", *_argv(env, tmp_path / "multi")]  # fmt: skip
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=run_env,
                       capture_output=True, text=True, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert main([*_argv(env, tmp_path / "single"), "--threads", "1"]) == 0
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert (multi / SCAN_TABLE).read_bytes() == (single / SCAN_TABLE).read_bytes()
    rec = json.loads((multi / SCAN_JSON).read_text())
    assert rec["world_size"] == 2 and rec["timings"]["images_computed"] == 26
    assert rec["settings"] == json.loads((single / SCAN_JSON).read_text())["settings"]
