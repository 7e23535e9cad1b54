"""The authors' published poisons (`puregen_fast.eval.poisons`): the three formats, built here
exactly as the attacks' code writes them, loaded and applied; hostile pickles refused before any
of their code runs; and every bad input an exit 2 that names it. No test touches the network."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from puregen_fast.cli.main import main
from puregen_fast.eval import poisons as P
from puregen_fast.eval.poison import apply_trigger

HW = 8
K = 4
N_PER = 10
MEAN = torch.tensor(P.CIFAR_MEAN)[:, None, None]
STD = torch.tensor(P.CIFAR_STD)[:, None, None]


def _train_set(d: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (K * N_PER, HW, HW, 3), dtype=np.uint8)
    y = np.repeat(np.arange(K), N_PER).astype(np.int64)
    np.savez(d / "train.npz", x=x, y=y, classes=np.array(["a", "b", "c", "d"]))
    return x, y


def _gm_folder(root: Path, x, y, *, trial=3, cls=2, n=4, protocol=pickle.HIGHEST_PROTOCOL,
               indices="numpy") -> tuple[Path, np.ndarray, np.ndarray]:  # fmt: skip
    """Gradient Matching as its benchmark export writes it: a pickled list of (PIL image, int),
    the base indices, and (PIL target image, label)."""
    d = root / "GradientMatching" / "cifar10" / str(trial)
    d.mkdir(parents=True)
    rng = np.random.default_rng(trial)
    idx = np.flatnonzero(y == cls)[[1, 4, 6, 9][:n]]
    pois = np.clip(x[idx].astype(int) + rng.integers(-8, 9, x[idx].shape), 0, 255).astype(np.uint8)
    with open(d / "poisons.pickle", "wb") as f:
        pickle.dump([(Image.fromarray(a), int(cls)) for a in pois], f, protocol=protocol)
    ids = {"numpy": np.asarray(idx, np.int64), "list": [int(i) for i in idx],
           "torch": torch.tensor(idx, dtype=torch.long)}[indices]  # fmt: skip
    with open(d / "base_indices.pickle", "wb") as f:
        pickle.dump(ids, f, protocol=protocol)
    target = rng.integers(0, 256, (HW, HW, 3), dtype=np.uint8)
    with open(d / "target.pickle", "wb") as f:
        pickle.dump((Image.fromarray(target), 1), f, protocol=protocol)
    return d, idx, pois


def _bp_file(root: Path, x, y, *, trial=5, cls=3) -> tuple[Path, np.ndarray, torch.Tensor]:
    """Bullseye Polytope's ``poison_00799.pth``: {'poison': [(normalised tensor, label)],
    'idx': [base indices]}."""
    spec = P.PoisonSpec("bullseye-polytope", "cifar10", trial)
    path = root / spec.required_files()[0]
    path.parent.mkdir(parents=True)
    idx = np.flatnonzero(y == cls)[:5]
    u = torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float() / 255
    u = (u + 0.02 * torch.randn(u.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    norm = (u - MEAN) / STD
    torch.save({"poison": [(t, cls) for t in norm], "idx": [int(i) for i in idx]}, path)
    return path, idx, norm


def _narcissus_file(root: Path, k: int, size: int = HW, eps: int = 8) -> tuple[Path, np.ndarray]:
    d = root / "Narcissus" / "cifar10" / f"size={size}_eps={eps}"
    d.mkdir(parents=True, exist_ok=True)
    t = np.random.default_rng(k).uniform(-0.06, 0.06, (1, 3, size, size)).astype(np.float32)
    np.save(d / f"best_noise_lab{k}.npy", t)
    return d / f"best_noise_lab{k}.npy", t


def _poison(d: Path, *args: str) -> int:
    argv = ["eval", "poison", "--dataset", "npz", "--data-dir", str(d / "train.npz"),
            "--poisons-dataset", "cifar10", "--quiet", *args]  # fmt: skip
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


# ----------------------------------------------------------------------------- the three formats


@pytest.mark.parametrize(
    "protocol, indices", [(5, "numpy"), (2, "list"), (4, "torch"), (0, "numpy")]
)
def test_gradient_matching_loads_and_poisons_in_place(tmp_path, protocol, indices):
    x, y = _train_set(tmp_path)
    root = tmp_path / "poisons"
    d, idx, pois = _gm_folder(root, x, y, protocol=protocol, indices=indices)
    pp = P.load_gradient_matching(d)
    assert pp.images.dtype == np.uint8 and np.array_equal(pp.images, pois)
    assert pp.indices.tolist() == idx.tolist() and pp.poison_label == 2
    assert pp.target_label == 1 and pp.target_image.shape == (HW, HW, 3)

    out = tmp_path / "p.npz"
    assert _poison(tmp_path, "--attack", "gradient-matching", "--poisons", str(root),
                   "--target-class", "3", "--out", str(out)) == 0  # fmt: skip
    with np.load(out) as z:
        assert np.array_equal(z["y"], y)  # clean label: labels unchanged
        assert z["poison_idx"].tolist() == sorted(idx.tolist())
        assert str(z["attack"]) == "gradient-matching" and int(z["target_class"]) == 2
        assert int(z["target_index"]) == 3 and int(z["target_label"]) == 1
        assert np.array_equal(z["x"][idx], pois)
        rest = np.setdiff1d(np.arange(len(y)), idx)
        assert np.array_equal(z["x"][rest], x[rest])
        assert "trigger" not in z.files


def test_bullseye_polytope_unnormalises_as_the_authors_do(tmp_path):
    x, y = _train_set(tmp_path)
    root = tmp_path / "poisons"
    path, idx, norm = _bp_file(root, x, y)
    pp = P.load_bullseye_polytope(path)
    # torchvision's Normalize(-mean/std, 1/std) then ToPILImage (mul(255).byte()), op for op
    m = torch.tensor([-a / b for a, b in zip(P.CIFAR_MEAN, P.CIFAR_STD)])[:, None, None]
    s = torch.tensor([1 / b for b in P.CIFAR_STD])[:, None, None]
    want = ((norm - m) / s).mul(255).byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(pp.images, want)
    assert np.abs(pp.images.astype(int) - x[idx].astype(int)).max() <= 20
    out = tmp_path / "p.npz"
    assert _poison(tmp_path, "--attack", "bullseye-polytope", "--poisons", str(root),
                   "--target-class", "5", "--out", str(out)) == 0  # fmt: skip
    with np.load(out) as z:
        assert np.array_equal(z["y"], y) and z["poison_idx"].tolist() == idx.tolist()
        assert np.array_equal(z["x"][idx], want) and int(z["target_class"]) == 3


def test_narcissus_from_a_local_copy_and_from_the_hub_cache(tmp_path, monkeypatch):
    x, y = _train_set(tmp_path)
    root = tmp_path / "data" / "PureGen_Poisons"  # the authors' <data_dir> layout
    _, trig = _narcissus_file(root, 2)
    out = tmp_path / "p.npz"
    assert _poison(tmp_path, "--attack", "narcissus", "--poisons", str(tmp_path / "data"),
                   "--narcissus-size", str(HW), "--target-class", "2", "--count", "3",
                   "--out", str(out)) == 0  # fmt: skip
    with np.load(out) as z:
        assert z["poison_idx"].tolist() == [27, 28, 29] and np.array_equal(z["y"], y)
        assert np.array_equal(z["x"][27:30], apply_trigger(x[27:30], trig))
        assert np.array_equal(z["trigger"], trig)

    # hf:owner/name offline, served from a Hugging Face cache that holds the file
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    snap = cache / "datasets--SunayBhat1--puregen-poisons" / "snapshots" / ("a" * 40)
    _narcissus_file(snap, 2)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    spec = P.PoisonSpec("narcissus", "cifar10", 2, narcissus_size=HW)
    assert P.locate_poisons(spec) == snap
    assert np.array_equal(P.load_narcissus(snap / spec.required_files()[0]), trig)


# ----------------------------------------------------------------------------- hostile pickles


class _WritesMarker:
    """Writes a marker file when it is built from its pickle (an attacker's payload)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


class _MarkerState:
    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state):
        Path(state["path"]).write_text("pwned")


