"""The table of purification methods (`puregen_fast.methods`, issue 23): a method made of
existing stages is one row, and every way in takes it (``purify``, `Purifier`, `PurifyBatches`,
``eval experiment``); the README's method table is the table's help lines; bad rows are
refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import puregen_fast as pg
from puregen_fast import methods
from puregen_fast.cli.main import main
from puregen_fast.integrations.ray_data import PurifyBatches
from puregen_fast.methods import Method

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# a throwaway method made of existing stages: the EBM's chain, then the JPEG baseline
THROWAWAY = Method("ebm-then-jpeg", models=("ebm",), stages=("ebm", "jpeg"),
                   help="EBM steps, then a JPEG re-encode (a test's method)")  # fmt: skip


@pytest.fixture
def throwaway():
    """The row, registered for one test and removed afterwards: nothing else is edited."""
    methods.register(THROWAWAY)
    try:
        yield THROWAWAY.name
    finally:
        methods.unregister(THROWAWAY.name)
    assert THROWAWAY.name not in methods.METHOD_NAMES


@pytest.fixture(scope="module")
def ebm_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), root / "ebm")
    return root / "ebm"


def _images(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _engine(method: str, ebm_dir: Path, **kw) -> pg.Purifier:
    return pg.Purifier(method=method, ebm=pg.load_ebm(ebm_dir), ebm_steps=2, seed=4,
                       jpeg_quality=40, backend="reference", device="cpu", **kw)  # fmt: skip


def test_a_registered_method_runs_everywhere(throwaway, ebm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))
    x, ids = _images(), np.arange(10)
    # the Python API: the row's stages in order, i.e. the EBM's output through the JPEG stage
    ebm_only = _engine("ebm", ebm_dir)(x, ids)
    want = _engine("jpeg", ebm_dir)(ebm_only, ids)
    p = _engine(throwaway, ebm_dir)
    got = p(x, ids)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, ebm_only)  # the JPEG stage ran
    d = p.describe()
    assert d["method"] == throwaway and d["jpeg_quality"] == 40 and d["ebm"]["steps"] == 2
    assert p.uses_ebm and not p.uses_ddpm

    # the command: the flag takes it, --help lists it, and the bytes are the API's
    with pytest.raises(SystemExit):
        main(["purify", "--help"])
    assert throwaway in "".join(capsys.readouterr().out.split())  # help wraps at hyphens
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=np.arange(10) % 2)
    argv = ["purify", "--dataset", "npz", "--data-dir", str(data), "--method", throwaway,
            "--ebm", str(ebm_dir), "--ebm-steps", "2", "--seed", "4", "--jpeg-quality", "40",
            "--backend", "reference", "--device", "cpu", "--batch-size", "4", "--quiet",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    out = pg.load_purified(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(out.images), want)
    assert out.manifest["config"]["method"] == throwaway

    # Ray Data's callable class: the same bytes from uneven batches
    fn = PurifyBatches(method=throwaway, ebm=str(ebm_dir), ebm_steps=2, seed=4, jpeg_quality=40,
                       backend="reference", device="cpu", batch_size=4)  # fmt: skip
    parts = [fn({"image": x[s:e], "id": ids[s:e]})["image"] for s, e in ((0, 3), (3, 10))]
    np.testing.assert_array_equal(np.concatenate(parts), want)


def test_a_registered_method_is_a_defense_of_eval_experiment(throwaway, ebm_dir, tmp_path,
                                                              capsys):  # fmt: skip
    rng = np.random.default_rng(1)
    for split, n in (("train", 40), ("test", 12)):
        np.savez(tmp_path / f"{split}.npz", x=_images(n, seed=n), y=rng.permutation(n) % 2)
    trig = np.zeros((1, 3, 16, 16), np.float32)
    trig[0, :, ::2, ::2] = 0.5
    np.save(tmp_path / "trigger.npy", trig)
    with pytest.raises(SystemExit):
        main(["eval", "experiment", "--help"])
    assert throwaway in "".join(capsys.readouterr().out.split())  # help wraps at hyphens
    out = tmp_path / "exp"
    argv = ["eval", "experiment", "--dataset", "npz", "--data-dir", str(tmp_path / "train.npz"),
            "--test-dataset", "npz", "--test-data-dir", str(tmp_path / "test.npz"),
            "--trigger", str(tmp_path / "trigger.npy"), "--target-class", "1", "--count", "5",
            "--defenses", f"none,{throwaway}", "--ebm", str(ebm_dir), "--ebm-steps", "2",
            "--jpeg-quality", "40", "--sweep", "jpeg-quality=30,40", "--backend", "reference",
            "--classifier", "airbench:widths=8/8/8,steps=4,batch_size=20", "--seeds", "0",
            "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    # the sweep of a setting the row reads gives a row per value (and none is not swept)
    rows = [r["defense"] for r in res["summary"]]
    assert rows == ["clean", "none", f"{throwaway} (jpeg-quality=30)",
                    f"{throwaway} (jpeg-quality=40)"]  # fmt: skip
    manifests = [json.loads(m.read_text()) for m in out.glob("poison-*/*/manifest.json")]
    ran = [m["purifier"] for m in manifests if m["config"]["method"] == throwaway]
    assert sorted(p["jpeg_quality"] for p in ran) == [30, 40]
    assert all(p["ebm"]["steps"] == 2 for p in ran)


def test_readme_method_table_is_the_registry():
    """The README's table of methods is the table's rows, in order (the message gives it)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Methods"):]
    lines = section.splitlines()
    start = lines.index("| method | what it does |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    want = [f"| `{m.name}` | {m.help} |" for m in methods.methods()]
    assert rows == want, "README's method table should read:\n" + "\n".join(want)


def test_registry_rows_are_checked(throwaway):
    ok = dict(models=("ebm",), stages=("ebm",), help="h")
    with pytest.raises(ValueError, match="exists already"):
        methods.register(Method(throwaway, **ok))
    bad = [
        (dict(name="a b", **ok), "letters, digits"),
        (dict(name="x", models=("ebm",), stages=("ebm", "blur"), help="h"), "unknown stage"),
        (dict(name="x", models=("ebm",), stages=("ebm", "ebm"), help="h"), "listed twice"),
        (dict(name="x", models=("ebm",), stages=("ebm", "filter"), help="h"), "first stage"),
        (dict(name="x", models=(), stages=("ddpm",), help="h"), "neither needs nor takes"),
        (dict(name="x", models=("ddpm",), stages=("jpeg",), help="h"), "no stage runs it"),
        (dict(name="x", models=("vae",), stages=(), help="h"), "models are"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            Method(**kw)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get("nope")


def test_the_rows_say_what_the_engine_needs():
    filt = methods.get("filt")
    assert filt.filters and filt.uses("ebm") and not filt.uses("ddpm")
    assert filt.uses("ddpm", given=True)
    # filt's DDPM is optional: its steps change filt only when one is given
    assert "ddpm_steps" in filt.settings and "ddpm_steps" not in filt.required_settings
    assert methods.get("reps").recorded == ("reps",)
    assert [m.name for m in methods.methods() if m.model_free] == ["jpeg", "none"]
    assert pg.PurifyConfig(method="filt", dataset="cifar10", out="o", ddpm="d").uses == (
        True, True)  # fmt: skip
