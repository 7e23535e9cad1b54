"""The shard writer, the output folder's states, and `load_purified`."""

from __future__ import annotations

import json

import numpy as np
import pytest

import puregen_fast as pg
from puregen_fast.data.io import atomic_write_json, tmp_name
from puregen_fast.data.manifest import Manifest
from puregen_fast.data.reader import ShardedArray
from puregen_fast.data.writer import (
    MANIFEST,
    RUN_STATE,
    ShardWriter,
    check_out_dir,
    png_class_dirs,
    prepare_out_dir,
    rank_shards,
    shard_ranges,
)
from puregen_fast.errors import UsageError


def _data(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8),
        (np.arange(n) % 3).astype(np.int64),
    )


def _finish(out, w, x, y, fmt="npy", names=("a", "b", "c")):
    """Write every shard and a minimal manifest, as the pipeline does."""
    recs = [w.write_shard(k, x[s:e], y[s:e]) for k, (s, e) in enumerate(w.ranges)]
    Manifest(
        config={"format": fmt},
        purifier={"method": "none"},
        dataset={"class_names": list(names), "image_shape": list(x.shape[1:])},
        count=len(y),
        shards=recs,
    ).write(out / MANIFEST)
    return recs


def test_ranges_and_rank_slices():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    for shards in (1, 3, 7, 10):
        for world in (1, 2, 3, 4):
            got = [list(rank_shards(shards, r, world)) for r in range(world)]
            assert sum(got, []) == list(range(shards))  # contiguous, in order, all covered


def test_npy_roundtrip_and_lazy_view(tmp_path):
    x, y = _data(10)
    w = ShardWriter(tmp_path, "npy", 10, 4, ["a", "b", "c"])
    recs = _finish(tmp_path, w, x, y)
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == [
        "images-00000.npy", "images-00001.npy", "images-00002.npy",
        "labels-00000.npy", "labels-00001.npy", "labels-00002.npy",
    ]  # fmt: skip
    assert not list(tmp_path.glob(".*tmp*"))
    assert all(len(r["images_sha256"]) == 64 for r in recs)
    d = pg.load_purified(tmp_path)
    assert isinstance(d.images, ShardedArray) and d.images.shape == x.shape
    np.testing.assert_array_equal(np.asarray(d.images), x)
    np.testing.assert_array_equal(d.labels, y)
    assert d.labels.dtype == np.int64
    # indexing like an ndarray
    for key in (3, -1, slice(2, 9), slice(None, None, -3), [7, 0, 4], np.array([9, 1]), y == 1):
        np.testing.assert_array_equal(d.images[key], x[key])
    np.testing.assert_array_equal(d.images[5, 1:3, ..., 0], x[5, 1:3, ..., 0])
    np.testing.assert_array_equal(d.images[2:6, 0], x[2:6, 0])
    with pytest.raises(IndexError):
        d.images[10]


def test_single_shard_is_a_memmap(tmp_path):
    x, y = _data(6)
    w = ShardWriter(tmp_path, "npy", 6, 100, ["a", "b", "c"])
    _finish(tmp_path, w, x, y)
    d = pg.load_purified(tmp_path)
    assert isinstance(d.images, np.memmap)
    np.testing.assert_array_equal(d.images, x)


def test_damaged_shard_detected(tmp_path):
    x, y = _data(10)
    w = ShardWriter(tmp_path, "npy", 10, 4, ["a", "b", "c"])
    _finish(tmp_path, w, x, y)
    assert w.verify_shard(1, y[4:8]) is not None
    p = tmp_path / "images-00001.npy"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    assert w.verify_shard(1, y[4:8]) is None
    assert w.verify_shard(0, y[0:4]) is not None
    with pytest.raises(UsageError, match="images-00001.npy"):
        pg.load_purified(tmp_path)
    (tmp_path / "labels-00002.npy").unlink()
    assert w.verify_shard(2, y[8:]) is None
    (tmp_path / ".puregen-shard-00000.json").write_text("{not json")
    assert w.verify_shard(0, y[0:4]) is None  # a broken record means: write it again


def test_png_tree_is_an_imagefolder(tmp_path):
    x, y = _data(11)
    names = ["zebra", "apple", "mango"]  # not sorted: folders get label prefixes
    w = ShardWriter(tmp_path, "png", 11, 4, names)
    w.make_class_dirs()
    _finish(tmp_path, w, x, y, fmt="png", names=names)
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert dirs == ["0-zebra", "1-apple", "2-mango"]
    assert (tmp_path / "1-apple" / "04.png").is_file()
    # torchvision ImageFolder's rules: sorted dirs are the classes, files sorted within
    for label, d in enumerate(dirs):
        files = sorted((tmp_path / d).iterdir())
        assert [int(f.stem) for f in files] == [i for i in range(11) if y[i] == label]
    d = pg.load_purified(tmp_path)
    np.testing.assert_array_equal(d.images, x)
    np.testing.assert_array_equal(d.labels, y)
    assert w.verify_shard(1, y[4:8]) is not None
    (tmp_path / "2-mango" / "05.png").write_bytes(b"broken")
    assert w.verify_shard(1, y[4:8]) is None


