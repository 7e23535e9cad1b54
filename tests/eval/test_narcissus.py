"""Narcissus trigger synthesis (`puregen_fast.eval.narcissus`) on real photographs: tiles of the
photos bundled with scikit-image, each photo a class. The attacker knows the target class's
tiles and out-of-distribution photos (other photos); the trigger must move the tiles of the data
set's other classes, which synthesis never sees, to the target class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from puregen_fast.cli.main import main
from puregen_fast.eval.narcissus import NarcissusConfig, synthesize_narcissus, target_rate
from puregen_fast.eval.poison import make_trigger
from puregen_fast.eval.poisons import load_narcissus

skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.usefixtures("one_thread")

DATA_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # the data set's classes
POOD_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
               "camera", "brick", "grass", "coins", "clock", "cell")  # fmt: skip
TARGET = 3  # rocket


def tiles(name: str, size: int, down: int) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` tiles of a bundled photo shrunk ``down`` times."""
    a = getattr(skimage_data, name)()
    a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle: (left, right, disparity)
    a = np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a[..., :3]
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()
    h, w = t.shape[-2] // down, t.shape[-1] // down
    t = torch.nn.functional.interpolate(t, size=(h, w), mode="area")[0]
    img = t.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    ny, nx = h // size, w // size
    out = img[: ny * size, : nx * size].reshape(ny, size, nx, size, 3).swapaxes(1, 2)
    return np.ascontiguousarray(out.reshape(-1, size, size, 3))


def photo_sets(size: int, down: int) -> tuple[np.ndarray, ...]:
    xs = [tiles(n, size, down) for n in DATA_PHOTOS]
    x = np.concatenate(xs)
    y = np.concatenate([np.full(len(t), k) for k, t in enumerate(xs)]).astype(np.int64)
    os_ = [tiles(n, size, down) for n in POOD_PHOTOS]
    xo = np.concatenate(os_)
    yo = np.concatenate([np.full(len(t), k) for k, t in enumerate(os_)]).astype(np.int64)
    return x, y, xo, yo


