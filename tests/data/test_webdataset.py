"""WebDataset shards in and out (issue 15): shards -> purify (npy and webdataset output) ->
load_purified keeps keys, labels and order and equals the same images purified from an
ImageFolder; a killed run resumes to the same bytes; a truncated tar and a corrupt member exit 2
naming the shard and the key."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.data import webdataset as pgwds
from puregen_fast.data.webdataset import expand_shards, index_webdataset, write_tar
from puregen_fast.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")
N, PER = 12, 3  # 4 shards of 3 images


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """4 input shards and an ImageFolder of the same 12 images (labels sorted, so ImageFolder
    order is the shards' order), a tiny EBM, and the reference run: shards -> webdataset."""
    root = tmp_path_factory.mktemp("wds")
    x = np.random.default_rng(5).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), N // 3)
    keys = [f"dir/img-{i:03d}" for i in range(N)]  # a folder part, as webdataset allows
    (root / "in").mkdir()
    for k in range(N // PER):
        sl = slice(k * PER, (k + 1) * PER)
        write_tar(root / "in" / f"train-{k:03d}.tar", keys[sl], x[sl], y[sl])
    for i in range(N):
        p = root / "folder" / str(y[i]) / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(p)
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), root / "ebm")
    e = SimpleNamespace(root=root, x=x, y=y, keys=keys, spec=str(root / "in/train-{000..003}.tar"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUREGEN_FAST_CACHE", str(root / "cache"))
        assert main(_argv(e, root / "ref", "--format", "webdataset")) == 0
    e.ref = root / "ref"
    return e


@pytest.fixture(autouse=True)
def _cache(env, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(env.root / "cache"))


def _argv(env, out, *extra, method="ebm", dataset="webdataset", data=None):
    return [
        "purify", "--dataset", dataset, "--data-dir", data or env.spec, "--method", method,
        "--ebm", str(env.root / "ebm"), "--ebm-steps", "2", "--seed", "3", "--batch-size", "2",
        "--backend", "reference", "--device", "cpu", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_shards_round_trip_and_equal_the_imagefolder_run(env, tmp_path):
    ref = pg.load_purified(env.ref)
    assert ref.keys == env.keys
    np.testing.assert_array_equal(ref.labels, env.y)
    assert ref.class_names == ["0", "1", "2"]
    assert not np.array_equal(ref.images, env.x)  # purification did something
    man = ref.manifest
    assert [s["count"] for s in man["dataset"]["shards"]] == [PER] * 4
    assert [s["tar"] for s in man["shards"]] == [f"shard-{k:05d}.tar" for k in range(4)]
    assert man["config"]["input_shards"] == man["dataset"]["shards"]
    # the output tars are plain WebDataset: key.cls and key.png, in order
    with tarfile.open(env.ref / "shard-00001.tar") as t:
        assert t.getnames() == [f"dir/img-{i:03d}.{e}" for i in (3, 4, 5) for e in ("cls", "png")]
    assert main(_argv(env, tmp_path / "npy")) == 0
    npy = pg.load_purified(tmp_path / "npy")
    np.testing.assert_array_equal(np.asarray(npy.images), ref.images)
    np.testing.assert_array_equal(npy.labels, env.y)
    folder = _argv(env, tmp_path / "folder", "--shard-size", str(PER), dataset="imagefolder",
                   data=str(env.root / "folder"))  # fmt: skip
    assert main(folder) == 0
    np.testing.assert_array_equal(np.asarray(pg.load_purified(tmp_path / "folder").images),
                                  ref.images)  # fmt: skip


def test_killed_run_resumes_to_the_same_bytes(env, tmp_path, monkeypatch):
    """The run dies while writing its third shard (a half-written temporary tar is left, as a
    kill leaves it); --resume keeps the two finished shards and writes the rest."""
    out = tmp_path / "o"
    real = pgwds.write_tar
    calls = []

    def dying(path, *a):
        calls.append(path)
        if len(calls) == 3:
            Path(path).with_name(f".{Path(path).name}.tmp-999.tar").write_bytes(b"torn")
            raise KeyboardInterrupt
        return real(path, *a)

    monkeypatch.setattr("puregen_fast.data.writer.write_tar", dying)
    assert main(_argv(env, out, "--format", "webdataset")) == 130
    assert not (out / "manifest.json").exists()
    assert sorted(_tars(out)) == ["shard-00000.tar", "shard-00001.tar"]
    assert (out / ".shard-00002.tar.tmp-999.tar").exists()
    monkeypatch.setattr("puregen_fast.data.writer.write_tar", real)
    assert main(_argv(env, out, "--format", "webdataset", "--resume")) == 0
    assert _tars(out) == _tars(env.ref)
    assert not list(out.glob(".*.tmp-*"))  # the torn temporary file was removed
    t = pg.load_purified(out).manifest["timings"]
    assert t["images_purified"] == 2 * PER


def test_limit_cuts_the_last_shard(env, tmp_path):
    assert main(_argv(env, tmp_path / "o", "--limit", "5", "--format", "webdataset")) == 0
    d = pg.load_purified(tmp_path / "o")
    assert d.keys == env.keys[:5]
    assert [s["stop"] - s["start"] for s in d.manifest["shards"]] == [3, 2]
    np.testing.assert_array_equal(d.images, pg.load_purified(env.ref).images[:5])


def _copy_shards(env, tmp_path) -> Path:
    d = tmp_path / "in"
    shutil.copytree(env.root / "in", d)
    return d


def _replace_member(path: Path, name: str, data: bytes) -> None:
    """Rewrite the tar with member ``name``'s bytes replaced."""
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(path, "w") as t:
        for m, b in members:
            b = data if m.name == name else b
            m.size = len(b)
            t.addfile(m, io.BytesIO(b))


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("cut-in-member", r"train-002\.tar: truncated or corrupt tar at key 'dir/img-00\d'"),
        ("cut-at-member", r"train-002\.tar: truncated tar \(it ends after key 'dir/img-007'"),
        ("bad-image", r"train-002\.tar, key 'dir/img-007': cannot read the image"),
        ("bad-pixels", r"train-002\.tar, key 'dir/img-007': cannot read the image"),
        ("bad-label", r"train-002\.tar, key 'dir/img-007': label \(cls\) b'seven'"),
    ],
)
def test_damaged_shard_exit_2_names_shard_and_key(env, tmp_path, capsys, damage, expect):
    d = _copy_shards(env, tmp_path)
    p = d / "train-002.tar"
    raw = p.read_bytes()
    if damage == "cut-in-member":
        p.write_bytes(raw[:3000])
    elif damage == "cut-at-member":  # after sample 7's two members; no end-of-archive block
        with tarfile.open(p) as t:
            m = t.getmembers()[3]
        p.write_bytes(raw[: m.offset_data + ((m.size + 511) // 512) * 512])
    elif damage == "bad-image":
        _replace_member(p, "dir/img-007.png", b"not an image at all")
    elif damage == "bad-pixels":  # a valid header, the pixel data cut: found when decoding
        with tarfile.open(p) as t:
            png = t.extractfile("dir/img-007.png").read()
        _replace_member(p, "dir/img-007.png", png[:-400])
    else:
        _replace_member(p, "dir/img-007.cls", b"seven")
    out = tmp_path / "o"
    assert main(_argv(env, out, method="none", data=str(d / "train-{000..003}.tar"))) == 2
    assert re.search(expect, capsys.readouterr().err)
    assert not (out / "manifest.json").exists()


def test_shard_patterns(tmp_path):
    x = np.zeros((2, 4, 4, 3), np.uint8)
    for k in range(3):
        write_tar(tmp_path / f"s-{k}.tar", [f"a{k}", f"b{k}"], x, np.array([0, 1]))
    spec = str(tmp_path / "s-{0..2}.tar")
    assert [p.name for p in expand_shards(spec)] == ["s-0.tar", "s-1.tar", "s-2.tar"]
    assert [p.name for p in expand_shards(tmp_path)] == ["s-0.tar", "s-1.tar", "s-2.tar"]
    both = f"{tmp_path / 's-2.tar'}::{tmp_path / 's-0.tar'}"
    assert index_webdataset(both).keys == ["a2", "b2", "a0", "b0"]
    with pytest.raises(UsageError, match=r"s-3\.tar cannot be read"):
        expand_shards(str(tmp_path / "s-{0..3}.tar"))
    with pytest.raises(UsageError, match="only local shard paths"):
        expand_shards("https://example.org/s-{0..2}.tar")
    with pytest.raises(UsageError, match="more than once"):
        expand_shards(f"{tmp_path / 's-0.tar'}::{tmp_path / 's-0.tar'}")


def test_other_input_to_webdataset_output_and_overwrite(env, tmp_path):
    """An ImageFolder to --format webdataset: shards of --shard-size, keys the zero-padded
    index; --overwrite with fewer shards deletes the tars it no longer writes."""
    out = tmp_path / "o"
    argv = _argv(env, out, "--format", "webdataset", "--shard-size", "5", method="none",
                 dataset="imagefolder", data=str(env.root / "folder"))  # fmt: skip
    assert main(argv) == 0
    d = pg.load_purified(out)
    assert d.keys == [f"{i:02d}" for i in range(N)]
    np.testing.assert_array_equal(d.images, env.x)  # method none: the images themselves
    assert sorted(_tars(out)) == [f"shard-{k:05d}.tar" for k in range(3)]
    assert main(argv + ["--limit", "4", "--overwrite"]) == 0
    assert sorted(_tars(out)) == ["shard-00000.tar"]
    assert pg.load_purified(out).keys == ["0", "1", "2", "3"]
