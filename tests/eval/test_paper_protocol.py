"""`eval experiment --protocol paper`: the victim and the measurement as the authors have them
(SunayBhat1/PureGen_PoisonDefense at c03507e; file and line cited per test), replayed on small
inputs against the objects our code builds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from puregen_fast.cli.main import main
from puregen_fast.eval import classifier as C
from puregen_fast.eval.protocols import describe_profile, profile_settings
from puregen_fast.eval.victims import parse_classifier_spec

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def _images(n: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            (np.arange(n) % 10).astype(np.int64))  # fmt: skip


def test_the_paper_victim_is_built_as_the_authors_build_it():
    """Configs/config.ini 12-22 (sgd, step, 200 epochs, lr 0.1, momentum 0.9, batch 128, weight
    decay 5e-4, lr_decay 100, 150); utils/classifier.py 1036 (SGD without nesterov on every
    parameter), 32-33 (the fixed normalisation), train_classifier.py 96 (plain cross-entropy)."""
    spec = profile_settings("paper", "cifar10")["classifiers"][0]
    assert spec == parse_classifier_spec("resnet18-paper")
    x, y = _images(300)
    narrow = parse_classifier_spec("resnet18-paper:widths=8")  # the recipe on a small net
    assert dict(narrow.options) == {**dict(spec.options), "widths": (8,)}
    run = C._prepare(x, y, 10, narrow.config(seed=11), "cpu")
    (g,) = run.opt.param_groups
    assert (g["initial_lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9,
                                                                                False, 5e-4)
    assert sum(p.numel() for p in g["params"]) == sum(
        p.numel() for p in run.model.parameters())  # fmt: skip  # decay on every parameter
    assert run.loss_fn.label_smoothing == 0.0 and not run.summed
    assert torch.allclose(run.mean.flatten(), torch.tensor(CIFAR_MEAN))
    assert torch.allclose(run.std.flatten(), torch.tensor(CIFAR_STD))
    assert run.bs == 128 and run.total_steps == 200 * 3  # 300 images: 3 batches per epoch
    assert spec.config(0).tta == "none" and spec.config(0).flip
    # Tiny-ImageNet: its own constants (utils/classifier.py 38-39)
    tin = profile_settings("paper", "tinyimagenet")["classifiers"][0].config(0)
    assert C.NORMALIZE[tin.normalize] == ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))


def test_the_step_schedule_is_multisteplr_stepped_per_epoch():
    """utils/classifier.py 1085: MultiStepLR(milestones=[100, 150], gamma=0.1), stepped once
    per epoch (scripts/train_classifier.py 184)."""
    per_epoch, epochs = 3, 200
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 150], gamma=0.1)
    total = per_epoch * epochs
    for epoch in range(epochs):
        want = opt.param_groups[0]["lr"]
        for i in range(per_epoch):
            got = 0.1 * C._lr_factor(epoch * per_epoch + i, total, 0.0, "step")
            assert got == pytest.approx(want), (epoch, i)
        opt.step()  # (no gradient: the order torch asks for, nothing moves)
        sched.step()


def test_the_crop_pads_with_black_before_normalising():
    """utils/classifier.py 792: RandomCrop(32, padding=4) on the PIL image (fill 0), then
    Normalize(cifar_mean, cifar_std) (818): the padding is black, not reflected."""
    x, _ = _images(5, 8)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    xt = torch.from_numpy(x)
    got = C._augment(C._to_float(xt, mean, std), 4, False, torch.Generator().manual_seed(3),
                     (0 - mean) / std)  # fmt: skip
    gen = torch.Generator().manual_seed(3)  # the same draws: dy, then dx
    dy = torch.randint(0, 9, (5,), generator=gen)
    dx = torch.randint(0, 9, (5,), generator=gen)
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))  # black pixels, as PIL's fill 0
    crops = np.stack([padded[i, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(5)])
    want = C._to_float(torch.from_numpy(crops), mean, std)
    assert torch.allclose(got, want, atol=1e-6)
    assert int((dy != 4).sum() + (dx != 4).sum()) > 0  # some crops do reach the padding


def test_the_profile_is_printed_and_stored(tmp_path, capsys):
    """A CPU smoke run of --protocol paper on a tiny fixture (one epoch): poison success at x1
    and x2 (utils/classifier.py 1144: range(1, 3)), the profile in the log and results.json."""
    pytest.importorskip("skimage")
    from puregen_fast.eval.photos import write_photo_sets

    paths = write_photo_sets(tmp_path / "photos", size=16, train_per_class=20, test_per_class=5,
                             heldout_per_class=0, classes=("hubble_deep_field", "retina",
                                                           "grass"), extra=())  # fmt: skip
    trig = np.zeros((1, 3, 16, 16), np.float32)
    trig[0, :, ::2, ::2] = 0.5
    np.save(tmp_path / "t.npy", trig)
    out = tmp_path / "exp"
    argv = ["eval", "experiment", "--protocol", "paper", "--dataset", "npz", "--data-dir",
            str(paths["train"]), "--test-dataset", "npz", "--test-data-dir", str(paths["test"]),
            "--trigger", str(tmp_path / "t.npy"), "--target-class", "1", "--count", "10",
            "--defenses", "none", "--classifier", "resnet18-paper:widths=4,epochs=1",
            "--seeds", "0", "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert describe_profile("paper", "npz") in err
    res = json.loads((out / "results.json").read_text())
    assert res["plan"]["profile"] == "paper" and res["plan"]["scales"] == [1.0, 2.0]
    cell = res["cells"][0]
    assert [q["scale"] for q in cell["metrics"]["poison"]] == [1.0, 2.0]
    cfg = cell["classifier_config"]
    assert (cfg["nesterov"], cfg["pad_mode"], cfg["normalize"], cfg["epochs"]) == (
        False, "zeros", "cifar10", 1.0)  # fmt: skip


@pytest.mark.parametrize("protocol,given,want", [
    ("paper", [], "trunc"), ("ours", [], None), ("paper", ["--purify-quantize", "round"], "round"),
])  # fmt: skip
def test_the_paper_protocol_truncates_purified_images(tmp_path, protocol, given, want):
    """The authors' purified images leave through ToPILImage (scripts/PureGen.py 95-97):
    truncation, so --protocol paper gives the engine quantize="trunc" unless --purify-quantize
    says otherwise; ours leaves the engine's default (round), so its cells keep their names."""
    from puregen_fast.cli.eval_experiment import _protocol
    from puregen_fast.cli.main import build_parser

    argv = ["eval", "experiment", "--protocol", protocol, "--dataset", "cifar10",
            "--test-dataset", "cifar10",
            "--attack", "narcissus", "--trigger", str(tmp_path / "t.npy"), "--target-class", "0",
            "--defenses", "ebm", "--out", str(tmp_path / "o"), *given]  # fmt: skip
    purify = dict(_protocol(build_parser().parse_args(argv)).purify)
    assert purify.get("quantize") == want
    profile = "trunc" if protocol == "paper" else "round"
    assert f"of purified images {profile}" in describe_profile(protocol, "cifar10")
