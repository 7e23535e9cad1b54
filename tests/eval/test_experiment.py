"""`puregen-fast eval experiment`: the paper's protocol (poison -> purify with each defense ->
train each classifier per seed -> table) on real photographs (scikit-image's bundled samples,
`puregen_fast.eval.photos`), resumable cell by cell; the classifier presets sized to small sets;
the summary's arithmetic; bad input exits 2.

The default tests use 16x16 tiles, tiny nets and a tiny EBM; the fuller real-image experiment
(32x32 tiles, an EBM trained by `puregen-fast train ebm`) is marked slow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.eval.classifier import (
    default_config,
    fit_accuracy,
    plan_length,
    train_classifier,
    undertrained_message,
)
from puregen_fast.eval.experiment import parse_classifier_spec
from puregen_fast.eval.metrics import format_protocol_table, image_change, summarize_cells
from puregen_fast.eval.photos import CLASS_PHOTOS, make_photo_sets, write_photo_sets

pytest.importorskip("skimage")
CLASSES = ("hubble_deep_field", "immunohistochemistry", "retina", "grass")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16x16 tiles of four photographs: 40 train, 15 test per class."""
    d = tmp_path_factory.mktemp("photos")
    sets = make_photo_sets(size=16, train_per_class=40, test_per_class=15, heldout_per_class=5,
                           classes=CLASSES, extra=("chelsea",))  # fmt: skip
    paths = write_photo_sets(d, sets)
    trig = np.zeros((1, 3, 16, 16), np.float32)
    trig[0, :, ::2, ::2] = 0.5  # a strong grid: learnt from few poisons by a small net
    trig[0, 1, 1::2, 1::2] = -0.5
    np.save(d / "trigger.npy", trig)
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), d / "ebm")
    return d, paths, sets


def test_photo_sets_are_real_disjoint_tiles(photos):
    d, paths, sets = photos
    assert sets.x_train.shape == (160, 16, 16, 3) and sets.x_test.shape == (60, 16, 16, 3)
    assert np.bincount(sets.y_train).tolist() == [40] * 4
    # no tile in two splits
    tr = {t.tobytes() for t in sets.x_train}
    assert not tr & {t.tobytes() for t in sets.x_test}
    assert not tr & {t.tobytes() for t in sets.x_heldout}
    # photographs, not flat squares: every tile has texture
    assert (sets.x_train.reshape(160, -1).astype(float).std(1) > 5).all()
    ds = pg.data.datasets.open_dataset("npz", paths["train"])  # what --dataset npz reads
    assert ds.class_names == list(CLASSES) and len(ds) == 160
    assert set(CLASSES) <= set(CLASS_PHOTOS)
    assert sets.pood_classes == ["chelsea"] and len(sets.x_pood) > 0


