"""`puregen-fast purify` on a CINIC-10 fixture (issue 3, acceptance 3, 4, 6): deterministic
bytes, batch-size agreement, labels, --limit, --format png, kill-and-resume, damaged shards,
and exit 2 with a useful message on bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures_data import CIFAR_CLASSES, write_cinic10

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.data.datasets import Dataset
from puregen_fast.data.download import COMPLETE_MARKER
from puregen_fast.models.unet import UNET_PRESETS
from puregen_fast.pipeline import purify_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("purify")
    exp = write_cinic10(root / "cinic", n_cifar=1, n_imagenet=2, seed=3)  # 30 images a split
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), root / "ebm")
    return SimpleNamespace(root=root, exp=exp, cinic=root / "cinic", ebm=root / "ebm")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(env, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(env.root / "cache"))
    monkeypatch.setenv("PUREGEN_FAST_URL_CIFAR10", "http://127.0.0.1:9/offline")


def _argv(env, out, *extra, method="ebm", split="train"):
    return [
        "purify", "--dataset", "cinic10", "--data-dir", str(env.cinic), "--split", split,
        "--method", method, "--ebm", str(env.ebm), "--ebm-steps", "3",
        "--backend", "reference", "--device", "cpu", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def purify(env, out, *extra, **kw) -> int:
    return main(_argv(env, out, *extra, **kw))


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


def test_deterministic_bytes_seed_and_labels(env, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert purify(env, a, "--batch-size", "7", "--shard-size", "16") == 0
    assert purify(env, b, "--batch-size", "7", "--shard-size", "16") == 0
    assert purify(env, c, "--batch-size", "7", "--shard-size", "16", "--seed", "1") == 0
    assert list(_shard_bytes(a)) == [
        "images-00000.npy",
        "images-00001.npy",
        "labels-00000.npy",
        "labels-00001.npy",
    ]
    assert _shard_bytes(a) == _shard_bytes(b)
    da, dc = pg.load_purified(a), pg.load_purified(c)
    x, y = env.exp["train"]
    assert not np.array_equal(np.asarray(da.images), np.asarray(dc.images))
    assert not np.array_equal(np.asarray(da.images), x)  # it did purify
    np.testing.assert_array_equal(da.labels, y)
    m = da.manifest
    assert m["count"] == 30 and m["dataset"]["class_names"] == CIFAR_CLASSES
    assert m["config"]["seed"] == 0 and m["purifier"]["ebm"]["sha256"]
    assert m["purifier"]["backend"] == "reference" and m["device"]["device"] == "cpu"
    assert [s["stop"] for s in m["shards"]] == [16, 30]
    assert m["dataset"]["label_counts"] == [3] * 10
    assert m["timings"]["images_purified"] == 30


def test_batch_sizes_agree_to_one_level(env, tmp_path):
    outs = {}
    for bs in (1, 7, 64):
        assert purify(env, tmp_path / f"bs{bs}", "--batch-size", str(bs)) == 0
        outs[bs] = np.asarray(pg.load_purified(tmp_path / f"bs{bs}").images).astype(np.int16)
    for bs in (7, 64):
        d = np.abs(outs[bs] - outs[1])
        assert d.max() <= 1
        assert (d > 0).mean() < 0.01


def test_result_does_not_depend_on_neighbours(env, tmp_path):
    # --limit 10 pads the second batch of 7 with copies; images 0..9 come out as in a full run
    assert purify(env, tmp_path / "full", "--batch-size", "7") == 0
    assert purify(env, tmp_path / "lim", "--batch-size", "7", "--limit", "10") == 0
    full, lim = pg.load_purified(tmp_path / "full"), pg.load_purified(tmp_path / "lim")
    assert lim.images.shape == (10, 32, 32, 3) and lim.manifest["count"] == 10
    np.testing.assert_array_equal(np.asarray(lim.images), np.asarray(full.images)[:10])
    np.testing.assert_array_equal(lim.labels, env.exp["train"][1][:10])


def test_png_format(env, tmp_path):
    assert purify(env, tmp_path / "npy", "--batch-size", "7", "--split", "test") == 0
    out = tmp_path / "png"
    assert purify(env, out, "--batch-size", "7", "--format", "png", "--split", "test",
                  "--limit", "25", "--shard-size", "10") == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == CIFAR_CLASSES
    assert (out / "airplane" / "00.png").is_file()
    assert len(list(out.rglob("*.png"))) == 25
    d = pg.load_purified(out)
    ref = pg.load_purified(tmp_path / "npy")
    np.testing.assert_array_equal(d.images, np.asarray(ref.images)[:25])
    np.testing.assert_array_equal(d.labels, ref.labels[:25])


def test_method_none_is_identity_and_filt_keeps_low_energy(env, tmp_path):
    assert purify(env, tmp_path / "none", method="none") == 0
    np.testing.assert_array_equal(
        np.asarray(pg.load_purified(tmp_path / "none").images), env.exp["train"][0]
    )
    assert purify(env, tmp_path / "filt", "--batch-size", "8", "--filter-frac", "0.5",
                  method="filt") == 0  # fmt: skip
    d = pg.load_purified(tmp_path / "filt")
    f = d.manifest["filter"]
    assert f["num_purified"] == 15 and d.manifest["purifier"]["filter_threshold"] == f["threshold"]
    x = env.exp["train"][0]
    same = np.all(np.asarray(d.images) == x, axis=(1, 2, 3))
    assert same.sum() == 15  # the low-energy half untouched, the rest purified
    assert purify(env, tmp_path / "jpeg", "--jpeg-quality", "50", method="jpeg") == 0


def test_damaged_shard_rewritten_on_resume(env, tmp_path, capsys):
    out = tmp_path / "o"
    assert purify(env, out, "--batch-size", "4", "--shard-size", "8") == 0
    good = _shard_bytes(out)
    p = out / "images-00001.npy"
    raw = bytearray(p.read_bytes())
    raw[200] ^= 0xFF
    p.write_bytes(bytes(raw))
    (out / "labels-00003.npy").unlink()
    with pytest.raises(pg.UsageError):
        pg.load_purified(out)
    # without --resume an existing output is refused
    assert purify(env, out, "--batch-size", "4", "--shard-size", "8") == 2
    assert "--resume" in capsys.readouterr().err
    before = {k: out.joinpath(k).stat().st_mtime_ns for k in good if out.joinpath(k).exists()}
    assert purify(env, out, "--batch-size", "4", "--shard-size", "8", "--resume") == 0
    assert _shard_bytes(out) == good
    t = pg.load_purified(out).manifest["timings"]
    assert t["images_purified"] == 8 + 6  # shards 1 and 3 only
    assert out.joinpath("images-00000.npy").stat().st_mtime_ns == before["images-00000.npy"]


def test_resume_refuses_other_configuration(env, tmp_path, capsys):
    out = tmp_path / "o"
    assert purify(env, out, "--batch-size", "8", "--limit", "8") == 0
    assert purify(env, out, "--batch-size", "8", "--limit", "8", "--resume", "--seed", "5") == 2
    assert "seed" in capsys.readouterr().err
    assert purify(env, out, "--batch-size", "8", "--limit", "8", "--seed", "5",
                  "--overwrite") == 0  # fmt: skip
    assert pg.load_purified(out).manifest["config"]["seed"] == 5


def test_killed_run_resumes_to_identical_bytes(env, tmp_path):
    args = ["--batch-size", "3", "--shard-size", "3"]
    ref = tmp_path / "ref"
    out = tmp_path / "killed"
    argv = _argv(env, out, *args)
    argv[argv.index("--ebm-steps") + 1] = "40"  # slow enough to be killed midway
    cmd = [sys.executable, "-m", "puregen_fast.cli", *argv]
    e = {**os.environ, "PUREGEN_FAST_CACHE": str(env.root / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".puregen-shard-00000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    n_done = len(list(out.glob(".puregen-shard-*.json")))
    assert n_done < 10
    assert main(argv + ["--resume"]) == 0
    ref_argv = _argv(env, ref, *args)
    ref_argv[ref_argv.index("--ebm-steps") + 1] = "40"
    assert main(ref_argv) == 0
    assert _shard_bytes(out) == _shard_bytes(ref)
    assert pg.load_purified(out).manifest["timings"]["images_purified"] < 30


def test_unreadable_image_exit_2_names_file(env, tmp_path, capsys):
    data = tmp_path / "cinic"
    shutil.copytree(env.cinic, data)
    bad = data / "valid" / "horse" / "n0_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "o"
    argv = _argv(env, out, split="valid")
    argv[argv.index("--data-dir") + 1] = str(data)
    assert main(argv) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".puregen-shard-*")) if out.exists() else True
    decoded = env.root / "cache" / "decoded"
    key_dirs = [d for d in decoded.iterdir() if (d / COMPLETE_MARKER).exists()]
    for d in key_dirs:  # no complete cache entry for the damaged listing
        assert str(data) not in (d / "source.json").read_text()


def test_missing_dataset_offline_exit_2(tmp_path, capsys):
    argv = ["purify", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"),
            "--method", "none", "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and str(tmp_path / "empty") in err


def test_missing_model_exit_2(env, tmp_path, capsys):
    argv = _argv(env, tmp_path / "o")
    argv[argv.index("--ebm") + 1] = str(tmp_path / "no-such-ebm")
    assert main(argv) == 2
    assert "no-such-ebm" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--batch-size", "0"),
        ("--shard-size", "-3"),
        ("--filter-frac", "1.5"),
        ("--filter-frac", "0"),
        ("--jpeg-quality", "101"),
        ("--ebm-steps", "x"),
        ("--ddpm-steps", "1000"),
        ("--limit", "0"),
        ("--method", "bogus"),
        ("--device", "tpu"),
        ("--split", "bogus"),
        ("--reps", "3"),
        ("--format", "jpg"),
    ],
)
def test_bad_flag_value_exit_2_names_flag(env, tmp_path, capsys, flag, value):
    argv = _argv(env, tmp_path / "o")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    assert rc == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_python_api_pads_every_batch(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    ds = Dataset("npz", "train", x, np.arange(11) % 2, ["a", "b"], "memory")
    p = pg.Purifier(method="none", device="cpu")
    seen = []

    class Spy:  # a wrapper that keeps what the pipeline uses (`pipeline.Engine`)
        config, device, backend, chain_steps = p.config, p.device, p.backend, p.chain_steps
        energy, plan, check_image_size = p.energy, p.plan, p.check_image_size
        describe, identity = p.describe, p.identity

        def __call__(self, imgs, ids):
            seen.append((imgs.shape, list(ids)))
            return p(imgs, ids)

    out = purify_dataset(ds, Spy(), tmp_path / "o", batch_size=4, shard_size=6, quiet=True)
    assert {s for s, _ in seen} == {(4, 8, 8, 3)}
    assert [ids[0] for _, ids in seen] == [0, 4, 6, 10]  # batches stay inside shards
    d = pg.load_purified(out)
    np.testing.assert_array_equal(np.asarray(d.images), x)
    np.testing.assert_array_equal(d.labels, np.arange(11) % 2)


def test_ebm_then_ddpm_with_local_checkpoints(env, tmp_path):
    cfg = {**UNET_PRESETS["tiny"], "sample_size": 32}
    torch.manual_seed(0)
    pg.save_ddpm(pg.UNet2D.from_config(cfg), tmp_path / "unet")
    extra = ["--ddpm", str(tmp_path / "unet"), "--ddpm-steps", "2", "--limit", "6"]
    assert purify(env, tmp_path / "a", *extra, "--batch-size", "4", method="ebm+ddpm") == 0
    assert purify(env, tmp_path / "b", *extra, "--batch-size", "4", method="ebm+ddpm") == 0
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    m = pg.load_purified(tmp_path / "a").manifest
    assert m["purifier"]["ddpm"]["sha256"] and m["purifier"]["ddpm"]["steps"] == 2
    assert m["config"]["method"] == "ebm+ddpm"


def _npz_argv(env, data, out, *extra, method="none"):
    return [
        "purify", "--dataset", "npz", "--data-dir", str(data), "--method", method,
        "--ebm", str(env.ebm), "--ebm-steps", "2", "--backend", "reference", "--device", "cpu",
        "--batch-size", "4", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def test_resume_refuses_changed_data_with_same_labels(env, tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(8) % 2
    data, out = tmp_path / "d.npz", tmp_path / "o"
    np.savez(data, x=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y=y)
    assert main(_npz_argv(env, data, out, method="filt")) == 0
    m = pg.load_purified(out).manifest
    assert m["config"]["source"] == str(data)
    assert m["filter"]["images_sha256"] == m["config"]["images_sha256"]
    shutil.copy(data, tmp_path / "same.npz")
    # other images, the same labels, the same file name: refused
    np.savez(data, x=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y=y)
    assert main(_npz_argv(env, data, out, "--resume", method="filt")) == 2
    assert "images_sha256" in capsys.readouterr().err
    # the same images from another file: refused too (the source differs)
    assert main(_npz_argv(env, tmp_path / "same.npz", out, "--resume", method="filt")) == 2
    assert "source" in capsys.readouterr().err
    # --overwrite recomputes the threshold for the new images
    assert main(_npz_argv(env, data, out, "--resume", "--overwrite", method="filt")) == 0
    m2 = pg.load_purified(out).manifest
    assert m2["filter"]["images_sha256"] == m2["config"]["images_sha256"]
    assert m2["config"]["images_sha256"] != m["config"]["images_sha256"]


@pytest.mark.parametrize("where", ["run record", "shard"])
def test_unwritable_out_exit_2_names_out(env, tmp_path, monkeypatch, capsys, where):
    import errno

    from puregen_fast.data import writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        writer, "atomic_write_json" if where == "run record" else "_npy_bytes_atomic", full
    )
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64))
    assert main(_npz_argv(env, data, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "No space left" in err


@pytest.mark.parametrize("method,hw,flag", [("ddpm", (33, 31), "--ddpm"), ("ebm", (2, 2), "--ebm")])
def test_image_size_the_model_cannot_take_exit_2(env, tmp_path, capsys, method, hw, flag):
    cfg = {**UNET_PRESETS["tiny"], "sample_size": 32}
    torch.manual_seed(0)
    pg.save_ddpm(pg.UNet2D.from_config(cfg), tmp_path / "unet")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, *hw, 3), np.uint8), y=np.zeros(4, np.int64))
    argv = _npz_argv(env, data, tmp_path / "o", "--ddpm", str(tmp_path / "unet"), method=method)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and f"{hw[0]}x{hw[1]}" in err
    assert not (tmp_path / "o").exists()


def test_a_diverging_run_writes_nothing_and_resumes_once_fixed(env, tmp_path, capsys):
    """DESIGN 2.4: --ebm-eps 1e6 (a flag: exit 2) and an EBM scaled by 1e6 (the model: exit 1)
    stop the run naming the images; no shard, no manifest. With the flag fixed, --resume runs.
    (Both backends raise alike: tests/sampling/test_purifier.py.)"""
    out = tmp_path / "o"
    extra = ("--shard-size", "8")
    assert purify(env, out, "--ebm-eps", "1e6", *extra) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "sample ids 0" in err and "--ebm-eps" in err
    assert not list(out.glob("*.npy")) and not (out / "manifest.json").exists()
    assert purify(env, out, "--resume", *extra) == 0
    assert pg.load_purified(out).manifest["count"] == 30

    big = tmp_path / "big-ebm"
    state = pg.load_ebm(env.ebm).state_dict()
    model = pg.EBMSNGAN32(nf=8)
    model.load_state_dict({k: v * 1e6 if v.is_floating_point() else v for k, v in state.items()})
    pg.save_ebm(model, big)
    out2 = tmp_path / "o2"
    argv = _argv(env, out2, *extra)
    argv[argv.index("--ebm") + 1] = str(big)
    assert main(argv) == 1
    assert "--ebm" in capsys.readouterr().err
    assert not list(out2.glob("*.npy")) and not (out2 / "manifest.json").exists()


def test_two_writers_on_one_out_the_second_exits_2(env, tmp_path, capsys):
    from puregen_fast.data.lock import out_lock

    out = tmp_path / "o"
    with out_lock(out):
        assert purify(env, out) == 2
    assert "being written by another run" in capsys.readouterr().err
    assert not list(out.glob("*.npy"))
    assert purify(env, out) == 0  # once the other run is gone


def test_batch_size_is_capped_at_the_number_of_images(env, tmp_path):
    """An absurd --batch-size does not pad to that size: it equals a run with the batch being
    the whole (limited) set."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert purify(env, a, "--limit", "5", "--batch-size", "65536") == 0  # the largest allowed
    assert purify(env, b, "--limit", "5", "--batch-size", "5") == 0
    assert _shard_bytes(a) == _shard_bytes(b)


