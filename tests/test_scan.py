"""`puregen_fast.scan` (issue 25): every image's EBM energy ranked, with z-scores per class and
overall, against a hand computation in numpy; resumable to the same table bytes."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from puregen_fast.data.datasets import Dataset
from puregen_fast.errors import DivergenceError, UsageError
from puregen_fast.eval.scan_charts import HISTOGRAM, TOP_GRID, scan_pictures, shown_classes
from puregen_fast.scan import (
    CHAIN_COLUMNS,
    COLUMNS,
    SCAN_JSON,
    SCAN_TABLE,
    energy_purifier,
    energy_table,
    scan_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic(nn.Module):
    """E(x) = mean(x^2), x in [-1, 1]: mid-grey images sit near 0, saturated noise near 1/3,
    so planted noise images must rank first; the energy is easy to compute in numpy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * x).flatten(1).mean(1)


def _hand_energy(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float64) / 255 * 2 - 1
    return (x * x).mean(axis=(1, 2, 3))


def _planted(n: int = 30, planted=(4, 11, 25), seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    planted = [i for i in planted if i < n]
    x = rng.integers(110, 146, (n, 8, 8, 3), dtype=np.uint8)  # near grey: low energy
    x[planted] = rng.integers(0, 256, (len(planted), 8, 8, 3), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 3
    return Dataset("npz", "train", x, y, ["cat", "dog,hound", "frog"], "memory")


def _rows(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _killed_after_two_shards(monkeypatch, scan) -> None:
    """Run ``scan()`` as Ctrl-C stops it once two shards' records are written."""
    import puregen_fast.scan as scan_mod

    real, calls = scan_mod._write_shard, []

    def dies_after_two(*a):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(a[1])
        real(*a)

    monkeypatch.setattr(scan_mod, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        scan()
    monkeypatch.setattr(scan_mod, "_write_shard", real)


def test_planted_images_rank_first_and_z_scores_match_numpy(tmp_path):
    ds = _planted()
    p = energy_purifier(Quadratic(), "cpu")
    r = scan_dataset(ds, p, tmp_path / "o", batch_size=4, shard_size=7, quiet=True)
    rows = _rows(tmp_path / "o" / SCAN_TABLE)
    assert tuple(rows[0]) == COLUMNS and len(rows) == 30
    # the model's energies are the hand computation's (float32 inside the model)
    e = np.array([float(row["energy"]) for row in sorted(rows, key=lambda r: int(r["id"]))])
    np.testing.assert_allclose(e, _hand_energy(ds.images), rtol=1e-5)
    assert {int(row["id"]) for row in rows[:3]} == {4, 11, 25}
    # rank, z-scores and the cut by hand, from the energies the table holds
    y = ds.labels
    order = sorted(range(30), key=lambda i: (-e[i], i))
    want_z_all = (e - e.mean()) / e.std()
    cut = np.quantile(e, 0.5)
    for row in rows:
        i = int(row["id"])
        m = y == y[i]
        assert int(row["rank"]) == order.index(i) + 1
        assert float(row["z_all"]) == pytest.approx(want_z_all[i], rel=1e-12, abs=1e-12)
        assert float(row["z_class"]) == pytest.approx(
            (e[i] - e[m].mean()) / e[m].std(), rel=1e-12, abs=1e-12)
        assert int(row["label"]) == y[i] and row["class"] == ds.class_names[y[i]]
        assert int(row["above_cut"]) == int(e[i] >= cut)
    assert [int(row["rank"]) for row in rows] == list(range(1, 31))  # written in rank order
    summary = json.loads((tmp_path / "o" / SCAN_JSON).read_text())
    assert summary["cut"] == pytest.approx(cut, rel=1e-12)
    assert summary["at_or_above_cut"] == 15 and summary["num_images"] == 30
    assert summary["top"][0]["id"] == int(rows[0]["id"])
    assert [c["count"] for c in summary["classes"]] == [10, 10, 10]
    assert r is not None and r.table.cut == summary["cut"]


def test_table_ties_constant_classes_and_the_cut():
    e = np.array([1.0, 3.0, 3.0, 2.0, 5.0, 5.0])
    y = np.array([0, 0, 0, 0, 1, 1])
    t = energy_table(e, y, 0.25)
    assert t.rank.tolist() == [6, 3, 4, 5, 1, 2]  # ties: the lower id first
    assert t.z_class[4:].tolist() == [0.0, 0.0]  # one value in the class: no spread, z 0
    m = y == 0
    np.testing.assert_allclose(t.z_class[m], (e[m] - e[m].mean()) / e[m].std())
    assert t.cut == np.quantile(e, 0.75) and t.above_cut.tolist() == list(e >= t.cut)
    with pytest.raises(ValueError, match="finite"):
        energy_table(np.array([1.0, np.nan]), np.array([0, 0]), 0.5)


def test_killed_scan_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    ds = _planted(n=23)
    p = energy_purifier(Quadratic(), "cpu")
    kw = dict(batch_size=4, shard_size=5, quiet=True)
    scan_dataset(ds, p, tmp_path / "whole", **kw)
    want = (tmp_path / "whole" / SCAN_TABLE).read_bytes()

    _killed_after_two_shards(monkeypatch, lambda: scan_dataset(ds, p, tmp_path / "o", **kw))
    assert not (tmp_path / "o" / SCAN_JSON).exists()
    with pytest.raises(UsageError, match="unfinished run"):  # not silently redone
        scan_dataset(ds, p, tmp_path / "o", **kw)
    seen = []
    monkeypatch.setattr(p, "energy", lambda x, ids: (seen.append(int(ids[0])),
                                                     type(p).energy(p, x, ids))[1])
    scan_dataset(ds, p, tmp_path / "o", resume=True, **kw)
    assert min(seen) == 10  # the two finished shards (images 0-9) were kept
    assert (tmp_path / "o" / SCAN_TABLE).read_bytes() == want
    # a damaged piece is computed again, the bytes still the same
    (tmp_path / "o" / ".puregen-energy-00001.json").write_text("{}")
    seen.clear()
    scan_dataset(ds, p, tmp_path / "o", resume=True, **kw)
    assert sorted(set(seen)) == [5, 9]
    assert (tmp_path / "o" / SCAN_TABLE).read_bytes() == want
    with pytest.raises(UsageError, match="finished scan"):
        scan_dataset(ds, p, tmp_path / "o", **kw)
    with pytest.raises(UsageError, match="different configuration"):  # other batches, resumed
        scan_dataset(ds, p, tmp_path / "o", resume=True, batch_size=3, shard_size=5, quiet=True)


def test_non_finite_energy_is_a_divergence_naming_the_image(tmp_path):
    class Bad(Quadratic):
        def forward(self, x):
            e = super().forward(x)
            return torch.where((x > 0.99).flatten(1).any(1), torch.nan, e)

    ds = _planted(n=12)
    with pytest.raises(DivergenceError) as err:
        scan_dataset(ds, energy_purifier(Bad(), "cpu"), tmp_path / "o", batch_size=4,
                     shard_size=4, quiet=True)  # fmt: skip
    assert err.value.sample_ids == [4]  # the run stops at the first batch that holds one
    assert "no table was written" in str(err.value) and "--ebm" in str(err.value)
    assert not (tmp_path / "o" / SCAN_TABLE).exists()
    assert (tmp_path / "o" / ".puregen-energy-00000.json").is_file()  # images 0-3: kept
    run = json.loads((tmp_path / "o" / ".puregen-run.json").read_text())
    assert run["diverged"]["sample_ids"] == [4]


def test_pictures_are_drawn_and_listed(tmp_path):
    from PIL import Image

    ds = _planted()
    r = scan_dataset(ds, energy_purifier(Quadratic(), "cpu"), tmp_path / "o", batch_size=8,
                     quiet=True, pictures=scan_pictures(top=3))  # fmt: skip
    rec = json.loads((tmp_path / "o" / SCAN_JSON).read_text())
    assert rec["files"] == {"table": SCAN_TABLE, "histogram": HISTOGRAM, "top_images": TOP_GRID}
    for name in (HISTOGRAM, TOP_GRID):
        with Image.open(tmp_path / "o" / name) as im:
            assert im.format == "PNG" and im.width > 300
    with Image.open(tmp_path / "o" / TOP_GRID) as im:
        grid = np.asarray(im.convert("RGB"))
    # the highest-energy image of class 1 ("dog,hound": ids 4 and 25) is drawn first in its
    # row, enlarged 8x without smoothing: its top-left pixel fills an 8x8 block
    first = min((4, 25), key=lambda i: r.table.rank[i])
    block = grid[46 + 98 : 46 + 98 + 8, 150 : 150 + 8]
    assert (block == ds.images[first][0, 0]).all()
    # with many classes, the classes with the most images at or above the cut are drawn
    t = energy_table(np.arange(50.0), np.arange(50) % 50, 0.1)
    assert shown_classes(t, 50, limit=5) == [45, 46, 47, 48, 49]


def test_top_images_of_a_streamed_set_are_read_in_one_forward_pass():
    """A streamed WebDataset reopens its shard for a read anywhere but where the last one
    stopped: the pictures read the drawn images in contiguous forward pieces."""
    from puregen_fast.eval.scan_charts import _read

    class Streamed:
        def __init__(self, x):
            self.x, self.reads = x, []

        def __getitem__(self, sl):
            self.reads.append((sl.start, sl.stop))
            return self.x[sl]

    x = np.random.default_rng(0).integers(0, 256, (50, 2, 2, 3), dtype=np.uint8)
    s = Streamed(x)
    got = _read(s, [40, 3, 17, 3], piece=8)
    assert sorted(got) == [3, 17, 40] and all((got[i] == x[i]).all() for i in got)
    assert s.reads[0][0] == 3 and s.reads[-1][1] == 41
    assert all(a[1] == b[0] for a, b in zip(s.reads, s.reads[1:]))  # never a jump
    assert max(e - b for b, e in s.reads) <= 8
    m = _read(x, [7, 2])  # an array: those rows only
    assert sorted(m) == [2, 7] and (m[7] == x[7]).all()


def test_a_chain_ranks_by_the_energy_drop_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """--chain-steps: the table ranks by energy - energy after the chain, each computed by the
    engine on its own here; a killed chained scan resumes to the same bytes, and a plain scan's
    pieces are not taken for a chained one's."""
    ds = _planted(n=23)
    p = energy_purifier(Quadratic(), "cpu")
    chain = energy_purifier(p.ebm, "cpu", ebm_steps=3, ebm_eps=0.5, ebm_temp=1e-3)
    kw = dict(batch_size=4, shard_size=5, quiet=True)
    r = scan_dataset(ds, p, tmp_path / "whole", chain=chain, **kw)
    want = (tmp_path / "whole" / SCAN_TABLE).read_bytes()
    rows = _rows(tmp_path / "whole" / SCAN_TABLE)
    assert tuple(rows[0]) == CHAIN_COLUMNS and len(rows) == 23
    by_id = sorted(rows, key=lambda row: int(row["id"]))
    before = np.array([float(row["energy"]) for row in by_id])
    after = np.array([float(row["energy_after"]) for row in by_id])
    drop = np.array([float(row["drop"]) for row in by_id])
    # the engine on batches of its own: the sample ids key the chain's noise, not the batch
    ids = np.arange(23)
    cuts = [(s, s + 4) for s in range(0, 20, 4)] + [(20, 23)]
    want_after = np.concatenate([p.energy(chain(ds.images[a:b], ids[a:b]), ids[a:b])
                                 for a, b in cuts])  # fmt: skip
    np.testing.assert_allclose(before, _hand_energy(ds.images), rtol=1e-5)
    np.testing.assert_allclose(after, want_after, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(drop, before - after)
    order = sorted(range(23), key=lambda i: (-drop[i], i))
    assert [int(row["id"]) for row in rows] == order
    m = ds.labels == ds.labels[4]
    assert float(by_id[4]["z_class"]) == pytest.approx(
        (drop[4] - drop[m].mean()) / drop[m].std(), rel=1e-12)
    rec = json.loads((tmp_path / "whole" / SCAN_JSON).read_text())
    assert rec["score"] == "drop" and rec["chain"]["ebm"]["steps"] == 3
    assert rec["top"][0]["drop"] == pytest.approx(drop[order[0]], rel=1e-12)
    assert r is not None and r.table.score == "drop"

    _killed_after_two_shards(monkeypatch,
                             lambda: scan_dataset(ds, p, tmp_path / "o", chain=chain, **kw))
    scan_dataset(ds, p, tmp_path / "o", chain=chain, resume=True, **kw)
    assert (tmp_path / "o" / SCAN_TABLE).read_bytes() == want
    # the plain scan is another configuration: not resumed from the chained pieces
    with pytest.raises(UsageError, match="different configuration"):
        scan_dataset(ds, p, tmp_path / "o", resume=True, **kw)
    with pytest.raises(UsageError, match="chain"):
        scan_dataset(ds, p, tmp_path / "x", chain=energy_purifier(Quadratic(), "cpu",
                                                                  ebm_steps=2), **kw)  # fmt: skip
