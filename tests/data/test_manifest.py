"""`Manifest`: the typed record of a purified folder. A good one round-trips; every malformed
one is a UsageError naming the file, never a KeyError, TypeError or ValueError."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import puregen_fast as pg
from puregen_fast.data.manifest import MANIFEST, Manifest
from puregen_fast.data.writer import ShardWriter
from puregen_fast.errors import UsageError


def _good() -> dict:
    shard = {"index": 0, "images": "images-00000.npy", "labels": "labels-00000.npy",
             "images_sha256": "0" * 64, "labels_sha256": "1" * 64}  # fmt: skip
    return Manifest(
        config={"format": "npy", "seed": 0},
        purifier={"method": "ebm"},
        dataset={"class_names": ["a", "b"], "image_shape": [4, 5, 3]},
        count=7,
        shards=[{**shard, "start": 0, "stop": 4},
                {**shard, "index": 1, "start": 4, "stop": 7, "images": "images-00001.npy"}],
        timings={"images_per_s": 12.5},
    ).to_json()  # fmt: skip


def _set(path: str, value):
    """A change to the good manifest: ``value`` at the dotted ``path`` (``...`` deletes it)."""

    def change(m: dict) -> None:
        *parents, last = path.split(".")
        d = m
        for k in parents:
            d = d[int(k)] if isinstance(d, list) else d[k]
        key = int(last) if isinstance(d, list) else last
        if value is ...:
            del d[key]
        else:
            d[key] = value

    return change


BAD = {
    "config missing": _set("config", ...),
    "config a list": _set("config", ["npy"]),
    "purifier missing": _set("purifier", ...),
    "dataset null": _set("dataset", None),
    "count missing": _set("count", ...),
    "count a string": _set("count", "7"),
    "count a bool": _set("count", True),
    "count negative": _set("count", -1),
    "world_size zero": _set("world_size", 0),
    "timings a list": _set("timings", []),
    "backend a number": _set("backend", 3),
    "filter a string": _set("filter", "none"),
    "unknown output format": _set("config.format", "tiff"),
    "no output format": _set("config.format", ...),
    "image_shape two numbers": _set("dataset.image_shape", [4, 5]),
    "image_shape strings": _set("dataset.image_shape", ["4", 5, 3]),
    "image_shape zero": _set("dataset.image_shape", [0, 5, 3]),
    "class_names numbers": _set("dataset.class_names", [0, 1]),
    "class_names missing": _set("dataset.class_names", ...),
    "shards an object": _set("shards", {"0": {}}),
    "shard a list": _set("shards.0", [0, 4]),
    "shard without stop": _set("shards.0.stop", ...),
    "shard start a float": _set("shards.0.start", 0.0),
    "shard reversed range": _set("shards.1.stop", 3),
    "shard gap": _set("shards.1.start", 5),
    "shards short of count": _set("count", 8),
    "shard without sha256": _set("shards.1.labels_sha256", ...),
    "shard name leads up": _set("shards.0.images", "../images-00000.npy"),
    "shard name absolute": _set("shards.0.labels", "/etc/passwd"),
    "shard name in a folder": _set("shards.0.labels", "sub/labels.npy"),
    "shard name dot-dot": _set("shards.1.images", ".."),
    "shard name with NUL": _set("shards.1.images", "images\0.npy"),
}


def test_good_manifest_round_trips(tmp_path):
    p = tmp_path / MANIFEST
    Manifest.from_json(_good()).write(p)
    m = Manifest.read(p)
    assert m.to_json() == _good() and dict(m) == _good()
    assert m["timings"]["images_per_s"] == 12.5 and m.get("backend") is None
    assert "filter" in m and m["filter"] is None  # null: no filter ran
    assert m.class_names == ["a", "b"] and m.image_shape == (4, 5, 3) and m.out_format == "npy"


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_manifest_is_a_usage_error_naming_the_file(tmp_path, case):
    raw = copy.deepcopy(_good())
    BAD[case](raw)
    p = tmp_path / MANIFEST
    p.write_text(json.dumps(raw))
    with pytest.raises(UsageError) as ei:
        Manifest.read(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize(
    "text, says",
    [("{not json", "unreadable"), ("[1, 2]", "unreadable"),
     ('{"format": "other-tool", "shards": []}', "not a puregen-fast")],
)  # fmt: skip
def test_unreadable_or_foreign_manifest(tmp_path, text, says):
    p = tmp_path / MANIFEST
    p.write_text(text)
    with pytest.raises(UsageError, match=says) as ei:
        Manifest.read(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("case", ["count a string", "shard name leads up", "shard gap"])
def test_load_purified_refuses_a_malformed_manifest(tmp_path, case):
    # a real output folder, then its manifest damaged: load_purified says which file
    x = np.zeros((7, 4, 5, 3), np.uint8)
    y = np.arange(7, dtype=np.int64) % 2
    w = ShardWriter(tmp_path, "npy", 7, 4, ["a", "b"])
    raw = _good()
    raw["shards"] = [w.write_shard(k, x[s:e], y[s:e]) for k, (s, e) in enumerate(w.ranges)]
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    assert len(pg.load_purified(tmp_path)) == 7
    BAD[case](raw)
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(UsageError, match=MANIFEST):
        pg.load_purified(tmp_path)


def _paths(obj, prefix=()):
    """Every dotted path into a JSON value."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        yield ".".join((*prefix, str(k)))
        yield from _paths(v, (*prefix, str(k)))


def test_any_one_changed_value_reads_or_is_a_usage_error():
    # every field of the good manifest deleted or set to each kind of JSON value: either a
    # manifest whose accessors work, or a UsageError; nothing else escapes
    values = [..., None, True, 0, -1, 2.5, "x", "../x", [], [1], {}, {"a": 1}]
    refused = 0
    for path in _paths(_good()):
        for v in values:
            raw = copy.deepcopy(_good())
            _set(path, v)(raw)
            try:
                m = Manifest.from_json(raw, "here.json")
            except UsageError as e:
                assert "here.json" in str(e)
                refused += 1
                continue
            assert len(m.image_shape) == 3 and m.out_format in ("npy", "png")
            assert all(isinstance(c, str) for c in m.class_names) and m.method
            assert json.loads(json.dumps(dict(m))) == m.to_json()
    assert refused > 100