def test_png_class_dirs():
    assert png_class_dirs(["airplane", "bird", "cat"]) == ["airplane", "bird", "cat"]
    assert png_class_dirs(["b", "a"]) == ["0-b", "1-a"]
    assert png_class_dirs([str(i) for i in range(11)])[10] == "10-10"
    assert png_class_dirs(["x/y", ".."]) == ["0-x_y", "1-1"]


def test_out_dir_states(tmp_path):
    out = tmp_path / "out"
    cfg = {"seed": 0, "purifier": {"method": "none"}}
    assert prepare_out_dir(out, cfg, resume=False, overwrite=False) is False
    assert json.loads((out / RUN_STATE).read_text())["config"] == cfg
    (out / "images-00000.npy").write_bytes(b"x")
    (out / "user-notes.txt").write_text("mine")
    # an unfinished run: refused without --resume / --overwrite
    with pytest.raises(UsageError, match="--resume"):
        check_out_dir(out, resume=False, overwrite=False)
    # same configuration: resume reuses
    assert prepare_out_dir(out, cfg, resume=True, overwrite=False) is True
    assert (out / "images-00000.npy").exists()
    # another configuration: refused, naming what differs
    with pytest.raises(UsageError, match="seed"):
        prepare_out_dir(out, {**cfg, "seed": 1}, resume=True, overwrite=False)
    # --overwrite: our files go, the user's stay
    assert prepare_out_dir(out, {**cfg, "seed": 1}, resume=True, overwrite=True) is False
    assert not (out / "images-00000.npy").exists()
    assert (out / "user-notes.txt").read_text() == "mine"
    # a finished folder: the manifest is removed while a resume rewrites shards
    atomic_write_json(out / MANIFEST, {"config": {**cfg, "seed": 1}})
    with pytest.raises(UsageError, match="manifest"):
        check_out_dir(out, resume=False, overwrite=False)
    assert prepare_out_dir(out, {**cfg, "seed": 1}, resume=True, overwrite=False) is True
    assert not (out / MANIFEST).exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a folder"):
        check_out_dir(tmp_path / "file", resume=False, overwrite=False)


def test_load_purified_unfinished(tmp_path):
    with pytest.raises(UsageError, match="manifest.json"):
        pg.load_purified(tmp_path)


def test_unknown_folder_is_not_a_run_and_overwrite_keeps_foreign_files(tmp_path):
    proj = tmp_path / "proj"
    (proj / "photos").mkdir(parents=True)
    (proj / "photos" / "1.png").write_bytes(b"a photo")
    (proj / "images-00000.npy").write_bytes(b"someone else's")
    for resume, overwrite in [(False, False), (True, False), (False, True), (True, True)]:
        with pytest.raises(UsageError, match="holds no puregen-fast purify output") as ei:
            prepare_out_dir(proj, {"seed": 0}, resume=resume, overwrite=overwrite)
        assert "unfinished" not in str(ei.value) and "photos" in str(ei.value)
    assert (proj / "photos" / "1.png").read_bytes() == b"a photo"
    assert (proj / "images-00000.npy").exists() and not (proj / RUN_STATE).exists()
    # an empty folder (or one with only our own leftovers) is fine
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / f".{RUN_STATE}.tmp-123").write_text("{")
    assert prepare_out_dir(tmp_path / "empty", {"seed": 0}, resume=False, overwrite=False) is False
    assert [p.name for p in (tmp_path / "empty").iterdir()] == [RUN_STATE]
    # a png run: --overwrite deletes the numbered files in its class folders only
    out = tmp_path / "run"
    cfg = {"format": "png", "class_names": ["a", "b"]}
    prepare_out_dir(out, cfg, resume=False, overwrite=False)
    w = ShardWriter(out, "png", 2, 2, ["a", "b"])
    w.make_class_dirs()
    w.write_shard(0, np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]))
    (out / "photos").mkdir()
    (out / "photos" / "1.png").write_bytes(b"a photo")
    (out / "a" / "notes.txt").write_text("mine")
    assert prepare_out_dir(out, {**cfg, "seed": 1}, resume=False, overwrite=True) is False
    assert (out / "photos" / "1.png").read_bytes() == b"a photo"
    assert (out / "a" / "notes.txt").exists() and not (out / "a" / "0.png").exists()
    assert not (out / "b").exists() and not (out / ".puregen-shard-00000.json").exists()


