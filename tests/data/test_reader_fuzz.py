"""Property-based fuzz of `load_purified`: a real output folder whose manifest, shard files and
PNG files are damaged at random. Only the project's own error (UsageError, exit 2) may escape,
and no case may hang. The default run tries 300 folders; ``-m slow`` tries 10,000."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import budget_spent, skip_if_cut
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import puregen_fast as pg
from puregen_fast.data.manifest import MANIFEST, Manifest
from puregen_fast.data.writer import ShardWriter
from puregen_fast.errors import UsageError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)  # fmt: skip


def _folder(root: Path, fmt: str) -> tuple[Path, dict]:
    """A finished output folder written by the real writer: 7 images in shards of 4."""
    out = root / fmt
    out.mkdir()
    x = np.random.default_rng(0).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    y = np.arange(7) % 2
    w = ShardWriter(out, fmt, 7, 4, ["a", "b"])
    w.make_class_dirs()
    recs = [w.write_shard(k, x[s:e], y[s:e]) for k, (s, e) in enumerate(w.ranges)]
    m = Manifest(config={"format": fmt}, purifier={"method": "ebm"},
                 dataset={"class_names": ["a", "b"], "image_shape": [4, 5, 3]},
                 count=7, shards=recs)  # fmt: skip
    m.write(out / MANIFEST)
    assert len(pg.load_purified(out)) == 7
    return out, m.to_json()


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate(man: dict, picks: list[tuple[int, object, bool]]) -> dict:
    m = copy.deepcopy(man)
    for which, value, delete in picks:
        paths = [p for p in _paths(m) if p]
        path = paths[which % len(paths)]
        d = m
        for k in path[:-1]:
            d = d[k]
        if delete and isinstance(d, dict):
            del d[path[-1]]
        else:
            d[path[-1]] = value
    return m


CASE = st.tuples(
    st.sampled_from(["npy", "png"]),
    st.lists(st.tuples(st.integers(0, 10**6), JSON, st.booleans()), min_size=0, max_size=3),
    st.sampled_from(["none", "truncate", "garbage", "delete", "raw-json"]),
    st.integers(0, 10**6),
    st.binary(max_size=64),
)


def _fuzz(tmp_path_factory, templates: dict, case) -> str:
    fmt, picks, damage, which, junk = case
    if fmt not in templates:
        templates[fmt] = _folder(tmp_path_factory.mktemp("template"), fmt)
    src, man = templates[fmt]
    root = tmp_path_factory.mktemp("f")
    out = root / fmt
    shutil.copytree(src, out)
    text = json.dumps(_mutate(man, picks), allow_nan=True)
    if damage == "raw-json":
        text = junk.decode("utf-8", "replace")
    (out / MANIFEST).write_text(text)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    target = files[which % len(files)]
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: which % 97])
    elif damage == "garbage":
        target.write_bytes(junk)
    elif damage == "delete":
        target.unlink()
    try:
        pg.load_purified(out)
        outcome = "loaded"
    except UsageError:
        outcome = "clean error"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return outcome


def _run(tmp_path_factory, n: int) -> None:
    seen: dict[str, int] = {}
    templates: dict = {}

    @settings(max_examples=n, deadline=2000, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(CASE)
    def check(case):
        if budget_spent():
            return
        r = _fuzz(tmp_path_factory, templates, case)  # anything but UsageError fails the test here
        seen[r] = seen.get(r, 0) + 1

    check()
    print(f"load_purified fuzz: {sum(seen.values())} cases, {seen}")
    skip_if_cut("load_purified fuzz", sum(seen.values()), n)
    assert sum(seen.values()) >= n * 0.9 and seen.get("clean error", 0) > 0


def test_load_purified_fuzz(tmp_path_factory):
    _run(tmp_path_factory, 300)


@pytest.mark.slow
def test_load_purified_fuzz_long(tmp_path_factory):
    _run(tmp_path_factory, 10_000)