def test_bf16_where_the_fast_path_cannot_run_it_is_refused(env, tmp_path, capsys, monkeypatch):
    """No silent fall-back to other numbers: bf16 on a CPU without the fast path's bf16 exits 2,
    unless the reference backend was asked for."""
    from puregen_fast import runtime

    monkeypatch.setattr(runtime, "_cpuinfo", lambda: {"flags": "avx2 fma"})  # no bf16 units
    argv = _argv(env, tmp_path / "a", "--precision", "bf16", "--limit", "4")
    argv[argv.index("--backend") + 1] = "auto"
    assert main(argv) == 2
    assert "--precision bf16" in capsys.readouterr().err
    assert purify(env, tmp_path / "b", "--precision", "bf16", "--limit", "4") == 0  # reference


def test_every_missing_input_in_one_message(tmp_path, capsys):
    """Offline and nothing in place: the EBM, the DDPM and the data set are all named at once
    (one round trip, not three)."""
    argv = ["purify", "--dataset", "cifar10", "--method", "ebm+ddpm",
            "--ebm", str(tmp_path / "no-ebm"), "--ddpm", str(tmp_path / "no-ddpm"),
            "--device", "cpu", "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err
    assert "no-ebm" in err and "no-ddpm" in err and "cifar-10-python.tar.gz" in err


def test_limit_decodes_only_the_selection_and_the_pixel_cap_is_a_flag(tmp_path, capsys):
    """A 12000x12000 PNG header past --limit is never decoded; within the selection it is
    refused from its header (exit 2 naming the flag that raises the cap)."""
    from fixtures_data import png_header_only
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "0.png")
    (root / "a" / "1.png").write_bytes(png_header_only(12000, 12000))
    base = ["purify", "--dataset", "imagefolder", "--data-dir", str(root), "--method", "none",
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*base, "--limit", "1", "--out", str(tmp_path / "o1")]) == 0
    assert main([*base, "--out", str(tmp_path / "o2")]) == 2
    assert "--max-image-pixels" in capsys.readouterr().err


