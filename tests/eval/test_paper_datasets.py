"""The authors' per-data-set poison handling and the inputs they read outside their poisons
dataset (SunayBhat1/PureGen_PoisonDefense at c03507e; file and line cited per test): STL-10's
remapped, resized trigger, no Narcissus path for Tiny-ImageNet, CINIC-10's 900 random poisons,
Gradient Matching's target image beside (not inside) the poisons, Bullseye Polytope's frog.
Each replays their operations on a small fixture and compares bytes or values."""

from __future__ import annotations

import configparser
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from puregen_fast.cli.main import build_parser, main
from puregen_fast.eval import experiment as E
from puregen_fast.eval import poisons as P
from puregen_fast.eval.poison import apply_trigger, save_poisoned_npz
from puregen_fast.eval.protocols import describe_profile, profile_settings

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor(P.CIFAR_MEAN)[:, None, None]
STD = torch.tensor(P.CIFAR_STD)[:, None, None]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


def _authors_narcissus(x_u8: np.ndarray, noise: torch.Tensor) -> np.ndarray:
    """utils/purification.py 214-221 (and utils/classifier.py 718-727, the test images), op for
    op: ToTensor, Normalize(.5, .5), apply_noise_patch(mode='add') (a ZeroPad2d of the noise
    to the image, added; purification.py 225-259), clamp(-1, 1), Normalize(-1, 2), ToPILImage
    (mul(255).byte())."""
    half = torch.tensor([0.5] * 3).view(3, 1, 1)
    out = []
    for img in x_u8:
        t = torch.from_numpy(img).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        t = t.sub_(half).div_(half)
        length = t.shape[2] - noise.shape[2]
        t += torch.nn.ZeroPad2d((0, length, 0, length))(noise.clone()[0])
        t = torch.clamp(t, -1, 1)
        minus1, two = torch.tensor([-1.0] * 3).view(3, 1, 1), torch.tensor([2.0] * 3).view(3, 1, 1)
        t = t.sub_(minus1).div_(two)
        out.append(t.mul(255).byte().permute(1, 2, 0).numpy())
    return np.stack(out)


def _stl10_root(root: Path) -> dict[int, np.ndarray]:
    """Narcissus/stl10/size=32_eps=8/best_noise_lab<k>.npy, a different trigger per file."""
    d = root / "Narcissus" / "stl10" / "size=32_eps=8"
    d.mkdir(parents=True)
    out = {}
    for k in range(10):
        t = np.random.default_rng(100 + k).uniform(-0.1, 0.1, (1, 3, 32, 32)).astype(np.float32)
        np.save(d / f"best_noise_lab{k}.npy", t)
        out[k] = t
    return out


# ----------------------------------------------------------------------------- (4) STL-10