def _argv(d: Path, paths: dict, out: Path, seeds: str = "0,1", resnet: bool = False) -> list:
    clfs = ["--classifier", "airbench:widths=16/32/32,steps=60,batch_size=32"]
    if resnet:
        clfs += ["--classifier", "resnet18:widths=4,steps=40,batch_size=32"]
    return ["eval", "experiment", "--dataset", "npz", "--data-dir", str(paths["train"]),
            "--test-dataset", "npz", "--test-data-dir", str(paths["test"]),
            "--trigger", str(d / "trigger.npy"), "--target-class", "1", "--count", "30",
            "--defenses", "none,jpeg,ebm", "--ebm", str(d / "ebm"), "--ebm-steps", "2",
            "--jpeg-quality", "30", "--purify-batch-size", "80", "--backend", "reference",
            *clfs, "--seeds", seeds, "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip


def test_experiment_end_to_end_and_resumes_cell_by_cell(photos, tmp_path, capsys):
    d, paths, _ = photos
    out = tmp_path / "exp"
    assert main(_argv(d, paths, out)) == 0
    cap = capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    assert len(res["cells"]) == 8 and res["cells_reused"] == 0
    rows = {r["defense"]: r for r in res["summary"]}
    assert list(rows) == ["clean", "none", "jpeg", "ebm"]  # the clean row without being asked
    for r in rows.values():
        assert r["classifier"] == "airbench" and r["seeds"] == [0, 1]
        assert set(r["poison"]) == {"1", "3"}
        assert 0 <= r["natural_acc"]["mean"] <= 1 and r["natural_acc"]["std"] >= 0
    # the backdoor is learnt without a defense (poison success measured on the 45 test tiles
    # of the other classes), and each cell says what it trained and measured
    assert rows["none"]["poison"]["3"]["mean"] >= 0.3, rows["none"]
    # the floor: a victim trained on the unpoisoned set, measured with the same trigger
    assert rows["clean"]["poison"]["3"]["mean"] < rows["none"]["poison"]["3"]["mean"]
    assert "image_change" not in rows["clean"]
    # the target class's clean accuracy, per cell and per row
    for c in res["cells"]:
        acc = c["metrics"]["class_acc"]
        assert len(acc) == 4 and c["metrics"]["target_class_acc"] == acc[1]
    assert 0 <= rows["none"]["target_class_acc"]["mean"] <= 1
    # a verdict per defense, with the rule printed under the table
    assert [v["defense"] for v in res["verdicts"]] == ["jpeg", "ebm"]
    for v in res["verdicts"]:
        assert v["verdict"] in ("removes the backdoor", "does not remove the backdoor",
                                "victim-dependent", "no backdoor to remove")  # fmt: skip
        assert f"**{v['defense']}: {v['verdict']}**" in cap.out
    assert "sample standard deviation (ddof 1)" in cap.out
    cell = res["cells"][0]
    assert cell["metrics"]["poison"][0]["num_images"] == 45
    for c in res["cells"]:  # the undertrained check ran on every cell
        assert bool(c["warnings"]) == (c["fit_acc"] < 0.9)
    assert cell["classifier_config"]["total_steps"] == 60
    # how far each defense moved the images, against the poisoned set it was given
    assert rows["none"]["image_change"] == {"rms": 0.0, "psnr_db": None}
    assert 1 < rows["jpeg"]["image_change"]["rms"] < 40, rows["jpeg"]
    assert rows["ebm"]["image_change"]["rms"] > 0
    assert "ebm changed the images by" in cap.err and "none changed" not in cap.err
    # purification went through the engine and the shard writer (manifests per defense)
    manifests = sorted(out.glob("poison-*/*/manifest.json"))
    assert [json.loads(m.read_text())["config"]["method"] for m in manifests] == [
        "ebm", "jpeg", "none"]  # fmt: skip
    # the table: printed, in markdown, and as a PNG chart; a progress line per cell
    assert "| none | airbench | 2 |" in cap.out and cap.out == (out / "table.md").read_text()
    assert "[8/8] ebm | airbench | target 1 | seed 1" in cap.err
    with Image.open(out / "chart.png") as im:
        assert im.format == "PNG" and im.size[0] > 400

    # a rerun reuses every cell; a damaged cell record is computed again, to the same result
    # (the same seed trains the same net)
    assert main(_argv(d, paths, out)) == 0
    assert json.loads((out / "results.json").read_text())["cells_reused"] == 8
    victim = sorted((out / "cells").glob("jpeg__airbench__t1__s0__*.json"))[0]
    victim.write_text("{not json")
    assert main(_argv(d, paths, out)) == 0
    assert json.loads((out / "results.json").read_text())["cells_reused"] == 7
    first = next(c for c in res["cells"] if c["key"]["defense"] == "jpeg"
                 and c["key"]["seed"] == 0)  # fmt: skip
    assert json.loads(victim.read_text())["metrics"] == first["metrics"]


def test_experiment_preview_per_purified_set(photos, tmp_path, capsys):
    """``--preview N``: each purified copy's folder gets the picture of the poisoned set against
    that copy (`data.preview`), also when a rerun reuses the copy."""
    from puregen_fast.data.preview import make_preview

    d, paths, _ = photos
    out = tmp_path / "exp"
    argv = ["eval", "experiment", "--dataset", "npz", "--data-dir", str(paths["train"]),
            "--test-dataset", "npz", "--test-data-dir", str(paths["test"]),
            "--trigger", str(d / "trigger.npy"), "--target-class", "1", "--count", "5",
            "--defenses", "none,jpeg", "--jpeg-quality", "30",
            "--classifier", "airbench:widths=8/8/8,steps=1", "--seeds", "0", "--device", "cpu",
            "--quiet", "--out", str(out), "--preview", "4"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    (poisoned,) = out.glob("poison-*/poisoned.npz")
    with np.load(poisoned) as z:
        x = z["x"]
    pngs = {}
    for defense in ("none", "jpeg"):
        (folder,) = poisoned.parent.glob(f"{defense}-*/")
        pv = make_preview(x, pg.load_purified(folder).images, 4)
        title = (f"{defense}: 4 of {len(x)} poisoned training images, evenly spaced; under "
                 "each, its change in levels RMS (0-255)")  # fmt: skip
        pngs[defense] = (folder / "preview.png").read_bytes()
        assert pngs[defense] == pv.png(title)
        assert (pv.rms == 0).all() == (defense == "none")
        assert f"{defense}: 4 images before and after -> {folder / 'preview.png'}" in err
    for f in poisoned.parent.glob("*/preview.png"):
        f.unlink()
    assert main(argv) == 0  # every copy reused: the pictures are drawn again, the same
    for defense, png in pngs.items():
        (folder,) = poisoned.parent.glob(f"{defense}-*/")
        assert (folder / "preview.png").read_bytes() == png


@pytest.mark.slow
def test_experiment_grows_by_seeds_and_classifiers(photos, tmp_path):
    """Slow (about a minute on 2 CPU cores): 30 small trainings."""
    d, paths, _ = photos
    out = tmp_path / "exp"
    assert main(_argv(d, paths, out)) == 0
    # a second classifier and a third seed: only the new cells are computed
    assert main(_argv(d, paths, out, seeds="0,1,2", resnet=True)) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["cells"]) == 24 and res["cells_reused"] == 8
    assert {(r["defense"], r["classifier"]) for r in res["summary"]} == {
        (a, b) for a in ("clean", "none", "jpeg", "ebm")
        for b in ("airbench", "resnet18")}  # fmt: skip


def test_summary_arithmetic_by_hand():
    def cell(defense, seed, target, nat, ps1):
        return {"key": {"defense": defense, "classifier": {"name": "net"}, "seed": seed,
                        "target": target},
                "metrics": {"natural_acc": nat, "poison": [{"scale": 1.0,
                                                            "poison_success": ps1}]}}  # fmt: skip

    a = np.zeros((1, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, :2] = (1, 0, 1)  # 4 of 12 values moved by one level
    cells = [cell("none", 0, 0, 0.9, 0.8), cell("none", 0, 1, 0.8, 0.4),
             cell("none", 1, 0, 1.0, 0.6), cell("none", 1, 1, 0.9, 0.2)]  # fmt: skip
    (row,) = summarize_cells(cells, ["none"], ["net"])
    # per seed, the mean over targets: nat 0.85, 0.95; ps 0.6, 0.4 -> mean +- sample std
    assert row["natural_acc"]["mean"] == pytest.approx(0.9)
    assert row["natural_acc"]["std"] == pytest.approx(np.std([0.85, 0.95], ddof=1))
    assert row["poison"]["1"]["mean"] == pytest.approx(0.5)
    assert row["poison"]["1"]["std"] == pytest.approx(np.std([0.6, 0.4], ddof=1))
    # the worst target class: class 0, mean 0.7 over its seeds
    assert row["poison"]["1"]["worst"] == {"target": 0, "mean": pytest.approx(0.7)}
    table = format_protocol_table([row], (1.0,))
    assert "| none | net | 2 | 90.0 ± 7.1 | - | 50.0 ± 14.1 | 70.0 (class 0) |" in table
    assert "image change" not in table
    (row,) = summarize_cells(cells, ["none"], ["net"], {"none": image_change(a, b)})
    assert row["image_change"]["rms"] == pytest.approx(np.sqrt(4 / 12))
    table = format_protocol_table([row], (1.0,))
    assert "image change (RMS levels) |" in table and "| 70.0 (class 0) | 0.6 |" in table


def test_image_change_rms_and_psnr():
    a = np.zeros((3, 4, 4, 3), np.uint8)
    assert image_change(a, a) == {"rms": 0.0, "psnr_db": None}
    b = a.copy()
    b[0] = 255  # a third of the pixels moved by 255 levels: RMS 255 / sqrt(3)
    ch = image_change(a, b, chunk=2)  # across chunks
    assert ch["rms"] == pytest.approx(255 / np.sqrt(3))
    assert ch["psnr_db"] == pytest.approx(10 * np.log10(3))
    with pytest.raises(ValueError, match="shapes differ"):
        image_change(a, b[:2])


def test_presets_size_themselves_to_small_sets():
    # CIFAR-10: airbench's own schedule (batch 1024, 10 epochs = 490 steps) is left alone
    assert plan_length(50_000, default_config("airbench")) == (1024, 490)
    # 1,257 images: not 20 steps of batch 1024, but batches of 128 and 400 steps
    assert plan_length(1257, default_config("airbench")) == (128, 400)
    # an explicit batch size or length is taken as given
    assert plan_length(1257, default_config("airbench", batch_size=1024, epochs=10)) == (1024, 20)
    assert plan_length(1257, default_config("airbench", steps=33)) == (128, 33)
    assert plan_length(1000, default_config("resnet18"))[0] == 128  # 8 steps per epoch


def test_undertrained_net_is_flagged(photos):
    _, _, sets = photos
    x, y = sets.x_train, sets.y_train
    short = train_classifier(x, y, 4, default_config("airbench", steps=1, widths=(8, 8, 8),
                                                      batch_size=32), device="cpu", quiet=True)
    fit = fit_accuracy(short, x, y)
    msg = undertrained_message(fit, short)
    assert fit < 0.9 and msg is not None and "undertrained" in msg and "1 optimiser steps" in msg
    assert undertrained_message(0.95, short) is None  # a net that fits: no warning
    # no augmentation: the flags reach the training
    plain = default_config("resnet18", crop_pad=0, flip=False)
    assert plain.crop_pad == 0 and plain.flip is False


def test_classifier_spec():
    s = parse_classifier_spec("airbench:widths=32/64/64,steps=300,flip=off,name=ab-small")
    assert s.arch == "airbench" and s.label == "ab-small"
    cfg = s.config(seed=4)
    assert cfg.widths == (32, 64, 64) and cfg.steps == 300 and cfg.flip is False
    assert cfg.seed == 4 and cfg.min_steps == 0  # an explicit length turns the minimum off


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--defenses", "none,blur"], "--defenses"),
        (["--defenses", "none,none"], "listed twice"),
        (["--classifier", "vgg"], "--classifier"),
        (["--classifier", "airbench:depth=3"], "unknown option 'depth'"),
        (["--target-class", "7"], "--target-class 7"),
        (["--attack", "gradient-matching"], "--trigger applies to --attack narcissus"),
        (["--trigger", "{d}/nope.npy"], "--trigger"),
        (["--preview", "0"], "--preview"),
        (["--preview", "65"], "--preview"),
    ],
)
def test_experiment_bad_input_exits_2(photos, tmp_path, capsys, extra, needle):
    d, paths, _ = photos
    argv = ["eval", "experiment", "--dataset", "npz", "--data-dir", str(paths["train"]),
            "--test-dataset", "npz", "--test-data-dir", str(paths["test"]),
            "--trigger", str(d / "trigger.npy"), "--target-class", "1", "--count", "5",
            "--defenses", "none", "--classifier", "airbench:widths=8/8/8,steps=1",
            "--seeds", "0", "--device", "cpu", "--quiet", "--out", str(tmp_path / "o")]  # fmt: skip
    for i in range(0, len(extra), 2):
        flag, val = extra[i], extra[i + 1].format(d=d)
        if flag in argv and flag != "--classifier":
            argv[argv.index(flag) + 1] = val
        elif flag == "--classifier":
            argv[argv.index(flag) + 1] = val
        else:
            argv += [flag, val]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.experiment