@pytest.mark.parametrize("energy", ["nan", "inf"])
def test_filt_with_overflowing_energies_is_a_divergence_and_writes_nothing(
    env, tmp_path, capsys, energy
):
    """Issue 22: an EBM whose energies overflow to NaN (finite weights, the last layer at
    +-3e38) gave threshold NaN, 0 images purified, every image written unchanged, exit 0 and a
    .puregen-filter.json holding the non-JSON token NaN. Non-finite energies are a divergence
    (DESIGN 2.4): exit 1 naming the EBM and the sample ids; no shard, no threshold, no manifest.
    With a sound EBM, --resume then runs."""
    import json

    from puregen_fast import reference
    from puregen_fast.pipeline import FILTER_STATE

    big = tmp_path / "overflow-ebm"
    model = pg.load_ebm(env.ebm)
    with torch.no_grad():
        for v in model.block4.parameters():
            v.mul_(10)
        sign = torch.tensor([1.0] * 4 + [-1.0 if energy == "nan" else 1.0] * 4)
        model.l5.weight.copy_(3e38 * sign[None])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    e = reference.energy(model, x)
    assert (e.isnan() if energy == "nan" else e.isinf()).all()
    pg.save_ebm(model, big)
    out = tmp_path / "o"
    argv = _argv(env, out, "--shard-size", "8", method="filt")
    argv[argv.index("--ebm") + 1] = str(big)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "--ebm" in err and "sample ids 0" in err
    assert not list(out.glob("*.npy")) and not (out / "manifest.json").exists()
    assert not (out / FILTER_STATE).exists()
    json.loads((out / ".puregen-run.json").read_text(), parse_constant=_no_constant)
    assert purify(env, out, "--resume", "--shard-size", "8", method="filt") == 0
    f = json.loads((out / FILTER_STATE).read_text(), parse_constant=_no_constant)
    assert f["num_purified"] == 15


