"""`puregen-fast train ddpm` (issue 6): learning, purification, exact resume, the output layout
(EMA beside the raw weights), and the recipe's schedule and EMA against diffusers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import final_and_initial, run_train, shapes, to_x, train_argv, write_npz

import puregen_fast as pg
from puregen_fast import reference
from puregen_fast.cli.main import main
from puregen_fast.train.ddpm import ema_decay

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("ddpmdata") / "shapes.npz", shapes(320, seed=0))


TINY = ["--unet", "tiny", "--device", "cpu", "--no-progress", "--log-every", "1"]


def _train(data: Path, out: Path, *extra: str) -> int:
    return run_train("ddpm", data, out, *TINY, *extra)


# -- acceptance 2: the loss falls and ddpm_purify moves noised images back ------------------


def _eps_loss(unet: torch.nn.Module, x: torch.Tensor) -> float:
    sched = pg.DDPMSchedule()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 250, (x.shape[0],), generator=g)
    z = torch.randn(x.shape, generator=g)
    ab = sched.alphas_cumprod[t][:, None, None, None]
    with torch.no_grad():
        pred = unet(ab.sqrt() * x + (1 - ab).sqrt() * z, t)
    return float((pred - z).square().mean())


def _purify_dist(unet: torch.nn.Module, x: torch.Tensor, steps: int = 50) -> tuple[float, float]:
    sched = pg.DDPMSchedule()
    noise = torch.randn((steps + 1, *x.shape), generator=torch.Generator().manual_seed(1))
    noised = sched.add_noise(x, noise[0], steps)
    out = reference.ddpm_purify(unet, sched, x, steps, noise=noise)
    rms = lambda a: float((a - x).square().mean().sqrt())  # noqa: E731
    return rms(noised), rms(out)


LEARN = [
    "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "20", "--epochs", "20",
    "--steps", "200", "--ckpt-every", "100000", "--log-every", "10", "--purify-steps", "50",
]  # fmt: skip


@pytest.mark.slow  # trains for ~20 s
def test_tiny_ddpm_learns_and_purifies(data, tmp_path):
    out = tmp_path / "run"
    assert _train(data, out, *LEARN) == 0
    held = to_x(shapes(64, seed=1))
    trained, untrained = final_and_initial(out, pg.load_ddpm)  # trained: the EMA weights
    l0, l1 = _eps_loss(untrained, held), _eps_loss(trained, held)
    assert l1 < 0.5 * l0, (l0, l1)
    noised, purified = _purify_dist(trained, held)
    assert purified < 0.7 * noised, (noised, purified)
    assert _purify_dist(untrained, held)[1] > noised  # an untrained model does not purify
    assert (out / "loss.png").is_file() and list((out / "samples").glob("*.png"))


# -- acceptance 3: exact resume, EMA included ------------------------------------------------


@pytest.fixture(scope="module")
def resumed(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpmresume")
    # 320 / 32 = 10 steps an epoch: the interruption at 7 and the end at 13 straddle an epoch
    extra = [
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--warmup-steps",
        "3",
        "--ckpt-every",
        "5",
        "--hflip",
    ]
    assert _train(data, root / "full", *extra, "--steps", "13") == 0
    assert _train(data, root / "part", *extra, "--steps", "7") == 0
    assert _train(data, root / "part", *extra, "--steps", "13", "--resume") == 0
    return root


def test_resume_is_exact(resumed):
    for sub in (".", "raw"):
        a = load_file(str(resumed / "full" / sub / WEIGHTS))
        b = load_file(str(resumed / "part" / sub / WEIGHTS))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    sa = torch.load(resumed / "full/checkpoints/step_00000013/state.pt", weights_only=True)
    sb = torch.load(resumed / "part/checkpoints/step_00000013/state.pt", weights_only=True)
    assert sa["ema_updates"] == sb["ema_updates"] == 13
    for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"])


def test_output_layout(resumed):
    out = resumed / "full"
    info = json.loads((out / "weights.json").read_text())
    assert info["top_level"] == "ema" and info["raw"] == "raw"
    ema, raw = pg.load_ddpm(out), pg.load_ddpm(out / "raw")
    assert any(
        not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values())
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DModel" and cfg["sample_size"] == 16
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["recipe"] == "ddpm" and recipe["hparams"]["max_timestep"] == 250


def test_resume_refuses_an_ebm_run(resumed, data, tmp_path, capsys):
    ebm_run = tmp_path / "ebm"
    rc = run_train(
        "ebm", data, ebm_run, "--nf", "8", "--bank-size", "32", "--batch-size", "32",
        "--mcmc-steps", "1", "--steps", "1", "--backend", "reference", "--device", "cpu",
        "--no-progress",
    )  # fmt: skip
    assert rc == 0
    assert _train(data, tmp_path / "o", "--batch-size", "32", "--resume", str(ebm_run)) == 2
    assert "written by `train ebm`" in capsys.readouterr().err


# -- the recipe's pieces against diffusers ----------------------------------------------------


def test_cosine_warmup_and_ema_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from puregen_fast.train.ddpm import DDPMTrainer

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=40)
    fake = type("T", (), {"cfg": type("C", (), {"warmup_steps": 5})(), "total_steps": 40})()
    for step in range(40):
        assert DDPMTrainer.lr_factor(fake, step) == pytest.approx(
            opt.param_groups[0]["lr"], abs=1e-12
        )
        opt.step()
        ref.step()
    ema = EMAModel([p], decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    for n in range(1, 50):
        assert ema_decay(n, 0.9999, 1.0, 0.75) == pytest.approx(ema.get_decay(n), abs=1e-12)
    assert math.isclose(ema_decay(1, 0.9999, 1.0, 0.75), 0.0)
    del diffusers


@pytest.mark.parametrize(
    "content, flag, needle",
    [
        ("[1]", "--unet-config", "expected a JSON object"),
        (b"\x89PNG\x00\xff", "--unet-config", "--unet-config"),
        (None, "--ema-inv-gamma", "--ema-inv-gamma"),
    ],
)
def test_bad_ddpm_flags_exit_2(data, tmp_path, capsys, content, flag, needle):
    if content is None:
        extra = ["--ema-inv-gamma", "0"]
    else:
        cfg = tmp_path / "cfg.json"
        cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
        extra = ["--unet-config", str(cfg)]
    argv = train_argv("ddpm", data, tmp_path / "o", "--device", "cpu", "--no-progress",
                      "--steps", "1", "--batch-size", "16", *extra)  # fmt: skip
    try:
        rc = main(argv)
    except SystemExit as e:  # a value out of the flag's range: argparse exits 2 itself
        rc = e.code
    assert rc == 2
    assert needle in capsys.readouterr().err
