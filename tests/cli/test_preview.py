"""``purify --preview N`` and `puregen_fast.data.preview` (issue 24 item 2): the choice of
images, the figure data the API returns and the command draws, deterministic picture bytes (a
resumed run and the other output formats write the same file), no picture of a failed run, and
exit 2 naming --preview for a bad N."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.data.preview import PREVIEW, make_preview, preview_ids, read_rows
from puregen_fast.eval.metrics import image_change
from puregen_fast.pipeline import preview_title

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    yy, xx = np.mgrid[:16, :16]
    x = np.stack([np.stack([xx * 16, yy * 16, (xx + yy + 7 * i) % 32 * 8], -1)
                  for i in range(20)]).astype(np.uint8)  # fmt: skip
    np.savez(root / "d.npz", x=x, y=np.arange(20) % 4)
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), root / "ebm")
    return SimpleNamespace(root=root, x=x, data=root / "d.npz", ebm=root / "ebm")


@pytest.fixture(autouse=True)
def _cache(env, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(env.root / "cache"))


def purify(env, out, *extra) -> int:
    argv = ["purify", "--dataset", "npz", "--data-dir", str(env.data), "--method", "ebm",
            "--ebm", str(env.ebm), "--ebm-steps", "2", "--ebm-eps", "0.05", "--backend",
            "reference", "--device", "cpu", "--quiet", "--batch-size", "4", "--shard-size", "8",
            "--out", str(out), *extra]  # fmt: skip
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own exit
        return int(e.code)


def test_ids_are_evenly_spaced_and_depend_on_the_count_alone():
    assert preview_ids(20, 4).tolist() == [2, 7, 12, 17]  # the middle of each fifth
    assert preview_ids(5, 8).tolist() == [0, 1, 2, 3, 4]  # more asked than there are: all
    assert preview_ids(7, 1).tolist() == [3]
    for n in (1, 2, 9, 1000):
        for k in (1, 3, 64):
            ids = preview_ids(n, k)
            assert len(set(ids.tolist())) == min(n, k) and ids.min() >= 0 and ids.max() < n
    with pytest.raises(ValueError):
        preview_ids(0, 3)
    with pytest.raises(ValueError):
        preview_ids(5, 0)


def test_figure_data_and_bytes():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[3] = 255 - b[3]
    pv = make_preview(a, b, 5)
    assert pv.ids.tolist() == [1, 3, 5, 7, 9]
    assert np.array_equal(pv.originals, a[pv.ids]) and np.array_equal(pv.purified, b[pv.ids])
    for i, j in enumerate(pv.ids):  # the RMS of eval's image_change, image by image
        assert pv.rms[i] == pytest.approx(image_change(a[j : j + 1], b[j : j + 1])["rms"])
    assert pv.rms[0] == 0 and pv.rms[1] > 0
    png = pv.png("t")
    assert png == make_preview(a, b, 5).png("t")  # deterministic bytes
    im = Image.open(io.BytesIO(png))
    assert im.mode == "RGB" and im.size[0] > 5 * 8 and im.size[1] > 2 * 8
    with pytest.raises(ValueError, match="length"):
        make_preview(a, b[:5], 2)
    with pytest.raises(ValueError, match="uint8"):
        make_preview(a.astype(np.float32), b.astype(np.float32), 2)


def test_streamed_sets_are_read_forward():
    class Streamed:  # a WebDataset-like set: slices only
        def __init__(self, x):
            self.x, self.reads = x, []

        def __len__(self):
            return len(self.x)

        def __getitem__(self, key):
            assert isinstance(key, slice)
            self.reads.append(key.start)
            return self.x[key]

    x = np.arange(3000 * 3, dtype=np.uint8).reshape(3000, 1, 1, 3)
    s = Streamed(x)
    assert np.array_equal(read_rows(s, [5, 1500, 2999]), x[[5, 1500, 2999]])
    assert s.reads == sorted(s.reads)


def test_purify_preview_is_the_api_figure_and_resumes_to_the_same_bytes(env, tmp_path):
    out = tmp_path / "o"
    assert purify(env, out, "--preview", "5") == 0
    png = (out / PREVIEW).read_bytes()
    data = pg.load_purified(out)
    pv = make_preview(env.x, data.images, 5)
    assert pv.ids.tolist() == [2, 6, 10, 14, 18]
    assert png == pv.png(preview_title("ebm", 0, 5, 20))
    assert (pv.rms > 0).all()
    # resumed after a shard was lost: the same picture
    (out / "images-00001.npy").unlink()
    assert purify(env, out, "--preview", "5", "--resume") == 0
    assert pg.load_purified(out).manifest["timings"]["images_purified"] == 8
    assert (out / PREVIEW).read_bytes() == png
    # another output format holds the same images: the same picture
    for fmt in ("png", "webdataset"):
        other = tmp_path / fmt
        assert purify(env, other, "--preview", "5", "--format", fmt) == 0
        assert (other / PREVIEW).read_bytes() == png, fmt
    # a run without --preview leaves none behind
    assert purify(env, out, "--resume") == 0
    assert not (out / PREVIEW).exists()


def test_no_preview_of_a_failed_run(env, tmp_path, capsys):
    out = tmp_path / "o"
    assert purify(env, out, "--preview", "3") == 0 and (out / PREVIEW).exists()
    # the same folder overwritten by a run that diverges: no picture of it, and none older
    assert purify(env, out, "--preview", "3", "--overwrite", "--ebm-eps", "1e6") == 2
    assert "diverged" in capsys.readouterr().err
    assert not (out / PREVIEW).exists() and not (out / "manifest.json").exists()


@pytest.mark.parametrize("value", ["0", "65", "-1", "x", "nan", "2.5"])
def test_bad_preview_exit_2_names_the_flag(env, tmp_path, capsys, value):
    assert purify(env, tmp_path / "o", "--preview", value) == 2
    err = capsys.readouterr().err
    assert "--preview" in err and "[1, 64]" in err
    assert not (tmp_path / "o").exists()


def test_the_python_pipeline_checks_its_preview(env, tmp_path):
    from puregen_fast.data.datasets import open_dataset
    from puregen_fast.pipeline import purify_dataset

    ds = open_dataset("npz", env.data, "train", quiet=True)
    p = pg.Purifier(method="none")
    with pytest.raises(pg.UsageError, match="--preview"):
        purify_dataset(ds, p, tmp_path / "o", preview=0, quiet=True)
    purify_dataset(ds, p, tmp_path / "o", preview=64, quiet=True)
    with Image.open(tmp_path / "o" / PREVIEW) as pv:  # closed: no ResourceWarning
        assert pv.size[0] > 16 * 16  # 20 images: rows of 16 pairs
