"""UNet2D against diffusers' UNet2DModel, the ground truth for architecture and numerics."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from puregen_fast.models.unet import UNet2D, convert_legacy_attention_keys

diffusers = pytest.importorskip("diffusers")
UNet2DModel = diffusers.UNet2DModel

SMALL = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
)

# Non-default values of every option we implement, so each code path is compared once.
SMALL_OPTIONS = dict(
    SMALL,
    block_out_channels=(16, 32, 48),
    down_block_types=("AttnDownBlock2D", "UNetResDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    layers_per_block=2,
    in_channels=2,
    out_channels=5,
    center_input_sample=True,
    time_embedding_dim=40,
    freq_shift=1,
    flip_sin_to_cos=False,
    mid_block_scale_factor=math.sqrt(2.0),
    downsample_padding=0,
    act_fn="mish",
    attention_head_dim=None,
    attn_norm_num_groups=4,
    norm_eps=1e-6,
)

PAPER = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a non-zero random value at a scale that keeps activations O(1).

    diffusers' init leaves norm biases zero (and norm weights one); random values everywhere
    make a mismatch in any of them visible.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() > 1:  # conv / linear weight: 1/sqrt(fan_in) keeps the variance ~1
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith(".weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def make_pair(cfg: dict, seed: int = 0) -> tuple[torch.nn.Module, UNet2D]:
    torch.manual_seed(seed)
    ref = UNet2DModel(**cfg).eval()
    randomize_(ref, seed)
    ours = UNet2D.from_config(dict(ref.config)).eval()
    # Same names in the same order, so saved files and parameter iteration agree too.
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def check_close(ref: torch.nn.Module, ours: UNet2D, x: torch.Tensor, t: object) -> torch.Tensor:
    expected = ref(x, t).sample
    got = ours(x, t)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-5, (t, rel_err(got, expected))
    return got


@pytest.fixture(scope="module")
def small_pair() -> tuple[torch.nn.Module, UNet2D]:
    return make_pair(SMALL)


@pytest.mark.parametrize("batch", [3, 1, 2])
@pytest.mark.parametrize("t", [0, 1, 74, 999])
def test_small_matches_diffusers(small_pair, batch: int, t: int) -> None:
    ref, ours = small_pair
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch * 1000 + t))
    out = check_close(ref, ours, x, t)
    check_close(ref, ours, x, torch.tensor(t))  # 0-d tensor
    check_close(ref, ours, x, torch.full((batch,), t))  # (B,) tensor
    check_close(ref, ours, x, float(t))
    assert out.std() > 1e-2  # a non-degenerate network, so agreement means something


def test_small_per_sample_timesteps(small_pair) -> None:
    ref, ours = small_pair
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 74, 999])
    out = check_close(ref, ours, x, t)
    # The time embedding must actually condition each sample on its own timestep.
    assert rel_err(out[1:2], ours(x[1:2], 0).detach()) > 1e-3
    check_close(ref, ours, x, t.float() + 0.5)  # fractional tensor timesteps stay fractional


def test_small_options_match_diffusers() -> None:
    ref, ours = make_pair(SMALL_OPTIONS, seed=1)
    assert ours.mid_block is not None and ours.mid_block.attentions is not None
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    for t in (0, 74, torch.tensor(999)):
        check_close(ref, ours, x, t)


def test_no_mid_attention_and_no_mid_block() -> None:
    for extra in (dict(add_attention=False), dict(mid_block_type=None)):
        ref, ours = make_pair(dict(SMALL, **extra), seed=3)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        check_close(ref, ours, x, 10)


@pytest.mark.slow  # builds the 113.7M-parameter model twice
def test_paper_config_matches_diffusers() -> None:
    ref, ours = make_pair(PAPER, seed=4)
    n_ref = sum(p.numel() for p in ref.parameters())
    n = sum(p.numel() for p in ours.parameters())
    print(f"paper UNet parameters: ours {n:,}, diffusers {n_ref:,}")
    assert n == n_ref
    assert round(n / 1e6, 1) == 113.7
    gen = torch.Generator().manual_seed(5)
    for batch, t in ((1, 0), (2, 74), (2, torch.tensor(999))):
        check_close(ref, ours, torch.randn(batch, 3, 32, 32, generator=gen), t)


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D"), "CrossAttnDownBlock2D"),
        ("up_block_types", ("UpBlock2D", "SkipUpBlock2D"), "SkipUpBlock2D"),
        ("mid_block_type", "UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
        ("time_embedding_type", "fourier", "fourier"),
        ("class_embed_type", "timestep", "timestep"),
        ("num_class_embeds", 10, "10"),
        ("norm_num_groups", None, "None"),
        ("resnet_time_scale_shift", "scale_shift", "scale_shift"),
        ("downsample_type", "resnet", "resnet"),
        ("upsample_type", "resnet", "resnet"),
        ("act_fn", "tanh", "tanh"),
    ],
)
def test_unsupported_config_raises(key: str, value: object, named: str) -> None:
    with pytest.raises(ValueError, match=key) as info:
        UNet2D.from_config(dict(SMALL, **{key: value}))
    assert named in str(info.value)


def test_mismatched_block_lists_raise() -> None:
    with pytest.raises(ValueError, match="same"):
        UNet2D.from_config(dict(SMALL, up_block_types=("UpBlock2D",)))


def test_config_is_json_and_round_trips(small_pair) -> None:
    _, ours = small_pair
    text = json.dumps(ours.config)
    cfg = json.loads(text)
    assert cfg["_class_name"] == "UNet2DModel"
    assert cfg["block_out_channels"] == [32, 64]
    assert set(UNet2D.from_config(cfg).state_dict()) == set(ours.state_dict())
    # diffusers builds the same network from our config.
    shapes = {k: v.shape for k, v in UNet2DModel.from_config(cfg).state_dict().items()}
    assert shapes == {k: v.shape for k, v in ours.state_dict().items()}


def test_unknown_keys_ignored_with_warning() -> None:
    with pytest.warns(UserWarning, match="some_future_option"):
        UNet2D.from_config(dict(SMALL, some_future_option=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UNet2D.from_config(dict(SMALL, _class_name="UNet2DModel", _diffusers_version="0.42.1"))


def test_from_saved_diffusers_dir(small_pair, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ref, _ = small_pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in a diffusers config.json is left unread
        ours = UNet2D.from_config(cfg).eval()
    weights = list(tmp_path.glob("*.safetensors"))
    assert len(weights) == 1
    ours.load_state_dict(load_file(weights[0]), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    check_close(ref, ours, x, 74)


def test_legacy_attention_keys_convert(small_pair) -> None:
    ref, ours = small_pair
    # The attention names of checkpoints saved by early diffusers versions.
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in ref.state_dict().items():
        for new_part, old_part in old.items():
            k = k.replace(new_part, old_part)
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    converted = convert_legacy_attention_keys(legacy)
    assert list(converted) == list(ref.state_dict())
    ours.load_state_dict(converted, strict=True)


def test_fullgraph_trace_with_device_timestep(small_pair) -> None:
    # Dynamo in fullgraph mode fails on .item(), data-dependent shapes or value branching,
    # the same things that break CUDA-graph capture; the eager backend keeps this fast on CPU.
    _, ours = small_pair
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in (torch.tensor(5), torch.tensor(900)):
            assert torch.equal(compiled(x, t), ours(x, t))
    torch._dynamo.reset()