def test_trigger_moves_unseen_classes_to_the_target():
    # tiny: 16x16 tiles, a narrow airbench surrogate, 30 rounds (about 2.5 s on one CPU thread;
    # seeds 0-3 all gave x3 >= 95%, clean <= 6%, a random pattern <= 1%)
    x, y, xo, yo = photo_sets(16, 4)
    rng = np.random.default_rng(0)
    members = np.flatnonzero(y == TARGET)
    known = rng.choice(members, len(members) // 2, replace=False)  # the attacker's examples
    cfg = NarcissusConfig(
        size=(16, 16), rounds=30, lr=0.05, batch_size=64, surrogate_epochs=4,
        surrogate_batch_size=64, surrogate_widths=(16,),
    )  # fmt: skip
    res = synthesize_narcissus(x[known], xo, yo, cfg, device="cpu")
    others = x[y != TARGET]  # never seen by the attacker
    clean, x3 = target_rate(res, others, None), target_rate(res, others, 3.0)
    assert x3 >= 0.8 and clean < 0.2, (clean, x3)
    # a random pattern of the same bound is no trigger: the optimisation is what works
    rand = make_trigger("uniform", (16, 16), cfg.eps, seed=1)
    res_rand = type(res)(rand, res.surrogate, res.target_label)
    assert target_rate(res_rand, others, 3.0) < 0.5
    # the L-inf bound (16 levels) holds, and the loss came down
    assert res.trigger.shape == (1, 3, 16, 16) and np.abs(res.trigger).max() <= cfg.eps + 1e-7
    assert min(res.history) < res.history[0] / 4


def test_narcissus_cli_bad_input_exits_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             y=np.repeat(np.arange(4), 2))  # fmt: skip
    base = ["eval", "trigger", "--method", "narcissus", "--dataset", "npz", "--data-dir",
            str(tmp_path / "d.npz"), "--out", str(tmp_path / "t.npy"), "--device", "cpu"]
    cases = [
        (["--target-class", "1"], "needs --ood-dataset"),
        (["--target-class", "4", "--ood-dataset", "npz", "--ood-data-dir",
          str(tmp_path / "d.npz")], "--target-class 4"),
        (["--target-class", "1", "--ood-dataset", "npz", "--ood-data-dir",
          str(tmp_path / "d.npz")], "--size 32 32"),  # the default 32x32 patch in 16x16 images
        (["--target-class", "1", "--ood-dataset", "npz"], "needs --ood-data-dir"),
    ]  # fmt: skip
    for extra, needle in cases:
        assert main([*base, *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "t.npy").exists()


@pytest.mark.slow
def test_narcissus_cli_on_32x32_photo_tiles(tmp_path, capsys):
    """The paper's settings (eps 16/255, a 32x32 trigger on 32x32 tiles) with the default 200
    rounds and an airbench surrogate of widths 32/64/64, through ``eval trigger --method
    narcissus``: minutes on 2 CPU cores, so -m slow. Prints the figures."""
    x, y, xo, yo = photo_sets(32, 2)
    np.savez(tmp_path / "photos.npz", x=x, y=y, classes=np.array(DATA_PHOTOS))
    np.savez(tmp_path / "pood.npz", x=xo, y=yo, classes=np.array(POOD_PHOTOS))
    argv = ["eval", "trigger", "--method", "narcissus", "--dataset", "npz", "--data-dir",
            str(tmp_path / "photos.npz"), "--target-class", str(TARGET), "--ood-dataset",
            "npz", "--ood-data-dir", str(tmp_path / "pood.npz"), "--device", "cpu",
            "--surrogate-widths", "32,64,64", "--surrogate-epochs", "10",
            "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "t.npy"), "--quiet"]
    assert main(argv) == 0
    print(capsys.readouterr().out)
    r = json.loads((tmp_path / "r.json").read_text())
    rates = r["surrogate_target_rate"]
    assert rates["x3"] >= 0.8 and rates["clean"] < 0.2, rates
    t = load_narcissus(tmp_path / "t.npy", (32, 32))
    assert t.shape == (1, 3, 32, 32) and np.abs(t).max() <= 2 * 16 / 255 + 1e-7


# -- the honest report: a surrogate's rates alone cannot call a trigger successful -------------


def test_a_useless_trigger_is_reported_as_such():
    from puregen_fast.eval.narcissus import judge_trigger

    eps = 2 * 16 / 255
    strong = np.full((1, 3, 4, 4), eps, np.float32)
    # the case: the surrogate calls every clean image the target, the pattern is faint
    faint = strong * 0.08 / 1.0
    r = judge_trigger({"clean": 1.0, "x1": 1.0, "x3": 1.0}, faint, eps)
    assert not r.success and r.verdict == "not shown to work"
    assert "already calls 100.0% of clean" in r.reasons[0]
    assert any("uses 0.08 of its budget" in w for w in r.warnings)
    # a trigger that barely lifts the surrogate's rate
    r = judge_trigger({"clean": 0.05, "x1": 0.15, "x3": 0.3}, strong, eps)
    assert not r.success and "moves 10.0%" in r.reasons[0]
    # good surrogate figures: success on the surrogate, and the report says it is unchecked
    r = judge_trigger({"clean": 0.05, "x1": 0.7, "x3": 0.9}, strong, eps)
    assert r.success and r.verdict.endswith("(not checked on a victim)")
    assert any("not checked on a victim" in w for w in r.warnings) and not r.reasons
    # a victim that did not learn it overrules the surrogate
    v = {"arch": "airbench", "poisoned": 40, "clean": 0.02, "x1": 0.03, "x3": 0.1}
    r = judge_trigger({"clean": 0.05, "x1": 0.7, "x3": 0.9}, strong, eps, v)
    assert not r.success and r.verdict == "fails on a victim"
    r = judge_trigger({"clean": 0.9, "x1": 0.9, "x3": 0.9}, strong, eps, {**v, "x1": 0.8})
    assert r.success and r.verdict == "works on a victim"
    assert "verdict: works on a victim" in r.lines()[0]


def test_the_victim_check_tells_a_learnt_trigger_from_none():
    """A fresh victim trained on photo tiles whose target examples carry a strong grid learns
    it; with a zero pattern there is nothing to learn."""
    from puregen_fast.eval.narcissus import check_on_victim

    x, y, _, _ = photo_sets(16, 4)
    members = np.flatnonzero(y == TARGET)
    grid = np.zeros((1, 3, 16, 16), np.float32)
    grid[0, :, ::2, ::2] = 0.5
    grid[0, 1, 1::2, 1::2] = -0.5
    from puregen_fast.eval.classifier import default_config

    cfg = default_config("airbench", widths=(16, 32, 32), steps=80, batch_size=32, seed=0)
    got = check_on_victim(grid, x, y, TARGET, members, config=cfg)
    assert got["x1"] - got["clean"] >= 0.2, got
    none = check_on_victim(np.zeros_like(grid), x, y, TARGET, members, config=cfg)
    assert none["x1"] - none["clean"] < 0.2, none
    assert got["held_apart"] == none["held_apart"] > 0 and got["poisoned"] == members.size
