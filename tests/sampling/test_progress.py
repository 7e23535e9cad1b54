"""Progress that moves within a batch (issue 24 item 3): every loop that runs chain steps (the
reference and fast samplers, Langevin and DDPM, the engine, the pipeline's bar) reports the
steps as the host issues them, the outputs are the same bytes with and without a callback, and a
CUDA graph reports its replay whole, once, after launching it (nothing inside the capture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import puregen_fast as pg
from puregen_fast.data.datasets import Dataset
from puregen_fast.models.unet import UNET_PRESETS
from puregen_fast.pipeline import _Steps, purify_dataset
from puregen_fast.sampling.backends import DDPMSampler, LangevinSampler

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([3, 9, 11])


@pytest.fixture(scope="module")
def ebm():
    torch.manual_seed(0)
    return pg.EBMSNGAN32(nf=8).eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = pg.UNet2D.from_config({**UNET_PRESETS["tiny"], "sample_size": 16}).eval()
    with torch.no_grad():
        for p in model.parameters():  # conv_out starts at zero: make every layer count
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(3, 3, 16, 16) * 2 - 1


class Record:
    """A progress callback keeping the running count at each call."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, k: int) -> None:
        self.seen.append((self.seen[-1] if self.seen else 0) + k)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_langevin_reports_each_step_and_keeps_the_bytes(ebm, x, backend):
    s = LangevinSampler(ebm, steps=6, eps=0.05, backend=backend, compile=False)
    rec = Record()
    with_progress = s(x, IDS, progress=rec)
    assert rec.seen == [1, 2, 3, 4, 5, 6]  # moved before the batch was done
    assert torch.equal(with_progress, s(x, IDS))


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_ddpm_reports_each_reverse_step_and_keeps_the_bytes(unet, x, backend):
    d = DDPMSampler(unet, pg.DDPMSchedule(), steps=4, backend=backend, compile=False)
    rec = Record()
    with_progress = d(x, IDS, progress=rec)
    assert rec.seen == [1, 2, 3, 4]
    assert torch.equal(with_progress, d(x, IDS))


def test_the_engine_counts_to_its_chain_steps(ebm, unet, x):
    u8 = ((x[:2].permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    p = pg.Purifier(method="reps", ebm=ebm, ddpm=unet, ebm_steps=3, ddpm_steps=2, reps=2,
                    ebm_eps=0.05, backend="reference", device="cpu")  # fmt: skip
    assert p.chain_steps == 2 * (3 + 2)
    rec = Record()
    out = p(u8, [0, 1], progress=rec)
    assert rec.seen == list(range(1, 11))  # strictly increasing, within the one batch
    assert np.array_equal(out, p(u8, [0, 1]))
    assert pg.Purifier(method="jpeg").chain_steps == 0


def test_steps_move_the_bar_by_the_batch_and_finish_it_exactly():
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    s = _Steps(bar, images=5, per_image=4)
    s(1)
    assert bar.n == 5
    s(10)  # more than the batch has: capped
    assert bar.n == 20
    s.finish()
    assert bar.n == 20
    s = _Steps(bar, images=3, per_image=4)  # filt where no image passes: no step reported
    s.finish()
    assert bar.n == 32


def _dataset(n: int = 6) -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return Dataset("npz", "train", images, np.zeros(n, np.int64), ["a"], source="memory")


class Spy:
    """A purifier that records what progress it was given, and passes everything on."""

    def __init__(self, p):
        self.p, self.calls = p, []

    def __getattr__(self, name):
        return getattr(self.p, name)

    def __call__(self, x, ids, **kw):
        rec = Record()
        if "progress" in kw:
            given = kw.pop("progress")

            def both(k):
                rec(k)
                given(k)

            kw["progress"] = both
        out = self.p(x, ids, **kw)
        self.calls.append(rec.seen)
        return out


def test_the_pipeline_bar_moves_within_a_batch_and_quiet_prints_nothing(ebm, tmp_path, capfd):
    ds = _dataset()
    make = lambda: pg.Purifier(method="ebm", ebm=ebm, ebm_steps=5, ebm_eps=0.05,  # noqa: E731
                               backend="reference", device="cpu")  # fmt: skip
    loud = Spy(make())
    purify_dataset(ds, loud, tmp_path / "loud", batch_size=6)
    assert loud.calls == [[1, 2, 3, 4, 5]]  # one batch, five moves
    err = capfd.readouterr().err
    assert "6.0/6" in err and "purify" in err
    quiet = Spy(make())
    purify_dataset(ds, quiet, tmp_path / "quiet", batch_size=6, quiet=True)
    assert quiet.calls == [[]]  # no callback at all
    assert capfd.readouterr().err == ""
    a, b = pg.load_purified(tmp_path / "loud"), pg.load_purified(tmp_path / "quiet")
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_graph_reports_its_replay_once_and_keeps_the_bytes(ebm, unet, x):
    dev = torch.device("cuda")
    s = LangevinSampler(ebm.to(dev), steps=6, eps=0.05, device=dev, backend="fast")
    xd, ids = x.to(dev), IDS.to(dev)
    plain = s(xd, ids)  # captures the graph (no callback inside the capture)
    rec = Record()
    assert torch.equal(s(xd, ids, progress=rec), plain)
    assert rec.seen == [6] and s.captures == 1
    d = DDPMSampler(unet.to(dev), pg.DDPMSchedule(), steps=4, device=dev, backend="fast")
    plain = d(xd, ids)
    rec = Record()
    assert torch.equal(d(xd, ids, progress=rec), plain)
    assert rec.seen == [4]