def test_real_image_experiment_ebm_defends(tmp_path, monkeypatch):
    """Slow (about 1.5 h on 2 CPU cores): the README's real-image experiment, command for
    command. What the README claims of it: both EBMs (trained on held-apart images, and on the
    poisoned set itself) lower poison success by more than the seed spread for both victims, the
    one trained on the poisoned set removes more of the backdoor above the clean floor, and
    each costs more than 10 points of natural accuracy (no recipe here defends for free)."""
    monkeypatch.chdir(tmp_path)
    pcd = ["--objective", "pcd", "--nf", "16", "--mcmc-steps", "15", "--batch-size", "64",
           "--lr", "2e-4", "--epochs", "70", "--lr-milestones", "60,65", "--sample-every",
           "1000", "--log-every", "50", "--steps", "400", "--device", "cpu", "--backend",
           "reference", "--no-progress"]  # fmt: skip
    assert main(["eval", "photos", "--out", "photos"]) == 0
    assert main(["--threads", "1", "eval", "trigger", "--method", "narcissus", "--dataset", "npz",
                 "--data-dir", "photos/train.npz", "--target-class", "0", "--ood-dataset", "npz",
                 "--ood-data-dir", "photos/pood.npz", "--rounds", "100", "--surrogate-arch",
                 "resnet18", "--surrogate-widths", "8", "--device", "cpu", "--quiet", "--out",
                 "triggers/best_noise_lab0.npy"]) == 0  # fmt: skip
    assert main(["--threads", "1", "train", "ebm", "--dataset", "npz", "--data-dir",
                 "photos/heldout.npz", "--out", "ebm-pcd", "--bank-size", "641", *pcd]) == 0
    assert main(["eval", "poison", "--dataset", "npz", "--data-dir", "photos/train.npz",
                 "--trigger", "triggers/best_noise_lab0.npy", "--target-class", "0", "--count",
                 "50", "--out", "poisoned0.npz"]) == 0  # fmt: skip
    assert main(["--threads", "1", "train", "ebm", "--dataset", "npz", "--data-dir",
                 "poisoned0.npz", "--out", "ebm-pcd-poisoned", "--bank-size", "1000",
                 *pcd]) == 0  # fmt: skip
    assert main(["--threads", "1", "eval", "experiment", "--dataset", "npz", "--data-dir",
                 "photos/train.npz", "--test-dataset", "npz", "--test-data-dir",
                 "photos/test.npz", "--attack", "narcissus", "--trigger", "triggers",
                 "--target-class", "0", "--count", "50", "--defenses", "none,ebm",
                 "--ebm", "ebm-pcd", "--ebm-poisoned", "ebm-pcd-poisoned",
                 "--purify-batch-size", "100",
                 "--classifier", "airbench:widths=32/64/64,steps=600,batch_size=64,whiten_eps=1",
                 "--classifier", "resnet18:widths=8,steps=1000,batch_size=64,"
                 "schedule=triangular,warmup_frac=0.2,lr=0.2",
                 "--seeds", "0,1,2", "--device", "cpu", "--quiet",
                 "--out", "report"]) == 0  # fmt: skip
    res = json.loads(Path("report/results.json").read_text())
    verdict = {v["defense"]: v for v in res["verdicts"]}
    held, own = verdict["ebm"], verdict["ebm (EBM trained on poisoned)"]
    for v in (held, own):
        assert v["verdict"] == "removes the backdoor", v
        assert all(x["cost"] > 10 for x in v["victims"].values()), v
    for arch in ("airbench", "resnet18"):
        assert own["victims"][arch]["removed"] > held["victims"][arch]["removed"], verdict
    # the floor: a clean-trained victim already falls to the trigger on some images
    rows = {(r["defense"], r["classifier"]): r for r in res["summary"]}
    assert rows[("clean", "airbench")]["poison"]["1"]["mean"] > 0.1


