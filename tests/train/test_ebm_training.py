"""`puregen-fast train ebm` (issue 6): learning, exact resume, purify from the output directory,
the divergence watch with rollback, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    final_and_initial,
    run_train,
    shapes,
    to_x,
    train_argv,
    weights,
    write_npz,
)

import puregen_fast as pg
from puregen_fast.cli.main import main
from puregen_fast.train import EBMConfig, TrainingDiverged, train_ebm
from puregen_fast.train import ebm as train_ebm_mod


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ebmdata")
    return write_npz(root / "shapes.npz", shapes(320, seed=0))


TINY = [
    "--nf", "8", "--bank-size", "64", "--batch-size", "16", "--mcmc-steps", "3",
    "--backend", "reference", "--device", "cpu", "--no-progress", "--log-every", "1",
]  # fmt: skip


def _train(data: Path, out: Path, *extra: str) -> int:
    return run_train("ebm", data, out, *TINY, *extra)


# -- acceptance 1: a trained EBM orders data < trigger-patched data, uniform noise ------------


def _trigger() -> torch.Tensor:
    """A fixed additive checkerboard in one corner (a backdoor-trigger stand-in)."""
    t = torch.zeros(1, 3, 16, 16)
    cb = ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 * 2 - 1).float() * 0.4
    t[0, :, 1:5, 1:5] = cb
    return t


def _ordering(ebm: torch.nn.Module, held: torch.Tensor) -> dict[str, float]:
    noise = torch.rand(held.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        e, e_noise, e_trig = ebm(held), ebm(noise), ebm((held + _trigger()).clamp(-1, 1))
    scale = float(e.std())
    return {
        "noise_margin": float(e_noise.mean() - e.mean()) / scale,  # in held-out std units
        "trigger_margin": float((e_trig - e).mean()) / scale,
        "trigger_frac": float((e_trig > e).float().mean()),  # paired: same image +/- trigger
    }


def _ordered(m: dict[str, float]) -> bool:
    return m["noise_margin"] > 3.0 and m["trigger_margin"] > 0.25 and m["trigger_frac"] > 0.9


LEARN = [
    "--bank-size", "256", "--batch-size", "32", "--mcmc-steps", "10", "--lr", "1e-3",
    "--epochs", "25", "--steps", "250", "--ckpt-every", "100000", "--log-every", "10",
]  # fmt: skip


@pytest.mark.slow  # trains for ~15 s
def test_trained_ebm_gives_data_lower_energy(data, tmp_path):
    out = tmp_path / "run"
    assert _train(data, out, *LEARN) == 0
    held = to_x(shapes(128, seed=1))  # held out: another draw of the same family
    trained, untrained = (_ordering(m, held) for m in final_and_initial(out, pg.load_ebm))
    assert _ordered(trained), trained
    assert not _ordered(untrained), untrained  # the test can fail: the margin is learnt
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 250 and rows[-1]["images_per_s"] > 0
    assert (out / "loss.png").is_file() and list((out / "samples").glob("*.png"))


# -- acceptance 3: interrupt at k, resume, equal to an uninterrupted run ---------------------


@pytest.fixture(scope="module")
def resumed(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ebmresume")
    # 320 images / 16 = 20 steps an epoch; milestone at epoch 1 and rejuvenation 0.5 exercise
    # the schedule and the generator across the interruption
    extra = ["--epochs", "3", "--lr-milestones", "1", "--rejuvenation", "0.5", "--ckpt-every", "4"]
    assert _train(data, root / "full", *extra, "--steps", "23") == 0
    assert _train(data, root / "part", *extra, "--steps", "18") == 0
    assert _train(data, root / "part", *extra, "--steps", "23", "--resume") == 0
    return root


def test_resume_is_exact(resumed):
    full, part = resumed / "full", resumed / "part"
    wf, wp = weights(full), weights(part)
    assert wf.keys() == wp.keys()
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k
    sf = torch.load(full / "checkpoints/step_00000023/state.pt", weights_only=True)
    sp = torch.load(part / "checkpoints/step_00000023/state.pt", weights_only=True)
    assert torch.equal(sf["bank"], sp["bank"])
    assert torch.equal(sf["generator"], sp["generator"])
    for a, b in zip(sf["optimizer"]["state"].values(), sp["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert sf["scheduler"]["lr"] == pytest.approx(1e-5)  # past the milestone
    ev = [json.loads(s) for s in (part / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in ev)


# -- acceptance 4: purify straight from a training output directory -------------------------


def test_purify_uses_fresh_checkpoint(resumed, data, tmp_path):
    out = resumed / "full"
    ebm = pg.load_ebm(out)
    p = pg.Purifier(method="ebm", ebm=ebm, ebm_steps=3, device="cpu", backend="reference")
    imgs = shapes(4, seed=5)
    res = p(imgs, np.arange(4))
    assert res.shape == imgs.shape and res.dtype == np.uint8 and not np.array_equal(res, imgs)
    pytest.importorskip("puregen_fast.pipeline")
    argv = [
        "purify", "--dataset", "npz", "--data-dir", str(data), "--method", "ebm",
        "--ebm", str(out), "--ebm-steps", "3", "--limit", "8", "--backend", "reference",
        "--device", "cpu", "--quiet", "--out", str(tmp_path / "pure"),
    ]  # fmt: skip
    assert main(argv) == 0
    got = pg.load_purified(tmp_path / "pure")
    assert got.images.shape == (8, 16, 16, 3)


# -- acceptance 5: the watch fires on an unstable run and rolls back -------------------------


def test_divergence_watch_rolls_back(data, tmp_path, capsys):
    out = tmp_path / "unstable"
    rc = _train(data, out, "--lr", "1.0", "--ckpt-every", "1", "--epochs", "5")
    err = capsys.readouterr().err
    assert rc == 2, err
    info = json.loads((out / "divergence.json").read_text())
    bad, good = info["diverged_at_step"], info["rolled_back_to_step"]
    assert good < bad
    assert f"diverged at step {bad}" in err and f"step {good}" in err
    # the top-level weights are the last good checkpoint's, and they load and purify
    ck = out / "checkpoints" / f"step_{good:08d}"
    wt, wc = weights(out), weights(ck)
    assert all(torch.equal(wt[k], wc[k]) for k in wt)
    ebm = pg.load_ebm(out)
    p = pg.Purifier(method="ebm", ebm=ebm, ebm_steps=2, device="cpu", backend="reference")
    res = p(shapes(2, seed=7), np.arange(2))
    assert res.shape == (2, 16, 16, 3)
    # nothing newer than the good checkpoint was kept
    assert max(int(d.name[5:]) for d in (out / "checkpoints").glob("step_*")) == good
    # going on from an earlier checkpoint with a stabiliser, into a new directory
    start = out / "checkpoints" / "step_00000000"
    assert _train(data, tmp_path / "o", "--lr", "1e-4", "--resume", str(start)) == 2
    assert "--force-resume" in capsys.readouterr().err
    new = tmp_path / "stable"
    rc = _train(
        data, new, "--lr", "1e-4", "--grad-clip", "1", "--epochs", "5", "--resume", str(start),
        "--force-resume", "--steps", "3",
    )  # fmt: skip
    assert rc == 0
    steps = sorted(int(d.name[5:]) for d in (new / "checkpoints").glob("step_*"))
    assert steps == [0, 3]
    assert json.loads((new / "recipe.json").read_text())["hparams"]["grad_clip"] == 1.0


def test_nan_loss_stops_at_last_good_checkpoint(data, tmp_path, monkeypatch):
    real = train_ebm_mod.EBMTrainer.energies

    def energies(self, x):  # the loss turns NaN at update index 5 (step 6)
        e = real(self, x)
        return e * float("nan") if self.step >= 5 else e

    monkeypatch.setattr(train_ebm_mod.EBMTrainer, "energies", energies)
    cfg = EBMConfig(
        dataset="npz", data_dir=str(data), out=str(tmp_path / "nan"), nf=8, bank_size=64,
        batch_size=16, mcmc_steps=2, backend="reference", device="cpu", progress=False,
        ckpt_every=4, log_every=1,
    )  # fmt: skip
    with pytest.raises(TrainingDiverged) as ei:
        train_ebm(cfg)
    e = ei.value
    assert (e.step, e.good_step) == (6, 4)
    assert "step 6" in str(e) and "non-finite" in str(e) and "step 4" in str(e)
    pg.load_ebm(tmp_path / "nan")  # finite, loadable


# -- the negatives come from the engine's fast sampler where it runs ---------------------------


def test_fast_sampler_trains_like_the_reference(data, tmp_path):
    """backend auto (compiled gradient, fused update; CUDA graph on GPU) follows the model as it
    is trained, and agrees with the reference backend to float tolerance."""
    common = ["--steps", "3", "--rejuvenation", "0.3", "--ckpt-every", "1000"]
    assert _train(data, tmp_path / "ref", *common) == 0
    assert _train(data, tmp_path / "fast", *common, "--backend", "auto") == 0
    recipe = json.loads((tmp_path / "fast" / "recipe.json").read_text())
    assert "backend=fast" in recipe["describe"]["sampler"]
    wr, wf = weights(tmp_path / "ref"), weights(tmp_path / "fast")
    assert all(torch.allclose(wr[k], wf[k], atol=1e-5, rtol=1e-4) for k in wr)
    br = torch.load(tmp_path / "ref/checkpoints/step_00000003/state.pt", weights_only=True)
    bf = torch.load(tmp_path / "fast/checkpoints/step_00000003/state.pt", weights_only=True)
    assert torch.allclose(br["bank"], bf["bank"], atol=1e-4)


# -- the stabilisers and the watch's relative test ---------------------------------------------


def test_stabilisers_run(data, tmp_path):
    out = tmp_path / "stab"
    rc = _train(
        data, out, "--grad-clip", "1.0", "--energy-reg", "0.1", "--warmup-steps", "4",
        "--steps", "4",
    )  # fmt: skip
    assert rc == 0
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4])
    recipe = json.loads((out / "recipe.json").read_text())["hparams"]
    assert recipe["grad_clip"] == 1.0 and recipe["energy_reg"] == 0.1


# -- acceptance 6: bad input -------------------------------------------------------------------


def test_empty_dataset(tmp_path, capsys):
    empty = write_npz(tmp_path / "empty.npz", np.zeros((0, 16, 16, 3), np.uint8))
    assert _train(empty, tmp_path / "o") == 2
    assert "empty" in capsys.readouterr().err


def test_unknown_class_and_single_class(data, tmp_path, capsys):
    assert _train(data, tmp_path / "o", "--classes", "cat") == 2
    assert "unknown class 'cat'" in capsys.readouterr().err
    from puregen_fast.errors import UsageError
    from puregen_fast.train.data import load_train_data

    with pytest.raises(UsageError, match="at least two classes"):
        load_train_data("npz", str(data), need_classes=True)


def test_fewer_images_than_batch(tmp_path, capsys):
    small = write_npz(tmp_path / "small.npz", shapes(8))
    assert _train(small, tmp_path / "o") == 2
    assert "fewer than --batch-size 16" in capsys.readouterr().err


def test_resume_refuses_other_recipe_and_changed_flags(resumed, data, tmp_path, capsys):
    ddpm_like = tmp_path / "ddpm_run"
    (ddpm_like / "checkpoints" / "step_00000001").mkdir(parents=True)
    (ddpm_like / "recipe.json").write_text(
        json.dumps({"recipe": "ddpm", "format": 1, "hparams": {}})
    )
    (ddpm_like / "checkpoints" / "step_00000001" / "state.pt").write_bytes(b"")
    assert _train(data, tmp_path / "o", "--resume", str(ddpm_like)) == 2
    assert "written by `train ddpm`" in capsys.readouterr().err

    extra = ["--epochs", "3", "--lr-milestones", "1", "--rejuvenation", "0.5"]
    assert _train(data, resumed / "part", *extra, "--lr", "3e-4", "--resume") == 2
    err = capsys.readouterr().err
    assert "--lr 0.0001 -> 0.0003" in err
    # a fresh run into a used directory is refused too
    assert _train(data, resumed / "part", *extra) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_no_checkpoint_to_resume(data, tmp_path, capsys):
    assert _train(data, tmp_path / "nothing", "--resume") == 2
    assert "no such directory" in capsys.readouterr().err


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(data, tmp_path, capsys):
    out = tmp_path / "st"
    assert _train(data, out, "--steps", "12", "--ckpt-every", "4", "--keep-ckpts", "2") == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000008", "step_00000012"]
    older = ck / "step_00000008"
    args = ("--steps", "10", "--ckpt-every", "2", "--keep-ckpts", "2", "--force-resume")
    assert _train(data, out, *args, "--resume", str(older)) == 0
    assert "abandons 1 newer checkpoint" in capsys.readouterr().err
    # the abandoned step 12 is out of the way: a plain --resume continues step 10
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000008", "step_00000010"]
    assert len(list(ck.glob("abandoned-*/step_00000012"))) == 1
    assert (
        _train(data, out, "--steps", "11", "--ckpt-every", "2", "--force-resume", "--resume") == 0
    )
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    assert resumes[-1]["from"].endswith("step_00000010")


@pytest.mark.parametrize(
    "extra, needle",
    [(("--log-every", "0"), "--log-every"), (("--steps", "1"), "is a file")],
)
def test_bad_run_flags_exit_2(data, tmp_path, capsys, extra, needle):
    out = tmp_path / "o"
    if needle == "is a file":
        out.write_text("not a directory")
    assert _train(data, out, *extra) == 2
    assert needle in capsys.readouterr().err


# -- --objective dsm: denoising score matching -----------------------------------------------

DSM = ["--objective", "dsm", "--dsm-sigma-min", "0.05", "--dsm-sigma-max", "0.3", "--lr", "5e-3",
       "--epochs", "100", "--ckpt-every", "100000"]  # fmt: skip


def _denoise_ratio(ebm: torch.nn.Module, held: torch.Tensor, sigma: float) -> float:
    """|x + sigma^2 score(x~) - x| / |x~ - x| for x~ = x + sigma z: under 1 when the score the
    sampler follows points back toward the image (Tweedie's one-step denoiser)."""
    z = torch.randn(held.shape, generator=torch.Generator().manual_seed(1))
    xn = (held + sigma * z).requires_grad_(True)
    (g,) = torch.autograd.grad(ebm(xn).sum(), xn)
    den = xn.detach() - sigma**2 * g / 1e-4  # score = -grad E / temp (temp: the default 1e-4)
    return float((den - held).norm() / (xn.detach() - held).norm())


def test_dsm_learns_to_pull_noise_back(data, tmp_path):
    out = tmp_path / "dsm"
    assert _train(data, out, *DSM, "--steps", "150") == 0
    held = to_x(shapes(64, seed=1))  # held out: another draw of the same family
    trained, untrained = (_denoise_ratio(m, held, 0.2) for m in final_and_initial(out, pg.load_ebm))
    assert trained < 0.9, trained
    assert untrained > 1.5, untrained  # it is learnt, not a property of the network
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 2 and np.mean(losses[-10:]) < 0.9, losses
    doc = json.loads((out / "recipe.json").read_text())
    assert doc["hparams"]["objective"] == "dsm" and "sigma" in doc["describe"]["loss"]
    chain = pg.load_ebm(out).puregen_sampling  # a DSM network's colder chain
    assert (chain["ebm_steps"], chain["ebm_eps"], chain["ebm_temp"]) == (80, 5e-3, 1e-5)


def test_dsm_resume_is_exact(data, tmp_path):
    assert _train(data, tmp_path / "full", *DSM, "--steps", "9", "--hflip") == 0
    assert _train(data, tmp_path / "part", *DSM, "--steps", "5", "--hflip") == 0
    assert _train(data, tmp_path / "part", *DSM, "--steps", "9", "--hflip", "--resume") == 0
    wf, wp = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    st = torch.load(tmp_path / "part/checkpoints/step_00000009/state.pt", weights_only=True)
    assert st["bank"].shape[0] == 0  # no chains


def test_runs_written_before_objective_existed_resume(resumed, data, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(resumed / "part", old)
    doc = json.loads((old / "recipe.json").read_text())
    for k in ("objective", "dsm_sigma_min", "dsm_sigma_max"):
        del doc["hparams"][k]
    (old / "recipe.json").write_text(json.dumps(doc))
    for ck in old.glob("checkpoints/*/recipe.json"):
        ck.write_text(json.dumps(doc))
    extra = ["--epochs", "3", "--lr-milestones", "1", "--rejuvenation", "0.5", "--ckpt-every", "4"]
    # the sigma fields only matter to dsm; a pcd run without them is the same recipe
    assert _train(data, old, *extra, "--steps", "24", "--resume") == 0, capsys.readouterr().err
    # switching a pcd run to dsm is another recipe
    assert _train(data, old, *extra, "--objective", "dsm", "--steps", "25", "--resume") == 2
    assert "--objective 'pcd' -> 'dsm'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [("--dsm-sigma-min", "0"), ("--dsm-sigma-min", "0.5")])
def test_bad_dsm_sigmas_exit_2(data, tmp_path, capsys, extra):
    assert _train(data, tmp_path / "o", "--objective", "dsm", *extra) == 2
    assert "--dsm-sigma-min" in capsys.readouterr().err


def test_steps_cut_short_by_epochs_says_so(data, tmp_path, capsys):
    # 320 images // batch 16 = 20 steps per epoch; 1 epoch binds before --steps 50
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "1", "--steps", "50", "--ckpt-every", "1000") == 0
    err = capsys.readouterr().err
    assert "--steps 50 is more than --epochs 1 x 20 steps per epoch" in err
    assert "training stops after 20 steps; raise --epochs" in err
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20
    # the EBM carries the chain it was trained for: purify uses it unless flags say otherwise
    assert pg.load_ebm(out).puregen_sampling == {
        "ebm_steps": 150, "ebm_eps": 0.0125, "ebm_temp": 1e-4, "path": str(out / "sampling.json")}


def test_the_happy_path_warns_of_nothing(tmp_path):
    """A short healthy run on an image folder prints no warning (issue 24 item 7). Its images
    come from the decoded cache, a read-only map (also on the run that decodes them), which
    ``torch.from_numpy`` warned about once per process: so a fresh process."""
    import os
    import subprocess
    import sys

    from fixtures_data import write_imagefolder

    write_imagefolder(tmp_path / "photos", n=6)
    env = {**os.environ, "PUREGEN_FAST_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "always"}
    argv = train_argv("ebm", tmp_path / "photos", tmp_path / "run", *TINY, "--steps", "2")
    argv[argv.index("npz")] = "imagefolder"
    done = subprocess.run([sys.executable, "-m", "puregen_fast.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr[-2000:]
