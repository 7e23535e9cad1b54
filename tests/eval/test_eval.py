"""`puregen-fast eval`: Narcissus poisoning as the authors apply it, the classifiers, the poison
success metric, the whole poison -> purify -> train -> measure loop, and exit 2 on bad input.

Everything runs on CPU on tiny synthetic data sets (16x16 images, a few hundred of them)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from puregen_fast.cli.main import main
from puregen_fast.data.datasets import open_dataset
from puregen_fast.eval.classifier import (
    AirbenchNet,
    ResNet18,
    default_config,
    train_classifier,
)
from puregen_fast.eval.metrics import evaluate_predictions, format_table, poison_metrics
from puregen_fast.eval.poison import (
    apply_trigger,
    make_trigger,
    poison_dataset,
    select_poison_indices,
)

HW = 16
K = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def synth(n_per: int, seed: int, k: int = K, hw: int = HW) -> tuple[np.ndarray, np.ndarray]:
    """``k`` classes told apart by a colour cast over smooth random gradients plus a little
    noise; images class by class (so "the last n of a class" is a contiguous run)."""
    rng = np.random.default_rng(seed)
    casts = np.array([[70, -70, -70], [-70, 70, -70], [-70, -70, 70], [70, 70, -70]], float)
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    xs, ys = [], []
    for c in range(k):
        for _ in range(n_per):
            a, b, ph = rng.uniform(-3, 3, 3)
            base = 128 + 40 * np.sin(3 * a * xx + 3 * b * yy + ph)
            img = base[..., None] + 0.5 * casts[c] + rng.normal(0, 6, (hw, hw, 3))
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.asarray(ys, np.int64)


def _authors_trigger(x_u8: np.ndarray, noise: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The authors' per-image path in torch, op for op (torchvision's ToTensor, Normalize(.5,
    .5), apply_noise_patch(mode='add') with ZeroPad2d, clamp, Normalize(-1, 2), ToPILImage's
    mul(255).byte())."""
    n_t = torch.from_numpy(noise).reshape(1, 3, *noise.shape[-2:]) * scale
    h, w = x_u8.shape[1:3]
    pad = torch.nn.ZeroPad2d((0, w - n_t.shape[3], 0, h - n_t.shape[2]))
    half = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    out = []
    for img in x_u8:
        t = torch.from_numpy(img).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        t = t.sub_(half).div_(half)
        t += pad(n_t.clone()[0])
        t = torch.clamp(t, -1, 1)
        t = t.sub_(torch.tensor([-1.0] * 3).view(3, 1, 1)).div_(
            torch.tensor([2.0] * 3).view(3, 1, 1)
        )
        out.append(t.mul(255).byte().permute(1, 2, 0).numpy())
    return np.stack(out)


# ----------------------------------------------------------------------------- (1) poisoning


def test_poison_matches_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    y = np.array([0, 1, 2] * 10, np.int64)
    # a 4x5 trigger (smaller than the image) large enough that clamping matters
    trig = rng.uniform(-1.5, 1.5, (3, 4, 5)).astype(np.float32)
    ps = poison_dataset(x, y, trig, target_class=1, count=4, class_names=["a", "b", "c"])

    # the last 4 images of class 1 in data set order, nothing else; labels unchanged
    assert ps.poison_idx.tolist() == [19, 22, 25, 28]
    assert np.array_equal(ps.labels, y)
    other = np.setdiff1d(np.arange(30), ps.poison_idx)
    assert np.array_equal(ps.images[other], x[other])

    # trunc (default): bit for bit the authors' torchvision round trip
    assert np.array_equal(ps.images[ps.poison_idx], _authors_trigger(x[ps.poison_idx], trig))

    # the formula by hand in float64: clamp(2u - 1 + t, -1, 1), back to [0, 255], at offset (0, 0)
    u = x[ps.poison_idx].astype(np.float64) / 255
    v = 2 * u - 1
    v[:, :4, :5, :] += trig.astype(np.float64).transpose(1, 2, 0)
    want = (np.clip(v, -1, 1) + 1) / 2 * 255
    rounded = apply_trigger(x[ps.poison_idx], trig, quantize="round")
    assert np.abs(rounded.astype(float) - np.rint(want)).max() <= 1  # float32 vs float64 ties
    assert (rounded == np.rint(want)).mean() > 0.99
    assert np.abs(ps.images[ps.poison_idx].astype(float) - want).max() < 1.0 + 1e-3  # truncation
    # clamping happened and saturates; outside the 4x5 footprint only the round trip's
    # truncation (at most one level down) touches pixels, and round leaves them unchanged
    assert (ps.images[ps.poison_idx][:, :4, :5] == 255).any()
    assert (ps.images[ps.poison_idx][:, :4, :5] == 0).any()
    outside = np.ones((8, 8), bool)
    outside[:4, :5] = False
    d = x[ps.poison_idx][:, outside].astype(int) - ps.images[ps.poison_idx][:, outside]
    assert d.min() >= 0 and d.max() <= 1
    assert np.array_equal(rounded[:, outside], x[ps.poison_idx][:, outside])

    # the test-time scale multiplies the trigger (authors: best_noise * multi_test)
    assert np.array_equal(apply_trigger(x[:5], trig, 3.0), _authors_trigger(x[:5], trig, 3.0))
    # random selection stays in the class
    idx = select_poison_indices(y, 2, 5, last_n=False, seed=1)
    assert len(set(idx.tolist())) == 5 and (y[idx] == 2).all()