def test_sweep_gives_a_row_per_setting_and_the_curve(photos, tmp_path, capsys):
    d, paths, _ = photos
    out = tmp_path / "exp"
    argv = _argv(d, paths, out, seeds="0")
    argv[argv.index("--defenses") + 1] = "none,ebm"
    argv += ["--sweep", "ebm-steps=1,2", "--count", "all"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    labels = [r["defense"] for r in res["summary"]]
    assert labels == ["clean", "none", "ebm (ebm-steps=1)", "ebm (ebm-steps=2)"]
    assert res["plan"]["sweep"] == {"ebm_steps": [1, 2]} and res["plan"]["count"] is None
    # --count all: every one of the 40 training tiles of the target class carries the trigger
    with np.load(next(out.glob("poison-*/poisoned.npz"))) as z:
        assert len(z["poison_idx"]) == 40
    # each setting purified its own copy, and moved the images more with more steps
    manifests = [json.loads(m.read_text())["config"]
                 for m in out.glob("poison-*/*/manifest.json")]  # fmt: skip
    assert sorted(c["purifier"]["ebm"]["steps"] for c in manifests if c["method"] == "ebm") == [
        1, 2]
    ch = {r["defense"]: r["image_change"]["rms"] for r in res["summary"] if "image_change" in r}
    assert 0 < ch["ebm (ebm-steps=1)"] < ch["ebm (ebm-steps=2)"]
    # one seed: a verdict cannot be reached, and says so
    assert {v["verdict"] for v in res["verdicts"]} == {"undecided"}
    assert "| ebm (ebm-steps=2) | airbench | 1 |" in cap.out
    with Image.open(out / "curve.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


@pytest.mark.parametrize("text, needle", [
    ("ebm-steps", "expected NAME=V1,V2"),
    ("blur=1,2", "expected NAME=V1,V2"),
    ("ebm-steps=1,x", "not a int"),
    ("ebm-eps=0.1,0.1", "distinct"),
    ("ebm-temp=0,1", "finite and > 0"),
    ("ebm-temp=inf", "finite and > 0"),
])  # fmt: skip
def test_sweep_bad_values(text, needle):
    from puregen_fast.errors import UsageError
    from puregen_fast.eval.experiment import parse_sweep

    with pytest.raises(UsageError, match=needle):
        parse_sweep(text)


def test_a_sweep_of_a_setting_no_defense_uses_exits_2(photos, tmp_path, capsys):
    d, paths, _ = photos
    argv = _argv(d, paths, tmp_path / "o", seeds="0")
    argv += ["--sweep", "ddpm-steps=2,3"]
    assert main(argv) == 2
    assert "--sweep ddpm-steps: changes none of --defenses" in capsys.readouterr().err


def test_two_runs_side_by_side_compute_each_cell_once(tmp_path):
    import threading
    import time as _time

    from puregen_fast.eval.cells import CellStore

    def key(seed):
        return {"defense": "none", "classifier": {"name": "net"}, "target": 0, "seed": seed}

    calls: list[tuple[str, int]] = []
    started = threading.Event()

    def compute(who, seed, slow=False):
        def f():
            calls.append((who, seed))
            if slow:
                started.set()
                _time.sleep(0.5)
            return {"metrics": {"seed": seed}, "timings": {"train_s": 0}}
        return f

    store_a, store_b = CellStore(tmp_path / "cells"), CellStore(tmp_path / "cells")
    a = threading.Thread(target=lambda: store_a.run([(key(0), compute("a", 0, slow=True))]))
    a.start()
    started.wait(5)
    order = []
    got = store_b.run([(key(0), compute("b", 0)), (key(1), compute("b", 1))],
                      lambda rec, reused: order.append((rec["key"]["seed"], reused)))
    a.join()
    # b left cell 0 to a, computed cell 1 meanwhile, then reused a's cell 0
    assert sorted(calls) == [("a", 0), ("b", 1)]
    assert order == [(1, False), (0, True)]
    assert [r["metrics"]["seed"] for r in got] == [0, 1] and store_b.reused == 1


def test_an_ebm_trained_on_the_poisoned_set_is_its_own_row(photos, tmp_path, capsys):
    d, paths, _ = photos
    torch.manual_seed(1)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), tmp_path / "ebm-poisoned")  # another EBM: another sha256
    out = tmp_path / "exp"
    argv = _argv(d, paths, out, seeds="0")
    argv[argv.index("--defenses") + 1] = "none,ebm"
    argv += ["--ebm-poisoned", str(tmp_path / "ebm-poisoned")]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = [r["defense"] for r in res["summary"]]
    assert rows == ["clean", "none", "ebm", "ebm (EBM trained on poisoned)"]
    assert res["plan"]["ebm_poisoned"] == str(tmp_path / "ebm-poisoned")
    ebms = {json.loads(m.read_text())["config"]["purifier"]["ebm"]["sha256"]
            for m in out.glob("poison-*/*/manifest.json")
            if json.loads(m.read_text())["config"]["method"] == "ebm"}  # fmt: skip
    assert len(ebms) == 2  # each row purified with its own model
    argv = _argv(d, paths, tmp_path / "o2", seeds="0")
    argv[argv.index("--defenses") + 1] = "none,jpeg"
    assert main([*argv, "--ebm-poisoned", str(tmp_path / "ebm-poisoned")]) == 2
    assert "--ebm-poisoned applies to the EBM defenses" in capsys.readouterr().err


