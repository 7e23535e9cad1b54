"""Detection quality of the energy score (issue 25 item 3): AUC, the poisons in the top shares
and filt's precision, against hand computations, scipy's Mann-Whitney U, and a set with
planted high-energy images scored by a model whose energy is known."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from torch import nn

from puregen_fast.data.datasets import Dataset
from puregen_fast.eval.detection import detection, format_detection, roc_auc, top_share
from puregen_fast.scan import energy_purifier, scan_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auc_by_hand_with_ties():
    s = np.array([0.1, 0.4, 0.4, 0.9, 0.2])
    pos = np.array([False, True, False, True, False])
    # pairs (poison, clean): 0.4>0.1, 0.4=0.4 (half), 0.4>0.2, 0.9 beats all three: 5.5 of 6
    assert roc_auc(s, pos) == pytest.approx(5.5 / 6)
    assert roc_auc(s, np.zeros(5, bool)) is None and roc_auc(s, np.ones(5, bool)) is None
    assert roc_auc(-s, pos) == pytest.approx(0.5 / 6)


def test_auc_equals_scipys_mann_whitney():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)  # many ties
    pos = rng.random(300) < 0.2
    u = mannwhitneyu(s[pos], s[~pos]).statistic
    assert roc_auc(s, pos) == pytest.approx(u / (pos.sum() * (~pos).sum()), rel=1e-12)


def test_top_shares_and_filt_precision_by_hand():
    s = np.arange(100, dtype=float)[::-1].copy()  # image i scores 99 - i: rank i + 1
    poison = [0, 2, 30, 99]  # ranks 1, 3, 31, 100
    d = detection(s, poison, filter_frac=0.25)
    # clean images below each poison (ids 0, 2, 30, 99): 96 (all), 95 (ids 3-98 but 30),
    # 68 (ids 31-98), 0; of 4 x 96 pairs
    assert d["num_poisons"] == 4 and d["auc"] == pytest.approx((96 + 95 + 68 + 0) / (4 * 96))
    by = {t["frac"]: t for t in d["top"]}
    assert (by[0.01]["k"], by[0.01]["poisons"]) == (1, 1)
    assert (by[0.05]["k"], by[0.05]["poisons"], by[0.05]["recall"]) == (5, 2, 0.5)
    assert (by[0.1]["k"], by[0.1]["poisons"], by[0.1]["precision"]) == (10, 2, 0.2)
    # filt's cut at 0.25: the 0.75 quantile of 0..99 is 74.25, so ids 0..24 (25 images)
    assert d["filt"]["selected"] == 25 and d["filt"]["poisons"] == 2
    assert d["filt"]["precision"] == 2 / 25 and d["filt"]["recall"] == 0.5
    clean = np.delete(s, poison)
    assert d["poison_z_vs_clean"] == pytest.approx((s[poison].mean() - clean.mean()) / clean.std())
    # ties at the edge of a share go to the lower id, as scan ranks
    assert top_share(np.zeros(10), np.eye(10, dtype=bool)[0], 0.1)["poisons"] == 1
    assert top_share(np.zeros(10), np.eye(10, dtype=bool)[1], 0.1)["poisons"] == 0
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        detection(s, [100])
    table = format_detection([("narcissus, target 2", d)])
    assert "| narcissus, target 2 | 4 of 100 |" in table and "2 of 5 (50.0% of poisons)" in table


class Quadratic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * x).flatten(1).mean(1)


def test_planted_poisons_are_found_through_scan(tmp_path):
    """Images far from the data (saturated noise among near-grey images) under E = mean(x^2):
    every planted image outranks every clean one, so AUC 1, the top 1% and 5% are all poisons,
    and filt at 0.05 selects exactly them."""
    rng = np.random.default_rng(1)
    x = rng.integers(100, 156, (200, 8, 8, 3), dtype=np.uint8)
    planted = rng.choice(200, 10, replace=False)
    x[planted] = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    ds = Dataset("npz", "train", x, np.arange(200) % 4, list("abcd"), "memory")
    r = scan_dataset(ds, energy_purifier(Quadratic(), "cpu"), tmp_path / "o", batch_size=64,
                     quiet=True)  # fmt: skip
    d = detection(r.table.energies, planted, filter_frac=0.05)
    hand = ((x.astype(np.float64) / 255 * 2 - 1) ** 2).mean(axis=(1, 2, 3))
    assert hand[planted].min() > np.delete(hand, planted).max()  # the premise, by hand
    assert d["auc"] == 1.0
    assert [t["poisons"] for t in d["top"]] == [2, 10, 10]
    assert [t["k"] for t in d["top"]] == [2, 10, 20]
    assert d["filt"]["selected"] == 10 and d["filt"]["precision"] == 1.0
    assert set(np.flatnonzero(r.table.rank <= 10)) == set(planted.tolist())


def test_eval_experiment_reports_detection_where_the_poisons_are_known(tmp_path, capsys):
    """`eval experiment` scans the poisoned training set with the defenses' EBM and reports
    what `detection` gives on scan's energies and the poisoned set's indices; the scan folder
    and detection.png are written, and the table is printed."""
    import json

    from PIL import Image

    import puregen_fast as pg
    from puregen_fast.cli.main import main

    pytest.importorskip("skimage")
    from puregen_fast.eval.photos import make_photo_sets, write_photo_sets

    classes = ("hubble_deep_field", "immunohistochemistry", "retina")
    sets = make_photo_sets(size=16, train_per_class=12, test_per_class=4, heldout_per_class=1,
                           classes=classes)  # fmt: skip
    paths = write_photo_sets(tmp_path / "photos", sets)
    trig = np.zeros((1, 3, 16, 16), np.float32)
    trig[0, :, ::2, ::2] = 0.5
    np.save(tmp_path / "trigger.npy", trig)
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), tmp_path / "ebm")
    out = tmp_path / "exp"
    argv = ["eval", "experiment", "--dataset", "npz", "--data-dir", str(paths["train"]),
            "--test-dataset", "npz", "--test-data-dir", str(paths["test"]),
            "--trigger", str(tmp_path / "trigger.npy"), "--target-class", "1", "--count", "6",
            "--defenses", "ebm", "--ebm", str(tmp_path / "ebm"), "--ebm-steps", "1",
            "--filter-frac", "0.25", "--purify-batch-size", "16", "--backend", "reference",
            "--classifier", "airbench:widths=8/8/8,steps=4,batch_size=16", "--seeds", "0",
            "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    [d] = res["detection"]
    assert d["target"] == 1 and d["ebm"] == f"--ebm {tmp_path / 'ebm'}"
    with np.load(next(out.glob("poison-*/poisoned.npz"))) as z:
        idx = z["poison_idx"]
    rows = list(csv.DictReader(io.StringIO((Path(d["scan"]) / "scan.csv").read_text())))
    e = np.zeros(len(rows))
    for r in rows:
        e[int(r["id"])] = float(r["energy"])
    want = detection(e, idx, filter_frac=0.25)
    assert {k: d[k] for k in want} == want and d["num_poisons"] == 6
    assert "Detection by EBM energy" in printed and "| target 1, --ebm" in printed
    with Image.open(out / "detection.png") as im:
        assert im.format == "PNG"


def test_the_baseline_scores_by_hand():
    """The trivial scores an energy must beat (issue 25 item 5): a random ranking, the distance
    to the class mean, the JPEG re-encoding error."""
    from puregen_fast.eval.detection import BASELINES, class_mean_distance, jpeg_error
    from puregen_fast.reference import jpeg

    rng = np.random.default_rng(0)
    x = np.full((6, 8, 8, 3), 100, np.uint8)
    x[2] += rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)  # one odd image in class 0
    y = np.array([0, 0, 0, 1, 1, 1])
    d = class_mean_distance(x, y)
    m = x[:3].astype(float).mean(0)
    want = np.sqrt(((x[:3] - m) ** 2).reshape(3, -1).mean(1))
    assert np.allclose(d[:3], want) and np.allclose(d[3:], 0) and d.argmax() == 2
    e = jpeg_error(x, y, 30)
    j = jpeg(x, 30).astype(float) - x
    assert np.allclose(e, np.sqrt((j.reshape(6, -1) ** 2).mean(1))) and e.argmax() == 2
    r = BASELINES["random"](x, y, seed=1)
    assert r.shape == (6,) and np.array_equal(r, BASELINES["random"](x, y, seed=1))