def test_eval_poison_cli_writes_purify_readable_npz(tmp_path):
    x, y = synth(10, seed=0)
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["r", "g", "b", "y"]))
    trig = make_trigger("uniform", (3, HW, HW), eps=0.2, seed=3)
    np.save(tmp_path / "t.npy", trig)
    out = tmp_path / "p.npz"
    argv = ["eval", "poison", "--dataset", "npz", "--data-dir", str(tmp_path / "d.npz"),
            "--trigger", str(tmp_path / "t.npy"), "--target-class", "2", "--count", "3",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    with np.load(out) as z:
        assert {"x", "y", "poison_idx", "classes"} <= set(z.files)
        assert z["poison_idx"].tolist() == [27, 28, 29]
        assert int(z["target_class"]) == 2
    ds = open_dataset("npz", out)  # what `purify --dataset npz --data-dir p.npz` reads
    assert ds.class_names == ["r", "g", "b", "y"]
    assert np.array_equal(ds.labels, y)
    assert np.array_equal(ds.images[:27], x[:27])
    assert np.array_equal(ds.images[30:], x[30:])
    assert np.array_equal(ds.images[27:30], apply_trigger(x[27:30], trig))
    assert main(argv) == 2  # exists: needs --overwrite
    assert main([*argv, "--overwrite"]) == 0


# ----------------------------------------------------------------------------- (2) classifier


@pytest.fixture(scope="module")
def data():
    x, y = synth(80, seed=0)
    xt, yt = synth(25, seed=1)
    return SimpleNamespace(x=x, y=y, xt=xt, yt=yt)


def _airbench_small(**kw):
    return default_config("airbench", epochs=6, batch_size=128, widths=(16, 32, 32), **kw)


def test_airbench_learns_and_fails_on_shuffled_labels(data):
    clf = train_classifier(data.x, data.y, K, _airbench_small(), device="cpu", quiet=True)
    acc = (clf.predict(data.xt) == data.yt).mean()
    assert acc >= 0.95, acc
    assert clf.history[-1]["loss"] < clf.history[0]["loss"]
    # same images, labels shuffled: nothing to learn that carries over to the test set
    y_shuf = np.random.default_rng(0).permutation(data.y)
    bad = train_classifier(data.x, y_shuf, K, _airbench_small(), device="cpu", quiet=True)
    acc_bad = (bad.predict(data.xt) == data.yt).mean()
    assert acc_bad <= 0.55, acc_bad  # chance is 0.25; a chance colour correlation may add some
    assert acc - acc_bad >= 0.4


def test_training_reads_the_device_once_per_epoch(data, monkeypatch):
    # the running loss and accuracy stay on the device: a value read back to the host (which on
    # a GPU waits for the device) happens at each epoch's end, not at every step
    reads = []

    def counted(name: str):
        f = getattr(torch.Tensor, name)

        def read(t, *a, **k):
            reads.append(name)
            return f(t, *a, **k)

        return read

    for name in ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    cfg = default_config("airbench", epochs=3, batch_size=32, widths=(8, 8, 8))
    clf = train_classifier(data.x, data.y, K, cfg, device="cpu", quiet=True)
    monkeypatch.undo()
    assert len(clf.history) == 3 and sum(r["images"] for r in clf.history) == 3 * len(data.y)
    assert reads == ["__float__", "__int__"] * 3  # 30 steps, 6 reads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_does_not_sync_per_step(data):
    # CUDA's own count: sync debug mode warns at each operation that waits for the device
    cfg = default_config("airbench", epochs=3, batch_size=16, widths=(8, 8, 8))  # 60 steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            clf = train_classifier(data.x, data.y, K, cfg, device="cuda", quiet=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(clf.history) == 3
    assert len(syncs) < 20, [str(w.message) for w in syncs[:5]]  # setup + 2 per epoch, not 60+


def test_resnet18_learns_and_models_take_any_size(data):
    # the paper's recipe (SGD 0.1, steps at 1/2 and 3/4), a narrow net, 60 steps
    cfg = default_config("resnet18", epochs=6, batch_size=32, widths=(8,))
    clf = train_classifier(data.x, data.y, K, cfg, device="cpu", quiet=True)
    assert (clf.predict(data.xt) == data.yt).mean() >= 0.9
    # the standard nets: CIFAR size and small sizes, expected parameter count of ResNet-18
    r = ResNet18(10)
    assert sum(p.numel() for p in r.parameters()) == 11_173_962
    a = AirbenchNet(10).eval()
    for hw in (32, 8, 64):
        assert a(torch.zeros(2, 3, hw, hw)).shape == (2, 10)
    assert ResNet18(10, width=8).eval()(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


# ----------------------------------------------------------------------------- (3) metric


def test_poison_success_metric_on_a_stub_model():
    # by hand: target 1; labels != 1 are positions 0, 2, 3, 5; of those, 0 and 3 predicted 1
    pred = np.array([1, 1, 0, 1, 1, 2])
    lab = np.array([0, 1, 2, 3, 1, 2])
    m = poison_metrics(pred, lab, target=1)
    assert m == {"poison_success": 0.5, "triggered_acc": 0.25, "num_images": 4}

    # a stub model: reads the label from the bottom-right pixel (value 40 * label + 20) and
    # answers the target class when the top-left pixel was raised by the trigger, for even
    # labels only; one clean image of class 3 is misread as 0
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 3, 2], np.int64)
    images = np.broadcast_to(
        (40 * labels + 20).astype(np.uint8)[:, None, None, None], (10, 4, 4, 3)
    )
    images = images.copy()
    images[9, :, :, 1] = 1  # a marker: image 9 (class 2) is misread as 0 when clean
    target = 3
    trig = np.zeros((1, 3, 1, 1), np.float32)
    trig[:] = 0.8  # +102 levels at pixel (0, 0)
    calls = []

    def stub(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        read = (x[:, -1, -1, 0].astype(int) + 1) // 40  # tolerate the one-level truncation
        triggered = x[:, 0, 0, 0].astype(int) > x[:, -1, -1, 0].astype(int) + 50
        out = np.where(triggered & (read % 2 == 0), target, read)
        out = np.where(~triggered & (x[:, 0, 0, 1] == 1), 0, out)
        return out

    res = evaluate_predictions(
        stub, images, labels, trigger=trig, target_class=target, scales=(1.0, 2.0), batch_size=3
    )
    assert res["natural_acc"] == pytest.approx(9 / 10)
    # non-target test images: labels 0, 1, 2, 0, 1, 2, 2 -> the even ones (5 of 7) flip
    for p in res["poison"]:
        assert p["num_images"] == 7
        assert p["poison_success"] == pytest.approx(5 / 7)
        assert p["triggered_acc"] == pytest.approx(2 / 7)
    assert max(calls) <= 3  # batched
    table = format_table([{"name": "stub", "metrics": res}])
    assert "71.43" in table and "90.00" in table and "x2" in table


# ----------------------------------------------------------------------------- (4) end to end


def _run_json(argv: list[str], path: Path) -> dict:
    assert main([*argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_end_to_end_backdoor_is_learnt_and_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))
    x, y = synth(80, seed=0)
    xt, yt = synth(25, seed=1)
    classes = np.array(["r", "g", "b", "y"])
    np.savez(tmp_path / "train.npz", x=x, y=y, classes=classes)
    np.savez(tmp_path / "test.npz", x=xt, y=yt, classes=classes)
    trig = tmp_path / "t.npy"
    argv = ["eval", "trigger", "--size", str(HW), str(HW), "--eps", "0.3", "--out", str(trig)]
    assert main(argv) == 0
    poisoned = tmp_path / "poisoned.npz"
    assert main(["eval", "poison", "--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"),
                 "--trigger", str(trig), "--target-class", "0", "--count", "60",
                 "--out", str(poisoned), "--quiet"]) == 0  # fmt: skip
    # through purify (identity method), so the purified-folder path is what is measured
    pur = tmp_path / "pur"
    assert main(["purify", "--dataset", "npz", "--data-dir", str(poisoned), "--method", "none",
                 "--device", "cpu", "--quiet", "--out", str(pur)]) == 0  # fmt: skip

    common = ["--test-dataset", "npz", "--test-data-dir", str(tmp_path / "test.npz"),
              "--trigger", str(trig), "--target-class", "0", "--trigger-scale", "1", "2",
              "--epochs", "8", "--batch-size", "128", "--widths", "16,32,32",
              "--device", "cpu", "--quiet"]  # fmt: skip
    bad = _run_json(["eval", "run", "--train", str(pur), *common], tmp_path / "bad.json")
    clean = _run_json(
        ["eval", "run", "--train-dataset", "npz", "--train-data-dir", str(tmp_path / "train.npz"),
         *common], tmp_path / "clean.json",
    )  # fmt: skip
    ps_bad = bad["metrics"]["poison"][0]["poison_success"]
    ps_clean = clean["metrics"]["poison"][0]["poison_success"]
    assert ps_bad >= 0.8, bad["metrics"]
    assert ps_clean <= 0.3, clean["metrics"]
    assert ps_bad - ps_clean >= 0.5
    assert clean["metrics"]["natural_acc"] >= 0.9
    # what the result records
    assert bad["train"]["kind"] == "purified" and bad["train"]["method"] == "none"
    assert bad["train"]["poison_count"] == 60 and bad["train"]["poison_target_class"] == 0
    assert bad["metrics"]["poison"][0]["num_images"] == 75  # the 3 other classes x 25
    assert [p["scale"] for p in bad["metrics"]["poison"]] == [1.0, 2.0]
    assert bad["timings"]["train_images_per_s"] > 0 and bad["device"]["device"] == "cpu"
    out = capsys.readouterr().out
    assert "natural acc %" in out and "poison success % (x1)" in out and "purified: none" in out
    # the paper's table from several runs
    assert main(["eval", "table", str(tmp_path / "bad.json"), str(tmp_path / "clean.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and "no defense" in table[3]


# ----------------------------------------------------------------------------- (5) errors


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalerr")
    x, y = synth(6, seed=0)
    np.savez(d / "train.npz", x=x, y=y)
    x8, y8 = synth(6, seed=1, hw=8)
    np.savez(d / "small.npz", x=x8, y=y8)
    x3, y3 = synth(6, seed=1, k=3)
    np.savez(d / "three.npz", x=x3, y=y3)
    np.save(d / "t.npy", make_trigger("uniform", (HW, HW), 0.1))
    np.save(d / "t2d.npy", np.zeros((HW, HW), np.float32))
    np.save(d / "big.npy", np.zeros((1, 3, HW + 1, HW), np.float32))
    return d


@pytest.mark.parametrize(
    "case, argv, needle",
    [
        ("trigger shape", ["poison", "--trigger", "{d}/t2d.npy", "--target-class", "0"],
         "shape (1, 3, h, w)"),
        ("trigger too big", ["poison", "--trigger", "{d}/big.npy", "--target-class", "0"],
         "must fit"),
        ("trigger missing", ["poison", "--trigger", "{d}/nope.npy", "--target-class", "0"],
         "--trigger"),
        ("class range", ["poison", "--trigger", "{d}/t.npy", "--target-class", "4"],
         "--target-class 4"),
        ("count", ["poison", "--trigger", "{d}/t.npy", "--target-class", "0", "--count", "7"],
         "--count 7"),
        ("sizes differ", ["run", "--test-data-dir", "{d}/small.npz"], "must match"),
        ("classes differ", ["run", "--test-data-dir", "{d}/three.npz"], "same classes"),
        ("run class range", ["run", "--test-data-dir", "{d}/train.npz", "--trigger", "{d}/t.npy",
                             "--target-class", "9"], "--target-class 9"),
        ("run trigger alone", ["run", "--test-data-dir", "{d}/train.npz", "--trigger",
                               "{d}/t.npy"], "--target-class"),
        ("run trigger shape", ["run", "--test-data-dir", "{d}/train.npz", "--trigger",
                               "{d}/t2d.npy", "--target-class", "0"], "--trigger"),
        ("bad flag value", ["run", "--test-data-dir", "{d}/train.npz", "--epochs", "-1"],
         "--epochs"),
        ("no subcommand", [], "required"),
    ],
)  # fmt: skip
def test_cli_errors_exit_2(files, capsys, case, argv, needle):
    argv = [a.format(d=files) for a in argv]
    if argv and argv[0] == "poison":
        argv = [*argv[:1], "--dataset", "npz", "--data-dir", f"{files}/train.npz",
                "--out", f"{files}/out-{case.replace(' ', '-')}.npz", *argv[1:]]  # fmt: skip
    elif argv and argv[0] == "run":
        argv = [*argv[:1], "--train-npz", f"{files}/train.npz", "--test-dataset", "npz",
                "--epochs", "1", "--widths", "8,8,8", "--device", "cpu", "--quiet",
                *argv[1:]]  # fmt: skip
    try:
        rc = main(["eval", *argv])
    except SystemExit as e:  # argparse's own errors exit 2 directly
        rc = e.code
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_out_folders_are_created_and_a_file_in_the_way_is_named(tmp_path, capsys):
    # as the README writes it: --out triggers/best_noise_lab0.npy with no triggers/ yet
    out = tmp_path / "new" / "triggers" / "best_noise_lab0.npy"
    assert main(["eval", "trigger", "--size", "4", "4", "--eps", "0.1", "--out", str(out)]) == 0
    assert np.load(out).shape == (1, 3, 4, 4)
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "t.npy"
    assert main(["eval", "trigger", "--size", "4", "4", "--out", str(bad)]) == 2
    assert "cannot create its folder" in capsys.readouterr().err and not bad.exists()


def test_read_only_arrays_train_without_a_warning():
    """load_purified gives read-only memmaps; training on them must not make torch warn."""
    import warnings

    from puregen_fast.eval.classifier import default_config, train_classifier

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(2, dtype=np.int64), 32)
    x.flags.writeable = False
    y.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = default_config("airbench", widths=(8, 8, 8), steps=1, batch_size=32)
        train_classifier(x, y, 2, cfg, device="cpu", quiet=True)


def test_a_last_batch_of_one_image_trains():
    """33 images in batches of 32: the one left over joins the batch before (batch norm cannot
    train on one image; this raised before)."""
    from puregen_fast.eval.classifier import (
        batch_starts,
        default_config,
        plan_length,
        train_classifier,
    )

    assert batch_starts(33, 32) == [0] and batch_starts(34, 32) == [0, 32]
    assert batch_starts(1, 32) == [0] and batch_starts(65, 32) == [0, 32]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (33, 8, 8, 3), dtype=np.uint8)
    y = np.arange(33, dtype=np.int64) % 2
    cfg = default_config("airbench", widths=(8, 8, 8), epochs=2, batch_size=32)
    assert plan_length(33, cfg)[1] == max(2, cfg.min_steps)
    clf = train_classifier(x, y, 2, cfg, device="cpu", quiet=True)
    assert clf.predict(x).shape == (33,)