def test_killed_runs_temporary_files_are_cleaned(tmp_path):
    """Temporary names as `io.tmp_name` makes them (and as earlier versions did) are ours: a
    resume removes them and keeps finished shards, --overwrite removes them; look-alikes that are
    not ours stay."""
    x, y = _data(4)
    names = ["a", "b", "c"]
    for fmt in ("npy", "png"):
        out = tmp_path / fmt
        cfg = {"format": fmt, "class_names": names}
        prepare_out_dir(out, cfg, resume=False, overwrite=False)
        w = ShardWriter(out, fmt, 4, 2, names)
        w.make_class_dirs()
        w.write_shard(0, x[:2], y[:2])
        finished = sorted(p for p in out.rglob("*") if p.is_file())
        if fmt == "npy":
            final = [out / "images-00001.npy", out / "labels-00001.npy"]
        else:
            final = [out / w.png_name(2, int(y[2])), out / w.png_name(3, int(y[3]))]
        final += [out / MANIFEST, w.record_path(1), out / RUN_STATE]
        leftovers = [tmp_name(f) for f in final]
        leftovers += [f.with_name(f".{f.name}.tmp-77") for f in final]  # earlier versions
        mine = [out / "notes.tmp-1.npy", out / ".images-00001.npy.tmp-1.txt", out / "a" / "x.png"]
        (out / "a").mkdir(exist_ok=True)
        for f in leftovers + mine:
            f.write_bytes(b"partial")
        assert prepare_out_dir(out, cfg, resume=True, overwrite=False) is True
        left = sorted(p for p in out.rglob("*") if p.is_file() and p not in mine)
        assert left == finished
        for f in leftovers:
            f.write_bytes(b"partial")
        assert prepare_out_dir(out, cfg, resume=True, overwrite=True) is True
        assert not any(f.exists() for f in leftovers)
        assert all(f.exists() for f in mine)
        prepare_out_dir(out, {**cfg, "seed": 1}, resume=False, overwrite=True)
        assert not any(f.exists() for f in finished if f.name != RUN_STATE)
        assert all(f.exists() for f in mine)
    # a folder holding only a run record's temporary file is not someone else's folder
    only = tmp_path / "only"
    only.mkdir()
    tmp_name(only / RUN_STATE).write_bytes(b"{")
    assert prepare_out_dir(only, {"seed": 0}, resume=False, overwrite=False) is False
    assert [p.name for p in only.iterdir()] == [RUN_STATE]


def test_png_shard_flushes_its_class_folders_before_its_record(tmp_path, monkeypatch):
    from puregen_fast.data import writer

    events = []
    monkeypatch.setattr(writer, "fsync_dir", lambda d: events.append(("folder", d.name)))
    record = writer.atomic_write_json
    monkeypatch.setattr(
        writer, "atomic_write_json", lambda p, o: (events.append(("record", p.name)), record(p, o))
    )
    w = ShardWriter(tmp_path, "png", 4, 4, ["a", "b", "c"])
    w.make_class_dirs()
    w.write_shard(0, _data(4)[0], np.array([2, 0, 2, 0]))
    assert events == [("folder", "a"), ("folder", "c"), ("record", ".puregen-shard-00000.json")]


@pytest.mark.parametrize("flags", [{"overwrite": True}, {"resume": True}])
def test_a_png_class_folder_replaced_by_a_link_is_not_written_through(tmp_path, flags):
    """Issue 22: with --format png, a class folder in --out replaced by a link to a folder
    elsewhere was written through on --overwrite and --resume. It is refused (exit 2) naming the
    folder, and nothing outside --out changes."""
    from puregen_fast.data.datasets import Dataset
    from puregen_fast.pipeline import purify_dataset
    from puregen_fast.purifier import Purifier

    x, y = _data(6)
    ds = Dataset("npz", "train", x, y, ["a", "b", "c"], "memory")
    out = tmp_path / "o"
    purify_dataset(ds, Purifier(method="none", device="cpu"), out, fmt="png", shard_size=2,
                   quiet=True)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0.png").write_bytes(b"not ours")  # a numbered name, as the writer uses
    before = sorted((p.name, p.read_bytes()) for p in elsewhere.iterdir())
    for f in (out / "b").iterdir():
        f.unlink()
    (out / "b").rmdir()
    (out / "b").symlink_to(elsewhere, target_is_directory=True)
    (out / ".puregen-shard-00000.json").unlink()  # --resume has a shard to write again
    with pytest.raises(UsageError, match="class folder 'b' is a symbolic link"):
        purify_dataset(ds, Purifier(method="none", device="cpu"), out, fmt="png", shard_size=2,
                       quiet=True, **flags)  # fmt: skip
    assert sorted((p.name, p.read_bytes()) for p in elsewhere.iterdir()) == before


def test_a_class_folder_replaced_between_shards_is_refused_before_writing(tmp_path):
    x, y = _data(6)
    w = ShardWriter(tmp_path, "png", 6, 3, ["a", "b", "c"])
    w.make_class_dirs()
    w.write_shard(0, x[:3], y[:3])
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    for f in (tmp_path / "a").iterdir():
        f.unlink()
    (tmp_path / "a").rmdir()
    (tmp_path / "a").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UsageError, match="'a' is a symbolic link"):
        w.write_shard(1, x[3:], y[3:])
    assert list(elsewhere.iterdir()) == []
