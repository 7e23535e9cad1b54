"""The Purifier engine with the reference backend: batching independence, methods, bad input."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import puregen_fast as pg


class TinyEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return pg.EBMSNGAN32(nf=8), TinyEps()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)


def run_in_batches(p, imgs, bs):
    ids = np.arange(len(imgs)) + 1000
    return np.concatenate([p(imgs[i : i + bs], ids[i : i + bs]) for i in range(0, len(imgs), bs)])


@pytest.mark.parametrize("method", ["ebm", "ebm+ddpm", "reps"])
def test_batch_size_does_not_change_an_images_noise(models, images, method):
    ebm, unet = models
    kw = dict(
        ebm=ebm, ddpm=unet, ebm_steps=3, ddpm_steps=4, seed=3, backend="reference", device="cpu"
    )
    if method == "reps":
        kw["reps"] = 2
    p = pg.Purifier(method, **kw)
    outs = {bs: run_in_batches(p, images, bs) for bs in (1, 7, 64)}
    for bs in (1, 7):
        diff = np.abs(outs[bs].astype(int) - outs[64].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (bs, diff.max(), (diff > 0).mean())
    # equal batch sizes: byte-identical
    assert np.array_equal(run_in_batches(p, images, 7), outs[7])
    # another seed differs
    p2 = pg.Purifier(method, **{**kw, "seed": 4})
    assert not np.array_equal(run_in_batches(p2, images, 64), outs[64])
    assert not np.array_equal(outs[64], images)


def test_float_nchw_in_float_out_and_torch_in_torch_out(models, images):
    p = pg.Purifier("ebm", ebm=models[0], ebm_steps=2, backend="reference", device="cpu")
    u8 = torch.from_numpy(images[:4])
    f = u8.permute(0, 3, 1, 2).float() / 255
    out_f = p(f, [0, 1, 2, 3])
    out_u8 = p(u8, [0, 1, 2, 3])
    assert (
        out_f.dtype == torch.float32 and out_f.shape == f.shape and isinstance(out_u8, torch.Tensor)
    )
    assert 0 <= float(out_f.min()) and float(out_f.max()) <= 1
    assert out_u8.dtype == torch.uint8 and out_u8.shape == u8.shape
    assert torch.equal(torch.round(out_f * 255).to(torch.uint8).permute(0, 2, 3, 1), out_u8)


def test_none_is_identity_and_jpeg_matches_reference(models, images):
    p = pg.Purifier("none", device="cpu")
    assert np.array_equal(p(images[:5], range(5)), images[:5])
    j = pg.Purifier("jpeg", jpeg_quality=60, device="cpu")
    assert np.array_equal(j(images[:5], range(5)), pg.reference.jpeg(images[:5], 60))


def test_filt_purifies_only_high_energy_images(models, images):
    ebm = models[0]
    p = pg.Purifier(
        "filt", ebm=ebm, ebm_steps=2, filter_frac=0.25, backend="reference", device="cpu"
    )
    e = p.energy(images[:8])
    out = p(images[:8], range(8))
    changed = np.array([not np.array_equal(out[i], images[i]) for i in range(8)])
    top = np.argsort(-e, kind="stable")[:2]
    assert changed.sum() == 2 and changed[top].all()
    # with a global threshold, the choice no longer depends on the batch
    thr = float(np.sort(e)[-3])
    im8 = images[:8]
    out = np.concatenate(
        [p(im8[i : i + 3], range(i, min(i + 3, 8)), filter_threshold=thr) for i in range(0, 8, 3)]
    )
    changed = np.array([not np.array_equal(out[i], images[i]) for i in range(8)])
    assert np.array_equal(changed, e >= thr)


def test_filt_tells_the_fast_sampler_the_full_batch(models, images):
    """The filtered subset's size varies by batch; the fast sampler gets the batch size as a
    capture hint (`LoopGraphs` pad_to), so CUDA graphs and compiles stay bounded."""
    p = pg.Purifier("filt", ebm=models[0], ebm_steps=1, filter_frac=0.25, device="cpu",
                    backend="fast")  # auto would weigh 8 image-steps and take the reference
    assert p.backend == "fast"
    seen, real = [], p.sampler.ebm

    def spy(x, ids, stream, step_offset=0, pad_to=None):
        seen.append((x.shape[0], pad_to))
        return real(x, ids, stream, step_offset, pad_to)

    p.sampler.ebm = spy
    p(images[:8], range(8))
    assert seen == [(2, 8)]


def test_describe_is_json(models):
    p = pg.Purifier("ebm+ddpm", ebm=models[0], ddpm=models[1], backend="reference", device="cpu")
    d = json.loads(json.dumps(p.describe()))
    assert d["method"] == "ebm+ddpm" and d["ebm"]["steps"] == 150 and d["ddpm"]["steps"] == 75
    assert d["backend"] == "reference"


@pytest.mark.parametrize(
    "imgs, ids, msg",
    [
        (np.full((2, 8, 8, 3), 300, dtype=np.int64), [0, 1], r"\[0, 255\]"),
        (np.full((2, 3, 8, 8), 1.5, dtype=np.float32), [0, 1], r"\[0, 1\]"),
        (np.zeros((8, 8, 3), dtype=np.uint8), [0], "4-D"),
        (np.zeros((2, 8, 8, 4), dtype=np.uint8), [0, 1], "3 channels"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), [0], "2 images"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), [0, -1], "2\\*\\*48"),
    ],
)
def test_bad_images_are_refused(models, imgs, ids, msg):
    p = pg.Purifier("ebm", ebm=models[0], ebm_steps=1, backend="reference", device="cpu")
    with pytest.raises(ValueError, match=msg):
        p(imgs, ids)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"method": "magic"}, "method must be one of"),
        ({"method": "ebm"}, "needs an EBM"),
        ({"method": "ddpm"}, "needs a DDPM"),
        ({"method": "jpeg", "jpeg_quality": 0}, "jpeg_quality"),
        ({"method": "none", "precision": "fp8"}, "precision"),
        ({"method": "none", "backend": "tpu"}, "backend"),
        ({"method": "none", "reps": 2}, "reps"),
    ],
)
def test_bad_configuration_is_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        pg.Purifier(device="cpu", **kwargs)


def test_unusual_numpy_layouts_are_accepted(models, images):
    # negative strides, non-native byte order and read-only memory: copied only as needed
    p = pg.Purifier("ebm", ebm=models[0], ebm_steps=1, backend="reference", device="cpu")
    x = images[:3]
    ref = p(np.ascontiguousarray(x[:, :, ::-1]), range(3))
    assert np.array_equal(p(x[:, :, ::-1], range(3)), ref)
    ro = np.ascontiguousarray(x[:, :, ::-1])
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays
        assert np.array_equal(p(ro, range(3)), ref)
    f = (np.ascontiguousarray(x[:, :, ::-1]).transpose(0, 3, 1, 2) / 255).astype(">f4")
    assert f.dtype.byteorder == ">"
    assert np.array_equal(p(f, range(3)), p(f.astype(np.float32), range(3)))
    assert np.array_equal(p(x.astype(">i2")[:, :, ::-1], range(3)), ref)


def _scaled(model: nn.Module, factor: float) -> nn.Module:
    m = pg.EBMSNGAN32(nf=8)
    m.load_state_dict({k: v * factor if v.is_floating_point() else v
                       for k, v in model.state_dict().items()})  # fmt: skip
    return m


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize(
    "kwargs, flag_cause, names",
    [
        ({"ebm_eps": 1e6}, True, "--ebm-eps"),
        ({"ebm_temp": 1e-25}, True, "--ebm-temp"),  # the smallest temperatures allowed
        ({"scale": 1e6}, False, "--ebm"),
    ],
)
def test_divergence_is_refused_never_written(models, images, backend, kwargs, flag_cause, names):
    """DESIGN 2.4: a diverged chain raises, naming the images and the cause, on both backends;
    without the guard its NaN pixels would come back as black uint8."""
    kw = dict(kwargs)
    ebm = _scaled(models[0], kw.pop("scale")) if "scale" in kw else models[0]
    p = pg.Purifier("ebm", ebm=ebm, ebm_steps=2, backend=backend, device="cpu", **kw)
    with pytest.raises(pg.DivergenceError) as ei:
        p(images[:4], [10, 11, 12, 13])
    e = ei.value
    assert e.flag_cause is flag_cause and set(e.sample_ids) <= {10, 11, 12, 13} and e.sample_ids
    assert names in str(e) and "sample ids 1" in str(e)


def test_divergence_margin_is_an_option(models, images):
    # an untrained EBM moves states to about 2; a margin below that calls it a divergence
    p = pg.Purifier("ebm", ebm=models[0], ebm_steps=20, backend="reference", device="cpu")
    ok = p(images[:4], range(4))
    assert ok.dtype == np.uint8
    tight = pg.Purifier("ebm", ebm=models[0], ebm_steps=20, backend="reference", device="cpu",
                        divergence_margin=0.01)  # fmt: skip
    with pytest.raises(pg.DivergenceError, match="--divergence-margin") as e:
        tight(images[:4], range(4))
    # a margin tighter than the default is named as the cause (exit 2), not the model
    assert e.value.flag_cause and "Likely cause: --divergence-margin 0.01" in str(e.value)
    with pytest.raises(ValueError, match=r"divergence_margin.*in \[0.01, 1e6\]"):
        pg.Purifier("none", device="cpu", divergence_margin=1e-320)
    with pytest.raises(ValueError, match="divergence_margin"):
        pg.Purifier("none", device="cpu", divergence_margin=0)