@pytest.mark.parametrize(
    "payload, global_name, live",
    [
        (lambda m: [(_WritesMarker(m), 2)], "write_text", True),
        (lambda m: _MarkerState(m), "_MarkerState", True),
        (lambda m: [(Image.new("RGB", (HW, HW)), 2), os.system], f"{os.name}.system", False),
        (lambda m: [(eval, 1)], "builtins.eval", False),
    ],
)
def test_hostile_pickle_is_refused_and_not_run(tmp_path, capsys, payload, global_name, live):
    x, y = _train_set(tmp_path)
    root = tmp_path / "poisons"
    d, _, _ = _gm_folder(root, x, y)
    marker = tmp_path / "marker"
    obj = payload(str(marker))
    with open(d / "poisons.pickle", "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    if live:  # the payload is real: plain pickle runs it and writes the marker
        pickle.loads((d / "poisons.pickle").read_bytes())
        assert marker.exists()
        marker.unlink()
    rc = _poison(tmp_path, "--attack", "gradient-matching", "--poisons", str(root),
                 "--target-class", "3", "--out", str(tmp_path / "p.npz"))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "refused to unpickle the global" in err and global_name in err
    assert str(d / "poisons.pickle") in err
    assert not marker.exists()
    assert not (tmp_path / "p.npz").exists()
    with pytest.raises(P.UnsafePickleError):
        P.safe_unpickle(d / "poisons.pickle")


def test_allowed_globals_cannot_be_abused(tmp_path):
    # object state for a builtin container, a numpy dtype holding objects, an image with a
    # mode PIL would decode, and a pixel count over the cap: refused, exit 2 material
    def dump(obj_bytes: bytes) -> Path:
        p = tmp_path / "x.pickle"
        p.write_bytes(obj_bytes)
        return p

    build_on_set = b"\x80\x04c__builtin__\nset\n)R}b."  # set() then BUILD {} on it
    cases = {
        "object state": build_on_set.replace(b"__builtin__", b"builtins"),
        "numpy.dtype": pickle.dumps(np.array([{}, 1], dtype=object), protocol=2),
        "mode": pickle.dumps(Image.new("I;16", (2, 2)), protocol=4),
        "over the cap": pickle.dumps(Image.new("RGB", (2048, 1024)), protocol=4),
    }
    for needle, data in cases.items():
        with pytest.raises(P.UsageError) as info:
            P.safe_unpickle(dump(data))
        assert needle in str(info.value), (needle, str(info.value))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_exits_2_naming_it(tmp_path, capsys):
    x, y = _train_set(tmp_path)
    root = tmp_path / "poisons"
    _gm_folder(root, x, y, trial=3)
    common = ["--poisons", str(root), "--out", str(tmp_path / "p.npz")]

    def err_of(*args: str) -> str:
        assert _poison(tmp_path, *args, *common) == 2
        return capsys.readouterr().err

    assert "invalid choice: 'poison-frogs'" in err_of("--attack", "poison-frogs",
                                                      "--target-class", "0")  # fmt: skip
    assert "--target-class 10" in err_of("--attack", "narcissus", "--target-class", "10")
    assert "--target-class 100" in err_of("--attack", "gradient-matching", "--target-class", "100")
    assert "--target-class 48" in err_of("--attack", "bullseye-polytope", "--target-class", "48")
    # a trial that is not there: one message listing every file and where it goes
    e = err_of("--attack", "gradient-matching", "--target-class", "7")
    assert "2 file(s)" in e
    for f in ("poisons.pickle", "base_indices.pickle"):
        assert str(root / "GradientMatching" / "cifar10" / "7" / f) in e
    assert "download SunayBhat1/puregen-poisons --repo-type dataset" in e
    # poisons for another data set: another folder, and content that does not fit the set
    e = err_of("--attack", "narcissus", "--target-class", "1")
    assert "1 file(s)" in e and "best_noise_lab1.npy" in e
    other = tmp_path / "other"
    (other / "Narcissus" / "tinyimagenet" / "size=32_eps=8").mkdir(parents=True)
    assert _poison(tmp_path, "--attack", "narcissus", "--target-class", "1", "--poisons",
                   str(other), "--out", str(tmp_path / "p.npz")) == 2  # fmt: skip
    e = capsys.readouterr().err
    assert "for tinyimagenet, not for cifar10" in e and "another data set" in e
    _narcissus_file(root, 1, size=32)  # a 32x32 trigger, 8x8 images
    e = err_of("--attack", "narcissus", "--target-class", "1", "--narcissus-size", "32")
    assert "another data set" in e and "32x32" in e
    y2 = np.roll(y, 5)  # the same images in another order: poisons land on other classes
    np.savez(tmp_path / "train.npz", x=x, y=y2, classes=np.array(["a", "b", "c", "d"]))
    e = err_of("--attack", "gradient-matching", "--target-class", "3")
    assert "another data set or image order" in e
    assert not (tmp_path / "p.npz").exists()
    # the dataset name cannot be guessed from npz; --trigger and --attack exclude each other
    argv = ["eval", "poison", "--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"),
            "--attack", "narcissus", "--target-class", "1", *common]  # fmt: skip
    assert main(argv) == 2 and "--poisons-dataset" in capsys.readouterr().err
    assert _poison(tmp_path, "--attack", "narcissus", "--trigger", "t.npy",
                   "--target-class", "1", *common) == 2  # fmt: skip
    assert "exclude each other" in capsys.readouterr().err


def test_offline_hub_lists_every_missing_file(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    _train_set(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert _poison(tmp_path, "--attack", "gradient-matching", "--target-class", "0",
                   "--out", str(tmp_path / "p.npz")) == 2  # fmt: skip
    e = capsys.readouterr().err
    assert "could not fetch from the Hugging Face Hub" in e and "2 file(s)" in e
    for f in ("poisons.pickle", "base_indices.pickle"):
        assert f"puregen-poisons/GradientMatching/cifar10/0/{f}" in e
    assert "--poisons puregen-poisons" in e
    assert e.count("puregen-fast eval: error") == 1  # one message
