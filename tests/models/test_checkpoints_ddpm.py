"""load_ddpm / save_ddpm: diffusers directories load unchanged and round-trip."""

import json

import pytest
import torch

import puregen_fast as pg

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference UNet")

CFG = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}


@pytest.fixture
def diffusers_dir(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**CFG)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path / "unet")
    return ref.eval(), tmp_path / "unet"


def test_save_pretrained_dir_loads_and_matches(diffusers_dir, tmp_path):
    ref, d = diffusers_dir
    unet = pg.load_ddpm(d)
    x = torch.randn(2, 3, 16, 16)
    for t in (0, 74, 999):
        with torch.no_grad():  # a forward to compare, no graph (and no warning on float())
            want = ref(x, t).sample
            got = unet(x, torch.tensor(t))
        assert float((got - want).norm() / want.norm()) < 1e-5
    # a pipeline directory with the UNet under unet/ loads too
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    for f in d.iterdir():
        (pipe / "unet" / f.name).write_bytes(f.read_bytes())
    assert torch.equal(pg.load_ddpm(pipe)(x, torch.tensor(5)), unet(x, torch.tensor(5)))


def test_save_ddpm_round_trips_and_diffusers_reads_it(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    unet = pg.load_ddpm(d)
    pg.save_ddpm(unet, tmp_path / "ours")
    back = pg.load_ddpm(tmp_path / "ours")
    for k, v in unet.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours")
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(theirs(x, 3).sample, back(x, torch.tensor(3)), atol=1e-5)


def test_bad_ddpm_checkpoints_are_named(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["down_block_types"] = ["CrossAttnDownBlock2D", "DownBlock2D"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(
        (d / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(pg.CheckpointError, match="CrossAttnDownBlock2D"):
        pg.load_ddpm(bad)
    cfg["down_block_types"] = ["DownBlock2D", "AttnDownBlock2D"]
    cfg["block_out_channels"] = [16, 48]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pg.CheckpointError, match="wrong shapes"):
        pg.load_ddpm(bad)
