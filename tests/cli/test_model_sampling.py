"""A trained EBM carries its chain (sampling.json beside its weights): `purify`, the Python API
and Ray use it for every Langevin setting not given, print where each value came from, and a
flag overrides it; a bad file is exit 2 naming it."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_data import write_cinic10

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.errors import UsageError
from puregen_fast.models.checkpoints import SAMPLING, read_sampling

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    write_cinic10(root / "cinic", n_cifar=1, n_imagenet=1, seed=3)
    torch.manual_seed(0)
    ebm = pg.EBMSNGAN32(nf=8)
    pg.save_ebm(ebm, root / "own", sampling={"ebm_steps": 2, "ebm_eps": 5e-3, "ebm_temp": 1e-5,
                                              "why": "test"})  # fmt: skip
    pg.save_ebm(ebm, root / "plain")  # the same weights, no chain of its own
    return root


@pytest.fixture(autouse=True)
def _cache(env, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(env / "cache"))


def _purify(env, ebm, out, *extra):
    return main(["purify", "--dataset", "cinic10", "--data-dir", str(env / "cinic"), "--split",
                 "train", "--method", "ebm", "--ebm", str(env / ebm), "--backend", "reference",
                 "--device", "cpu", "--quiet", "--out", str(out), *extra])  # fmt: skip


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


def test_the_models_chain_is_used_and_said(env, tmp_path, capsys):
    assert _purify(env, "own", tmp_path / "a") == 0
    err = capsys.readouterr().err
    src = f"the EBM's {env / 'own' / SAMPLING}"
    assert f"Langevin chain: steps 2 ({src}), eps 0.005 ({src}), temp 1e-05 ({src})" in err
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    ebm = man["purifier"]["ebm"]
    assert (ebm["steps"], ebm["eps"], ebm["temp"]) == (2, 5e-3, 1e-5)
    assert ebm["sampling_from"]["ebm_steps"] == src
    # the same values given as flags to an EBM without a chain: the same bytes
    assert _purify(env, "plain", tmp_path / "b", "--ebm-steps", "2", "--ebm-eps", "5e-3",
                   "--ebm-temp", "1e-5") == 0  # fmt: skip
    assert "steps 2 (--ebm-steps)" in capsys.readouterr().err
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b")


def test_a_flag_overrides_the_models_chain(env, tmp_path, capsys):
    assert _purify(env, "own", tmp_path / "a", "--ebm-steps", "1") == 0
    err = capsys.readouterr().err
    assert "steps 1 (--ebm-steps)" in err and "eps 0.005 (the EBM's" in err
    # without sampling.json: the paper's values, and the log says so
    assert _purify(env, "plain", tmp_path / "b", "--ebm-steps", "1") == 0
    assert "eps 0.0125 (the paper's default), temp 0.0001 (the paper's default)" in (
        capsys.readouterr().err)  # fmt: skip


def test_the_python_api_uses_the_models_chain(env):
    ebm = pg.load_ebm(env / "own")
    p = pg.Purifier(method="ebm", ebm=ebm, device="cpu", backend="reference")
    assert (p.config.ebm_steps, p.config.ebm_eps, p.config.ebm_temp) == (2, 5e-3, 1e-5)
    q = pg.Purifier(method="ebm", ebm=ebm, device="cpu", backend="reference", ebm_temp=1e-4)
    assert q.config.ebm_temp == 1e-4 and q.sampling_from["ebm_temp"] == "given"
    plain = pg.Purifier(method="ebm", ebm=pg.load_ebm(env / "plain"), device="cpu",
                        backend="reference")
    assert (plain.config.ebm_steps, plain.config.ebm_eps) == (150, 1.25e-2)
    assert "sampling_from" not in plain.describe()["ebm"]  # the paper's: nothing to say
    assert "sampling_from" not in p.identity()["ebm"]  # not part of what decides the bytes


@pytest.mark.parametrize("doc, needle", [
    ({"ebm_steps": 0}, "'ebm_steps' must be a whole number"),
    ({"ebm_steps": 2.5}, "'ebm_steps' must be a whole number"),
    ({"ebm_steps": True}, "'ebm_steps' must be a whole number"),
    ({"ebm_eps": -1}, "'ebm_eps' must be a finite number > 0"),
    ({"ebm_temp": "1e-4"}, "'ebm_temp' must be a finite number > 0"),
    ({"ebm_eps": 1e400}, "'ebm_eps' must be a finite number > 0"),  # JSON's Infinity
    ([1, 2], "expected a JSON object"),
])  # fmt: skip
def test_a_bad_sampling_file_is_refused_naming_it(env, tmp_path, capsys, doc, needle):
    d = tmp_path / "ebm"
    pg.save_ebm(pg.EBMSNGAN32(nf=8), d)
    (d / SAMPLING).write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=needle):
        read_sampling(d / SAMPLING)
    rc = main(["purify", "--dataset", "cinic10", "--data-dir", str(env / "cinic"), "--split",
               "train", "--method", "ebm", "--ebm", str(d), "--backend", "reference",
               "--device", "cpu", "--quiet", "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 2 and SAMPLING in capsys.readouterr().err


def test_no_file_and_files_with_no_chain_key_mean_no_chain(tmp_path):
    assert read_sampling(tmp_path / SAMPLING) is None
    (tmp_path / SAMPLING).write_text(json.dumps({"why": "nothing"}))
    assert read_sampling(tmp_path / SAMPLING) is None