def test_stl10_trigger_is_remapped_resized_and_tested_unresized_as_the_authors():
    """utils/purification.py 102-105: STL-10 target class k takes best_noise_lab<map[k]>.npy,
    map = {0:0, 1:2, 2:1, 3:3, 4:4, 5:5, 6:7, 7:6, 8:8, 9:9}; 191-193: that trigger resized to
    96x96 (F.interpolate, bilinear, align_corners=False) for the training images; 188 and 223:
    the file's array, not resized, is what the test-time set gets (utils/classifier.py
    1150-1169: best_noise * multi_test at the top-left corner of every non-target image)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = _stl10_root(root)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (20, 96, 96, 3), dtype=np.uint8)
        y = np.repeat(np.arange(10), 2).astype(np.int64)
        for k, cifar_k in ((1, 2), (6, 7), (3, 3)):
            spec = P.PoisonSpec("narcissus", "stl10", k)
            assert spec.required_files()[0].endswith(f"best_noise_lab{cifar_k}.npy")
            ps = P.poison_with_published(x, y, [str(i) for i in range(10)], spec, str(root),
                                         count=2)  # fmt: skip
            noise = F.interpolate(torch.from_numpy(files[cifar_k]), size=(96, 96),
                                  mode="bilinear", align_corners=False)  # fmt: skip
            idx = np.flatnonzero(y == k)[-2:]  # last_n (purification.py 199-201)
            assert ps.poison_idx.tolist() == idx.tolist()
            assert np.array_equal(ps.images[idx], _authors_narcissus(x[idx], noise))
            others = np.setdiff1d(np.arange(20), idx)
            assert np.array_equal(ps.images[others], x[others])
            assert np.array_equal(ps.trigger, noise.numpy())
            # the test images: the file's 32x32 trigger at x1 and x2, not the resize
            assert np.array_equal(ps.extra["test_trigger"], files[cifar_k])
            for m in (1, 2):
                want = _authors_narcissus(x[:3], torch.from_numpy(files[cifar_k]) * m)
                assert np.array_equal(apply_trigger(x[:3], ps.extra["test_trigger"], m), want)
            assert f"CIFAR-10 class {cifar_k}'s file" in ps.extra["poisoning"]
            assert "not resized" in ps.extra["poisoning"]
        # images of another size than STL-10's: refused, naming the flag
        with pytest.raises(P.UsageError, match="--poisons-dataset stl10.*96x96"):
            P.poison_with_published(x[:, :64, :64], y, [str(i) for i in range(10)],
                                    P.PoisonSpec("narcissus", "stl10", 0), str(root), count=2)


def test_the_paper_profile_tests_stl10_with_the_file_ours_with_the_resize(tmp_path):
    """The measurement the poisoned .npz carries: --protocol paper measures with the file's
    trigger as the authors (utils/classifier.py 1145, 1152: the target_mask array as loaded),
    ours with the trigger the training images got."""
    files = _stl10_root(tmp_path / "poisons")
    x = np.random.default_rng(1).integers(0, 256, (20, 96, 96, 3), dtype=np.uint8)
    y = np.repeat(np.arange(10), 2).astype(np.int64)
    ps = P.poison_with_published(x, y, [str(i) for i in range(10)],
                                 P.PoisonSpec("narcissus", "stl10", 2), str(tmp_path / "poisons"),
                                 count=1)  # fmt: skip
    path = save_poisoned_npz(ps, tmp_path / "p.npz")
    paper = E._attack_eval(path, profile_settings("paper", "npz", "stl10")["trigger_at_test"])
    ours = E._attack_eval(path, profile_settings("ours", "npz", "stl10")["trigger_at_test"])
    assert np.array_equal(paper["trigger"], files[1]) and paper["trigger"].shape[-1] == 32
    assert ours["trigger"].shape[-1] == 96 and np.array_equal(ours["trigger"], ps.trigger)
    assert "32x32, not resized" in describe_profile("paper", "npz", "stl10")


# ----------------------------------------------------------------------------- (5) Tiny-ImageNet


def _small_set(d: Path, k: int = 4, n: int = 10, hw: int = 8, name: str = "train",
               labels: np.ndarray | None = None, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n).astype(np.int64) if labels is None else labels
    x = rng.integers(0, 256, (len(y), hw, hw, 3), dtype=np.uint8)
    names = np.array([f"c{i}" for i in range(int(y.max()) + 1)])
    np.savez(d / f"{name}.npz", x=x, y=y, classes=names)
    return x, y


def test_tinyimagenet_narcissus_needs_a_trigger_of_ones_own(tmp_path, capsys, monkeypatch):
    """utils/purification.py 178-186: get_poisoned_subset_narcissus opens cifar10, cinic10 and
    stl10 only (a tinyimagenet run has no base set), and utils/classifier.py 1159 names the
    test set 'tiny-imagenet', which no run passes: the authors have no Tiny-ImageNet Narcissus
    result. A published trigger for it is refused (exit 2) naming --trigger; a trigger of
    one's own works."""
    _small_set(tmp_path)
    _small_set(tmp_path, name="test", seed=1)
    d = tmp_path / "poisons" / "Narcissus" / "tinyimagenet" / "size=8_eps=8"
    d.mkdir(parents=True)
    np.save(d / "best_noise_lab0.npy", np.full((1, 3, 8, 8), 0.05, np.float32))
    base = ["--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"), "--target-class",
            "0", "--poisons", str(tmp_path / "poisons"), "--poisons-dataset",
            "tinyimagenet"]  # fmt: skip
    rc = _run(["eval", "poison", *base, "--attack", "narcissus", "--narcissus-size", "8",
               "--count", "2", "--out", str(tmp_path / "p.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no Narcissus path for Tiny-ImageNet" in err and "--trigger FILE" in err
    assert not (tmp_path / "p.npz").exists()

    def trained(*a, **k):
        raise AssertionError("a victim was trained")

    monkeypatch.setattr(E, "train_classifier", trained)
    rc = _run(["eval", "experiment", *base, "--test-dataset", "npz", "--test-data-dir",
               str(tmp_path / "test.npz"), "--count", "2", "--defenses", "none", "--seeds", "0",
               "--classifier", "resnet18-paper:widths=4,epochs=1", "--device", "cpu", "--quiet",
               "--out", str(tmp_path / "exp")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no Narcissus path for Tiny-ImageNet" in err and "--trigger FILE" in err
    # with a trigger of one's own, the poisoning goes ahead
    assert _run(["eval", "poison", "--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"),
                 "--target-class", "0", "--trigger", str(d / "best_noise_lab0.npy"), "--count",
                 "2", "--quiet", "--out", str(tmp_path / "own.npz")]) == 0  # fmt: skip


# ----------------------------------------------------------------------------- (6) CINIC-10

# Configs/config.ini 7, 23-25 and 210-215, as published
_CONFIG = """
[DEFAULTS]
last_n_narcissus = True
num_images_narcissus = 500

[CINIC]
dataset = cinic10
epochs = 80
lr_decay = 30,50,70
num_images_narcissus = 900
last_n_narcissus = False
"""


def _authors_config(*sections: str) -> dict:
    """utils/utils.py 27-45 (set_args_from_config): digits to int, true/false to bool, later
    sections overriding earlier ones."""
    cfg = configparser.ConfigParser()
    cfg.read_string(_CONFIG)
    args: dict = {}
    for sec in sections:
        for key, value in cfg[sec].items():
            args[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(
                value.lower(), value)  # fmt: skip
    return args


def test_cinic10_paper_poisoning_is_the_config_ini_cinic_section(tmp_path):
    """Configs/config.ini 210-215 ([CINIC]): 900 poisons, last_n_narcissus = False (random);
    [DEFAULTS] 24-25 elsewhere: 500, the last of the class. --protocol paper takes these as
    its count and selection; --count and --(no-)random-select replace them."""
    cinic = _authors_config("DEFAULTS", "CINIC")
    cifar = _authors_config("DEFAULTS")
    paper = profile_settings("paper", "cinic10")
    assert (paper["count"], paper["last_n"]) == (cinic["num_images_narcissus"],
                                                 cinic["last_n_narcissus"])  # fmt: skip
    assert (paper["count"], paper["last_n"]) == (900, False)
    for ds in ("cifar10", "npz"):
        s = profile_settings("paper", ds)
        assert (s["count"], s["last_n"]) == (cifar["num_images_narcissus"],
                                             cifar["last_n_narcissus"])  # fmt: skip
    assert (profile_settings("paper", "npz", "cinic10")["count"]) == 900
    assert "900 images, drawn at random" in describe_profile("paper", "cinic10")

    parser = build_parser()
    base = ["eval", "experiment", "--dataset", "cinic10", "--test-dataset", "cinic10",
            "--target-class", "0", "--trigger", "t.npy", "--out", "o"]  # fmt: skip
    from puregen_fast.cli.eval_experiment import _protocol

    def proto(*extra: str):
        return _protocol(parser.parse_args([*base, *extra]))

    assert (proto("--protocol", "paper").count, proto("--protocol", "paper").last_n) == (900, False)
    assert (proto().count, proto().last_n) == (500, True)  # ours: as before
    p = proto("--protocol", "paper", "--count", "7", "--no-random-select")
    assert (p.count, p.last_n) == (7, True)
    assert proto("--count", "all", "--random-select").count is None


def test_cinic10_poisoning_says_what_it_does_and_what_the_authors_leave_open(tmp_path, capsys):
    """eval poison on the authors' cinic10 (Configs/config.ini 210-215) says the count and
    the selection it used, the authors' (900, random), and that their random draw (np.random.
    choice after np.random.seed(11): scripts/purify.py 29, utils/utils.py 50, utils/
    purification.py 207, 219) and whether purify.py was run with --random_imgs_narcissus
    (scripts/purify.py 215, its default the last n) cannot be known from their code."""
    _small_set(tmp_path, k=10, n=4, hw=8)
    d = tmp_path / "poisons" / "Narcissus" / "cinic10" / "size=8_eps=8"
    d.mkdir(parents=True)
    np.save(d / "best_noise_lab3.npy", np.full((1, 3, 8, 8), 0.05, np.float32))
    argv = ["eval", "poison", "--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"),
            "--poisons-dataset", "cinic10", "--attack", "narcissus", "--narcissus-size", "8",
            "--poisons", str(tmp_path / "poisons"), "--target-class", "3",
            "--count", "2"]  # fmt: skip
    assert _run([*argv, "--out", str(tmp_path / "a.npz")]) == 0
    err = capsys.readouterr().err
    assert "the last 2 of the 4 training images of class 3 (data set order)" in err
    assert "the authors poison 900 images of the class, drawn at random" in err
    assert "config.ini 210-215" in err
    assert _run([*argv, "--random-select", "--seed", "5", "--out", str(tmp_path / "b.npz")]) == 0
    err = capsys.readouterr().err
    assert "2 of the 4 training images of class 3 drawn at random (numpy default_rng(5))" in err
    assert "cannot be reproduced" in err and "--random_imgs_narcissus" in err
    with np.load(tmp_path / "b.npz") as z:
        assert "drawn at random" in str(z["poisoning"])


def test_cinic10_imagenet_says_it_is_not_the_authors_pairing(tmp_path, capsys):
    """utils/purification.py 181-183: the authors poison CINIC-10's full training set
    (ImageFolder of CINIC-10/train), never its ImageNet part: --dataset cinic10-imagenet
    takes the cinic10 poisons with a note saying so."""
    from fixtures_data import write_cinic10

    write_cinic10(tmp_path / "cinic", n_cifar=1, n_imagenet=2, seed=3)
    d = tmp_path / "poisons" / "Narcissus" / "cinic10" / "size=32_eps=8"
    d.mkdir(parents=True)
    np.save(d / "best_noise_lab1.npy", np.full((1, 3, 32, 32), 0.05, np.float32))
    argv = ["eval", "poison", "--dataset", "cinic10-imagenet", "--data-dir",
            str(tmp_path / "cinic"), "--attack", "narcissus", "--poisons",
            str(tmp_path / "poisons"), "--target-class", "1", "--count", "1",
            "--out", str(tmp_path / "p.npz")]  # fmt: skip
    assert _run(argv) == 0
    err = capsys.readouterr().err
    assert "never its ImageNet part alone" in err and "--dataset cinic10" in err
    assert "the last 1 of the 2 training images of class 1" in err


# ----------------------------------------------------------------------------- (7) GM's target


def _gm_authors_data_dir(data: Path, x: np.ndarray, y: np.ndarray, trial: int = 3, cls: int = 2
                         ) -> tuple[np.ndarray, Path]:  # fmt: skip
    """The authors' <data_dir>: the poisons under PureGen_Poisons/GradientMatching/cifar10/<k>
    (utils/purification.py 90), the target image under Poisons/GradientMatching/cifar10/<k>
    (utils/classifier.py 1125), each a pickle as the benchmark writes it."""
    pd = data / "PureGen_Poisons" / "GradientMatching" / "cifar10" / str(trial)
    td = data / "Poisons" / "GradientMatching" / "cifar10" / str(trial)
    pd.mkdir(parents=True)
    td.mkdir(parents=True)
    idx = np.flatnonzero(y == cls)[:3]
    with open(pd / "poisons.pickle", "wb") as f:
        pickle.dump([(Image.fromarray(255 - a), int(cls)) for a in x[idx]], f)
    with open(pd / "base_indices.pickle", "wb") as f:
        pickle.dump(np.asarray(idx, np.int64), f)
    target = np.random.default_rng(9).integers(0, 256, x.shape[1:], dtype=np.uint8)
    with open(td / "target.pickle", "wb") as f:
        pickle.dump((Image.fromarray(target), 1), f)
    return target, td / "target.pickle"


def _gm_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["eval", "experiment", "--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"),
            "--test-dataset", "npz", "--test-data-dir", str(tmp_path / "test.npz"),
            "--poisons-dataset", "cifar10", "--defenses", "none", "--seeds", "0",
            "--classifier", "resnet18-paper:widths=4,epochs=1", "--device", "cpu", "--quiet",
            *extra]  # fmt: skip


def test_gm_target_is_read_from_the_authors_data_dir_and_printed(tmp_path, capsys):
    """utils/classifier.py 1122-1127 and 1203-1209: the target image of Gradient Matching
    trial k is <data_dir>/Poisons/GradientMatching/cifar10/<k>/target.pickle, beside the
    poisons dataset (<data_dir>/PureGen_Poisons, utils/purification.py 88-90), and a trial
    succeeds when the victim calls it the poisons' class (scripts/train_classifier.py 204-208;
    purification.py 268). The run finds it, says where it came from, and measures with it."""
    x, y = _small_set(tmp_path)
    _small_set(tmp_path, name="test", seed=1)
    target, tpath = _gm_authors_data_dir(tmp_path / "data", x, y)
    out = tmp_path / "exp"
    argv = _gm_argv(tmp_path, "--attack", "gradient-matching", "--poisons",
                    str(tmp_path / "data"), "--target-class", "3", "--out", str(out))  # fmt: skip
    assert _run(argv) == 0
    err = capsys.readouterr().err
    assert f"input: target image (target 3): {tpath} <- the authors' <data_dir>/Poisons" in err
    assert "input: poisons (target 3): " in err and "input: training set:" in err
    assert err.index("input: target image") < err.index("[1/")  # before any cell
    with np.load(next(out.glob("poison-*/poisoned.npz"))) as z:
        assert np.array_equal(z["target_image"], target) and int(z["target_label"]) == 1
    # the poisoned set's name depends on where the target came from: a copy made before the
    # target was looked for outside the poison folder (and so lacks it) is not reused
    attack = json.loads(next(out.glob("poison-*/attack.json")).read_text())
    assert attack["target_image"] == str(tpath)
    rec = json.loads((out / "inputs.json").read_text())
    assert {"what": "target image", "target": 3, "path": str(tpath),
            "source": "the authors' <data_dir>/Poisons (utils/classifier.py 1125)"} in rec
    res = json.loads((out / "results.json").read_text())
    m = res["cells"][0]["metrics"]
    assert m["target_misclassification"] in (0.0, 1.0) and len(m["target_predictions"]) == 1


def test_a_missing_input_stops_the_run_before_any_training(tmp_path, capsys, monkeypatch):
    """Every input is found before a victim is trained: a Gradient Matching trial without its
    target.pickle (anywhere the authors keep it: utils/classifier.py 1125) and a Narcissus
    trigger folder missing the second target's file are exit 2 naming what to give, with no
    victim trained for the first target."""
    x, y = _small_set(tmp_path)
    _small_set(tmp_path, name="test", seed=1)
    _, tpath = _gm_authors_data_dir(tmp_path / "data", x, y)
    tpath.unlink()

    def trained(*a, **k):
        raise AssertionError("a victim was trained")

    monkeypatch.setattr(E, "train_classifier", trained)
    argv = _gm_argv(tmp_path, "--attack", "gradient-matching", "--poisons",
                    str(tmp_path / "data"), "--target-class", "3",
                    "--out", str(tmp_path / "a"))  # fmt: skip
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "no target image (target.pickle)" in err and "--target-image FILE|DIR" in err
    assert str(tpath) in err  # every place looked at is named
    trig = tmp_path / "trig"
    trig.mkdir()
    np.save(trig / "best_noise_lab0.npy", np.full((1, 3, 8, 8), 0.05, np.float32))
    argv = _gm_argv(tmp_path, "--trigger", str(trig), "--target-class", "0", "1", "--count", "2",
                    "--out", str(tmp_path / "b"))  # fmt: skip
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "no best_noise_lab1.npy for target class 1" in err
    # --target-image: one file for two trials, or for another attack, is exit 2 naming it
    moved = tmp_path / "t.pickle"
    with open(moved, "wb") as f:
        pickle.dump((Image.fromarray(x[0]), 1), f)
    for extra, needle in (
        (["--attack", "gradient-matching", "--poisons", str(tmp_path / "data"),
          "--target-class", "3", "4"], "one file for 2 trials"),
        (["--trigger", str(trig), "--target-class", "0"], "applies to --attack gradient-matching"),
    ):  # fmt: skip
        argv = _gm_argv(tmp_path, *extra, "--target-image", str(moved), "--out",
                        str(tmp_path / "c"))  # fmt: skip
        assert _run(argv) == 2
        assert needle in capsys.readouterr().err


def test_target_image_flag_names_the_file(tmp_path, capsys):
    """--target-image FILE: the trial's target.pickle wherever it is, found and printed before
    training (utils/classifier.py 1206-1207 read it as (PIL image, label)); with another
    attack it is exit 2."""
    x, y = _small_set(tmp_path)
    rc = _run(["eval", "poison", "--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"),
               "--poisons-dataset", "cifar10", "--attack", "narcissus", "--target-class", "0",
               "--target-image", "t.pickle", "--out", str(tmp_path / "n.npz")])  # fmt: skip
    assert rc == 2 and "--target-image applies to --attack gradient-matching" in (
        capsys.readouterr().err)  # fmt: skip
    _, tpath = _gm_authors_data_dir(tmp_path / "data", x, y)
    moved = tmp_path / "elsewhere.pickle"
    tpath.rename(moved)
    spec = P.PoisonSpec("gradient-matching", "cifar10", 3)
    root = tmp_path / "data" / "PureGen_Poisons"
    assert P.find_gm_target(spec, root, str(moved)) == (moved, "--target-image")
    ps = P.poison_with_published(x, y, [f"c{i}" for i in range(4)], spec, str(tmp_path / "data"),
                                 gm_target=str(moved))  # fmt: skip
    assert ps.extra["target_label"] == 1 and str(moved) in ps.extra["poisoning"]
    with pytest.raises(P.UsageError, match="--target-image"):
        P.poison_with_published(x, y, [f"c{i}" for i in range(4)], spec, str(tmp_path / "data"),
                                gm_target=str(tmp_path / "nope.pickle"))  # fmt: skip


# ----------------------------------------------------------------------------- (8) BP's target


def _authors_fetch_target_polytope(target_label, target_index, start_idx, img_label_list):
    """utils/classifier.py 1171-1200 (fetch_target_polytope, transform None), on a list."""
    counter = 0
    for _idx, (img, label) in enumerate(img_label_list):
        if label == target_label:
            counter += 1
            if counter == (target_index + start_idx + 1):
                return np.array(img)[None, :, :, :]
    raise Exception("Target exceeds number of total samples")


def _bp_others(tmp_path: Path, trial: int = 2) -> tuple[np.ndarray, np.ndarray, Path]:
    """A transfer split's 'others' with 55 frogs among other classes, and one Bullseye Polytope
    poison file of class-8 (ship) poisons (utils/purification.py 130-139)."""
    labels = np.concatenate([np.arange(10).repeat(3), np.full(52, 6)])
    labels = np.random.default_rng(4).permutation(labels).astype(np.int64)
    x, y = _small_set(tmp_path, labels=labels, name="others", seed=2)
    spec = P.PoisonSpec("bullseye-polytope", "cifar10", trial)
    path = tmp_path / "poisons" / spec.required_files()[0]
    path.parent.mkdir(parents=True)
    idx = np.flatnonzero(y == 8)[:2]
    u = torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float() / 255
    torch.save({"poison": [(t, 8) for t in (u - MEAN) / STD], "idx": [int(i) for i in idx]},
               path)  # fmt: skip
    return x, y, tmp_path / "poisons"


def test_bp_target_is_the_authors_frog(tmp_path):
    """utils/classifier.py 1133-1135: the target of trial k is fetch_target_polytope(6, k,
    num_per_class, CIFAR10_TRAIN_Split.pth, 'others'), num_per_class = 50 (Configs/config.ini
    106, 127): the (k + 51)-th frog of the 'others' images; the attack's class is 8
    (utils/purification.py 139)."""
    x, y, root = _bp_others(tmp_path, trial=2)
    want = _authors_fetch_target_polytope(6, 2, 50, list(zip(x, y)))
    spec = P.PoisonSpec("bullseye-polytope", "cifar10", 2)
    ps = P.poison_with_published(x, y, [f"c{i}" for i in range(10)], spec, str(root))
    assert np.array_equal(ps.extra["target_image"][None], want)
    assert ps.extra["target_label"] == 6 and ps.target_class == P.BP_POISON_CLASS == 8
    assert y[int(ps.extra["target_train_index"])] == 6
    assert "frog number 53" in ps.extra["poisoning"]
    with pytest.raises(P.UsageError, match="--target-class 2: .*frog number 53"):
        P.bp_target(y[:40], 2)


def _authors_valid_indices(labels, poison_indices, num_per_label, num_classes=10):
    """utils/classifier.py 353-379 (Poisoned_Dataset_Base.get_valid_indices), on labels."""
    num_per_label_dict = {label: 0 for label in range(num_classes)}
    for pidx in poison_indices:
        label = int(labels[pidx])
        num_per_label_dict[label] = num_per_label_dict.get(label, 0) + 1
    valid = []
    for idx, label in enumerate(labels):
        label = int(label)
        if idx not in poison_indices and num_per_label_dict.get(label, 0) < num_per_label:
            valid.append(idx)
            num_per_label_dict[label] += 1
    return valid


def test_bp_victims_train_on_the_authors_subset(tmp_path):
    """utils/classifier.py 199-207 and 332-392: the transfer victims train on the poisons and,
    of the other 'others' images, the first num_per_class = 50 of each class with the poisons
    counted against their class (Configs/config.ini 106); the target frog is not among them."""
    x, y, root = _bp_others(tmp_path, trial=2)
    spec = P.PoisonSpec("bullseye-polytope", "cifar10", 2)
    ps = P.poison_with_published(x, y, [f"c{i}" for i in range(10)], spec, str(root))
    pois = ps.poison_idx.tolist()
    want = sorted(pois + _authors_valid_indices(y, pois, 50))
    assert ps.extra["train_subset"].tolist() == want
    assert int(ps.extra["target_train_index"]) not in want
    counts = np.bincount(y[want], minlength=10)
    assert counts[6] == 50 and counts[8] == 3  # 2 poisons + 1 clean ship: 3 ships in all
    assert "the first 50 other images of each class" in ps.extra["poisoning"]


def _bp_checkpoint(path: Path, width: int = 8) -> dict:
    """A pretrained CIFAR ResNet-18 saved as the Bullseye Polytope checkpoints are: {'net':
    DataParallel state dict ('module.' keys), 'acc', 'epoch'} (utils/classifier.py 981-986)."""
    from puregen_fast.eval.classifier import ResNet18

    torch.manual_seed(123)
    net = ResNet18(10, width)
    with torch.no_grad():  # statistics a pretrained net would have
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    sd = net.state_dict()
    torch.save({"net": {f"module.{k}": v for k, v in sd.items()}, "acc": 90.0, "epoch": 4800},
               path)  # fmt: skip
    return {k: v.clone() for k, v in sd.items()}


def test_bp_victim_is_the_authors_transfer_recipe(tmp_path):
    """Configs/config.ini 101-140 ([LINEAR_TRANSFER]: adam, lr 0.1, 40 epochs, lr_decay
    15,25,35, batch 64, weight decay 5e-4; [FINE_TUNE]: adam, lr 1e-4, 60 epochs, 15,30,45,
    batch 128 from [DEFAULTS]); utils/classifier.py 981-1004 (their checkpoint loaded, 'module.'
    stripped, a new nn.Linear head), 1057-1067 (Adam over get_penultimate_params_list, the
    parameters named 'linear', for the linear probe; all parameters for fine-tuning), 1085
    (MultiStepLR per epoch), models/Classifiers.py 118-130 (eval_BatchNorm: statistics, scale
    and shift fixed), utils/classifier.py 805-806 (no augmentation)."""
    from puregen_fast.eval import classifier as C
    from puregen_fast.eval.victims import parse_classifier_spec

    ck = tmp_path / "ckpt-ResNet18-4800.t7"
    sd = _bp_checkpoint(ck)
    x = np.random.default_rng(0).integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    y = (np.arange(70) % 10).astype(np.int64)
    for preset, lr, epochs, bs, miles in (("resnet18-bp-linear", 0.1, 40, 64, [15, 25, 35]),
                                          ("resnet18-bp-finetune", 1e-4, 60, 128, [15, 30, 45])):
        spec = parse_classifier_spec(f"{preset}:pretrained={ck},widths=8")
        cfg = spec.config(seed=0)
        assert (cfg.crop_pad, cfg.flip, cfg.tta, cfg.normalize) == (0, False, "none", "cifar10")
        run = C._prepare(x, y, 10, cfg, "cpu")
        assert isinstance(run.opt, torch.optim.Adam) and run.bs == min(bs, 70)
        (g,) = run.opt.param_groups
        assert (g["initial_lr"], g["weight_decay"], g["betas"]) == (lr, 5e-4, (0.9, 0.999))
        named = dict(run.model.named_parameters())
        if preset.endswith("linear"):  # get_penultimate_params_list: names with "linear"
            want = {id(p) for k, p in named.items() if "linear" in k}
        else:  # all parameters; eval_BatchNorm's scale and shift have requires_grad False
            bn = {id(m.weight) for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
            bn |= {id(m.bias) for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
            want = {id(p) for p in named.values()} - bn
        assert {id(p) for p in g["params"]} == want
        state = run.model.state_dict()
        for k, v in sd.items():  # the checkpoint, but a fresh head
            if k.startswith("linear."):
                assert not torch.equal(state[k], v)
            else:
                assert torch.equal(state[k], v), k
        # MultiStepLR(milestones, gamma 0.1), stepped once per epoch
        opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=miles, gamma=0.1)
        for epoch in range(epochs):
            got = lr * C.schedule_factor(cfg, epoch * 2, epochs * 2, epoch)
            assert got == pytest.approx(opt.param_groups[0]["lr"]), (preset, epoch)
            opt.step()
            sched.step()
        # one epoch of training: batch norm and (linear probe) the body stay as loaded
        clf = C.train_classifier(x, y, 10, parse_classifier_spec(
            f"{preset}:pretrained={ck},widths=8,epochs=1").config(0), device="cpu", quiet=True)
        after = clf.model.state_dict()
        for k, v in sd.items():
            if ".bn" in k or k.startswith("bn1") or ".shortcut.1." in k:
                assert torch.equal(after[k], v), k
        conv = "layer1.0.conv1.weight"
        assert torch.equal(after[conv], sd[conv]) == preset.endswith("linear")
    with pytest.raises(P.UsageError, match="pretrained=FILE"):
        parse_classifier_spec("resnet18-bp-linear")


def test_bp_experiment_runs_the_authors_victim_on_their_subset(tmp_path, capsys):
    """A CPU smoke run of --protocol paper with Bullseye Polytope (utils/classifier.py
    1133-1135, 199-207; the victim of Configs/config.ini 101-121 for one epoch): the target
    frog, the 50-a-class subset, the pretrained checkpoint found and printed before training;
    without --classifier the paper profile names the victim to give (exit 2)."""
    x, y, root = _bp_others(tmp_path, trial=2)
    _small_set(tmp_path, k=10, n=2, name="test", seed=5)
    ck = tmp_path / "ck.t7"
    _bp_checkpoint(ck)
    argv = ["eval", "experiment", "--protocol", "paper", "--dataset", "npz", "--data-dir",
            str(tmp_path / "others.npz"), "--test-dataset", "npz", "--test-data-dir",
            str(tmp_path / "test.npz"), "--poisons-dataset", "cifar10", "--attack",
            "bullseye-polytope", "--poisons", str(root), "--target-class", "2", "--defenses",
            "none", "--seeds", "0", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "e")]  # fmt: skip
    assert _run(argv) == 2
    assert "resnet18-bp-linear:pretrained=FILE" in capsys.readouterr().err
    argv += ["--classifier", f"resnet18-bp-linear:pretrained={ck},widths=8,epochs=1"]
    assert _run(argv) == 0
    err = capsys.readouterr().err
    assert f"input: pretrained network: {ck}" in err and "frog number 53" in err
    assert "the victims train on 77 of the 82 images" in err
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    cells = res["cells"]
    assert len(cells) == 2 and all("target_misclassification" in c["metrics"] for c in cells)
    assert cells[0]["classifier_config"]["optimizer"] == "adam"