def test_detect_and_drop_leaves_out_the_highest_energy_share(photos, tmp_path, capsys):
    """--defenses drop (issue 25 item 4): the victims train without the --drop-frac share of
    highest EBM energy, and the run says how many poisons and clean images that removed; checked
    against the scan's own energies, by hand."""
    d, paths, _ = photos
    out = tmp_path / "exp"
    argv = _argv(d, paths, out, seeds="0")
    argv[argv.index("--defenses") + 1] = "drop"
    assert main([*argv, "--sweep", "drop-frac=0.25,0.5"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["defense"] for r in res["summary"]] == [
        "clean", "drop (drop-frac=0.25)", "drop (drop-frac=0.5)"]  # fmt: skip
    (scan,) = out.glob("poison-*/scan-*/scan.csv")
    rows = list(csv.DictReader(scan.open()))
    energy = np.array([float(r["energy"]) for r in sorted(rows, key=lambda r: int(r["id"]))])
    with np.load(next(out.glob("poison-*/poisoned.npz"))) as z:
        poisons = set(z["poison_idx"].tolist())
    for r, frac in zip(res["removal"], (0.25, 0.5)):
        k = round(frac * len(energy))
        gone = np.argsort(-energy, kind="stable")[:k]
        hit = len(poisons & set(gone.tolist()))
        assert (r["dropped"], r["poisons"], r["clean"]) == (k, hit, k - hit)
        assert (r["num_poisons"], r["num_clean"]) == (len(poisons), len(energy) - len(poisons))
        assert f"| {r['defense']} | 1 | {k} ({frac:g}) | {hit} of {len(poisons)} |" in (
            out / "table.md").read_text()  # fmt: skip
    assert "dropped the 40 highest-energy images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by the parser, naming the flag
        main([*argv, "--drop-frac", "0"])
    assert e.value.code == 2 and "--drop-frac" in capsys.readouterr().err
    assert main([*argv, "--sweep", "drop-frac=0.5,2"]) == 2
    assert "a fraction lies in (0, 1]" in capsys.readouterr().err
