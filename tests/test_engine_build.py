"""One way from settings to an engine (issue 23 item 3): `load_models` loads what a method's row
uses, `Purifier.from_config` builds the engine the keyword constructor builds, and `describe`
is `identity` (what decides the bytes) plus the diagnostic notes, with no key in both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import puregen_fast as pg
from puregen_fast.config import EngineConfig, PurifyConfig
from puregen_fast.errors import UsageError
from puregen_fast.models.unet import UNET_PRESETS
from puregen_fast.purifier import load_models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    pg.save_ebm(pg.EBMSNGAN32(nf=8), root / "ebm")
    pg.save_ddpm(pg.UNet2D.from_config({**UNET_PRESETS["tiny"], "sample_size": 32}), root / "unet")
    return str(root / "ebm"), str(root / "unet")


@pytest.mark.parametrize("method, ddpm_given, want", [
    ("ebm", False, (True, False)), ("ddpm", True, (False, True)),
    ("ebm+ddpm", True, (True, True)), ("filt", False, (True, False)),
    ("filt", True, (True, True)), ("jpeg", True, (False, False)),
])  # fmt: skip
def test_load_models_loads_what_the_row_uses(sources, method, ddpm_given, want):
    ebm, ddpm = sources
    seen = []

    def attempt(flag, load):
        seen.append(flag)
        return load()

    m = load_models(method, ebm, ddpm if ddpm_given else None, attempt=attempt)
    assert (m.ebm is not None, m.ddpm is not None) == want
    assert seen == [f for f, used in zip(("--ebm", "--ddpm"), want) if used]
    several = load_models([method, "ebm"], ebm, ddpm if ddpm_given else None)  # any of them
    assert several.ebm is not None and (several.ddpm is not None) == want[1]


def test_load_models_names_the_flag_of_a_missing_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="--ddpm"):
        load_models("ddpm", ddpm=str(tmp_path / "nowhere"))
    problems = []

    def keep(flag, load):  # the command's way: keep the problem, report them all at once
        try:
            return load()
        except UsageError as e:
            problems.append((flag, str(e)))
            return None

    m = load_models("ebm+ddpm", str(tmp_path / "a"), str(tmp_path / "b"), attempt=keep)
    assert m == (None, None) and [f for f, _ in problems] == ["--ebm", "--ddpm"]


def test_from_config_builds_the_keyword_engine(sources):
    ebm, ddpm = load_models("ebm+ddpm", *sources)
    kw = dict(method="ebm+ddpm", ebm_steps=2, ddpm_steps=3, seed=4, backend="reference")
    by_kw = pg.Purifier(ebm=ebm, ddpm=ddpm, device="cpu", **kw)
    cfg = PurifyConfig(dataset="cifar10", out="o", ebm=sources[0], ddpm=sources[1], **kw)
    by_cfg = pg.Purifier.from_config(cfg, ebm, ddpm, device=torch.device("cpu"))
    assert type(by_cfg.config) is EngineConfig  # the data and run options stay behind
    assert by_cfg.config == by_kw.config and by_cfg.identity() == by_kw.identity()
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(by_cfg(x, [0, 1]), by_kw(x, [0, 1]))
    same = pg.Purifier.from_config(by_kw.config, ebm, ddpm)  # an EngineConfig as it is
    assert same.config == by_kw.config


def test_describe_is_identity_and_notes(sources):
    ebm, ddpm = load_models("filt", *sources)
    p = pg.Purifier.from_config(EngineConfig(method="filt", device="cpu", ebm_steps=1), ebm, ddpm)
    settings, notes = p._record()
    assert p.identity() == settings
    flat = set(settings) - {"ebm", "ddpm", "device"}
    assert not flat & set(notes)  # every value in one of the two (device: type vs in full)
    for k in ("ebm", "ddpm"):
        assert not set(settings[k]) & set(notes[k])
        assert p.describe()[k] == {**settings[k], **notes[k]}
    assert p.describe()["device"] == "cpu" and p.identity()["device"] == "cpu"
    assert p.describe()["ebm"]["source"] == sources[0]
    assert "source" not in p.identity()["ebm"] and "backend_reason" not in p.identity()