def _no_constant(name: str):
    raise AssertionError(f"a non-JSON token {name} was written")


def test_a_nan_threshold_saved_by_an_earlier_version_is_computed_again(env, tmp_path):
    import json

    from puregen_fast.pipeline import FILTER_STATE

    out = tmp_path / "o"
    assert purify(env, out, method="filt") == 0
    want = json.loads((out / FILTER_STATE).read_text())
    (out / FILTER_STATE).write_text(json.dumps({**want, "threshold": float("nan")}))
    (out / ".puregen-shard-00000.json").unlink()
    assert purify(env, out, "--resume", method="filt") == 0
    assert json.loads((out / FILTER_STATE).read_text()) == want


def test_filt_says_how_many_images_it_changed(env, tmp_path, capsys):
    """filt changes only the images at or above the threshold; the summary said '30 purified
    now' for every image that went through, as if all were purified."""
    assert purify(env, tmp_path / "o", "--filter-frac", "0.5", method="filt") == 0
    assert "(30 through filt now" not in capsys.readouterr().err  # --quiet: no summary
    argv = [a for a in _argv(env, tmp_path / "p", "--filter-frac", "0.5", method="filt")
            if a != "--quiet"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "30 through filt now" in err and "15 of 30 at or above the energy threshold" in err


# -- --quantize (issue 21 item 3) ----------------------------------------------------------------


def test_trunc_replays_the_authors_topilimage():
    """The authors' purified images leave through ``Normalize((-1, -1, -1), (2, 2, 2))`` and
    ``ToPILImage`` (scripts/PureGen.py lines 46, 95-97), whose float path is ``pic.mul(255).byte()``
    (torchvision's to_pil_image): ``--quantize trunc`` gives their bytes for every state in
    [-1, 1], levels' edges included; round differs on about half the values."""
    g = torch.Generator().manual_seed(0)
    edges = (torch.arange(256, dtype=torch.float32) / 255) * 2 - 1  # each level's own value
    x = torch.cat([torch.rand(4 * 3 * 16 * 16, generator=g) * 2 - 1, edges, -edges])
    x = x[: (x.numel() // 3) * 3].reshape(1, 3, 1, -1)
    authors = ((x - (-1)) / 2).mul(255).byte().permute(0, 2, 3, 1)
    like = np.zeros((1, 1, x.shape[3], 3), np.uint8)
    ours = pg.Purifier._from_x(x, like, True, "trunc")
    assert np.array_equal(ours, authors.numpy())
    rounded = pg.Purifier._from_x(x, like, True, "round")
    assert 0.3 < (rounded != ours).mean() < 0.7 and (rounded.astype(int) - ours).max() == 1


def test_trunc_clamps_where_the_authors_wrap():
    """Out of [-1, 1] their ``.byte()`` wraps (1.3 -> 37, -1.2 -> 231 on x86); we clamp."""
    x = torch.tensor([1.3, -1.2, 1.0, -1.0]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    like = np.zeros((1, 1, 4, 3), np.uint8)
    assert pg.Purifier._from_x(x, like, True, "trunc")[0, 0, :, 0].tolist() == [255, 0, 255, 0]


def test_quantize_flag_trunc_is_the_api_and_at_most_one_level_below_round(env, tmp_path):
    assert purify(env, tmp_path / "trunc", "--quantize", "trunc", "--limit", "8") == 0
    assert purify(env, tmp_path / "round", "--limit", "8") == 0
    trunc, rnd = (pg.load_purified(tmp_path / k) for k in ("trunc", "round"))
    diff = rnd.images.astype(int) - trunc.images.astype(int)
    assert diff.min() == 0 and diff.max() == 1 and 0.3 < diff.mean() < 0.7
    assert trunc.manifest["purifier"]["quantize"] == "trunc"
    assert "quantize" not in rnd.manifest["purifier"]  # earlier runs' records still match
    p = pg.Purifier("ebm", pg.load_ebm(env.ebm), ebm_steps=3, backend="reference", device="cpu",
                    quantize="trunc")  # fmt: skip
    assert np.array_equal(p(env.exp["train"][0][:8], np.arange(8)), trunc.images)


def test_quantize_leaves_method_none_the_input(env, tmp_path):
    """``none`` passes its input through: no level moves, whatever ``--quantize`` says."""
    assert purify(env, tmp_path / "none", "--quantize", "trunc", "--limit", "8",
                  method="none") == 0  # fmt: skip
    assert np.array_equal(pg.load_purified(tmp_path / "none").images, env.exp["train"][0][:8])
