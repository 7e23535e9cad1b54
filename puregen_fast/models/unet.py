"""A plain-PyTorch re-implementation of diffusers' ``UNet2DModel``.

Only the pieces the PureGen DDPM uses are built: ``DownBlock2D``, ``AttnDownBlock2D``,
``UNetMidBlock2D`` (with or without attention), ``UpBlock2D`` and ``AttnUpBlock2D``, a sinusoidal
("positional") time embedding and the "default" (additive) time conditioning of the resnets.

Parameter names match diffusers exactly, so ``UNet2D.from_config(cfg).load_state_dict(sd)`` works
with ``strict=True`` on a state dict saved by diffusers, and a config.json written by diffusers is
accepted as is. Any config value that would change the network in a way this module does not
implement raises ``ValueError`` instead of silently building a different model.

diffusers is not imported here; it is only used by the tests as the ground truth.

The forward pass has no host synchronisation and no branching on tensor values, so it can be
captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)`` when the timestep is
a device tensor.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet2D", "convert_legacy_attention_keys"]

_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2D",)
# diffusers' ACT2CLS; "swish" is SiLU under another name.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}

# The constructor arguments of diffusers' UNet2DModel with its defaults. ``from_config`` reads
# exactly these keys; ``self.config`` holds all of them.
_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}


def _block_type(name: str) -> str:
    # diffusers accepts e.g. "UNetResDownBlock2D" as an alias of "DownBlock2D".
    return name[len("UNetRes") :] if name.startswith("UNetRes") else name


def _refuse(key: str, value: Any, supported: str) -> ValueError:
    return ValueError(
        f"UNet2D: unsupported config value {key}={_show(value)}; supported: {supported}"
    )


# Sanity limits on untrusted configs, far above any UNet2DModel (the paper's has 6 levels of at
# most 512 channels and 2 layers): they keep shape arithmetic and the module count bounded.
MAX_CHANNELS = 1 << 16
MAX_LEVELS = 8
MAX_LAYERS_PER_BLOCK = 32


def _show(value: Any) -> str:
    """``repr(value)`` cut short, for messages about untrusted values."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int too long to print, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    # math.isfinite overflows on huge ints; ints are finite anyway.
    if _is_int(v):
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(cfg: Mapping[str, Any], key: str, lo: int, hi: int, optional: bool = False) -> None:
    v = cfg[key]
    if optional and v is None:
        return
    if not _is_int(v) or not lo <= v <= hi:
        what = "None or " * optional + f"a whole number in [{lo}, {hi}]"
        raise _refuse(key, v, what)


def _check_names(cfg: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    names = cfg[key]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _refuse(key, names, "a list of block type names")
    for name in names:
        if _block_type(name) not in allowed:
            raise _refuse(key, name, ", ".join(map(repr, allowed)))


def _validate(cfg: Mapping[str, Any]) -> None:
    """Raise ValueError for any config value that this implementation does not reproduce, or
    that is not a valid value of its type (a config.json is untrusted input)."""
    for key, allowed in (
        ("time_embedding_type", ("positional",)),
        ("resnet_time_scale_shift", ("default",)),
        ("downsample_type", ("conv",)),
        ("upsample_type", ("conv",)),
        ("mid_block_type", (*_MID_BLOCKS, None)),
        ("class_embed_type", (None,)),
        ("num_class_embeds", (None,)),
    ):
        if not (cfg[key] is None or isinstance(cfg[key], str)) or cfg[key] not in allowed:
            raise _refuse(key, cfg[key], ", ".join(repr(a) for a in allowed))
    if not isinstance(cfg["act_fn"], str) or cfg["act_fn"] not in _ACTIVATIONS:
        raise _refuse("act_fn", cfg["act_fn"], ", ".join(map(repr, _ACTIVATIONS)))
    if cfg["norm_num_groups"] is None:
        raise _refuse("norm_num_groups", None, "an int")
    _check_names(cfg, "down_block_types", _DOWN_BLOCKS)
    _check_names(cfg, "up_block_types", _UP_BLOCKS)
    chans = cfg["block_out_channels"]
    if not isinstance(chans, list):
        raise _refuse("block_out_channels", chans, "a list of channel counts")
    n = len(chans)
    if n == 0 or len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError(
            "UNet2D: block_out_channels, down_block_types and up_block_types must have the same "
            f"non-zero length; got {_show(chans)}, {_show(cfg['down_block_types'])}, "
            f"{_show(cfg['up_block_types'])}"
        )
    if n > MAX_LEVELS:
        raise _refuse("block_out_channels", chans, f"at most {MAX_LEVELS} levels")
    if not all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in chans):
        raise _refuse("block_out_channels", chans, f"whole numbers in [1, {MAX_CHANNELS}]")
    _check_int(cfg, "layers_per_block", 1, MAX_LAYERS_PER_BLOCK)
    _check_int(cfg, "in_channels", 1, MAX_CHANNELS)
    _check_int(cfg, "out_channels", 1, MAX_CHANNELS)
    _check_int(cfg, "time_embedding_dim", 1, 4 * MAX_CHANNELS, optional=True)
    _check_int(cfg, "attention_head_dim", 1, MAX_CHANNELS, optional=True)
    _check_int(cfg, "norm_num_groups", 1, MAX_CHANNELS)
    _check_int(cfg, "attn_norm_num_groups", 1, MAX_CHANNELS, optional=True)
    _check_int(cfg, "downsample_padding", 0, 1)
    _check_int(cfg, "num_train_timesteps", 0, 1 << 62, optional=True)
    size = cfg["sample_size"]
    sizes = size if isinstance(size, list) and 1 <= len(size) <= 2 else [size]
    if size is not None and not all(_is_int(s) and 1 <= s <= MAX_CHANNELS for s in sizes):
        raise _refuse("sample_size", size, "None, a whole number or [height, width]")
    for key in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        if not isinstance(cfg[key], bool) and not (_is_int(cfg[key]) and cfg[key] in (0, 1)):
            raise _refuse(key, cfg[key], "true, false")
    if not _is_finite(cfg["freq_shift"]):
        raise _refuse("freq_shift", cfg["freq_shift"], "a finite number")
    for key, lo, hi in (("norm_eps", 0.0, 1.0), ("dropout", 0.0, 1.0)):
        if not _is_finite(cfg[key]) or not lo <= cfg[key] <= hi:
            raise _refuse(key, cfg[key], f"a number in [{lo}, {hi}]")
    scale = cfg["mid_block_scale_factor"]
    if not _is_finite(scale) or not 0 < scale <= 1e6:
        raise _refuse("mid_block_scale_factor", scale, "a number in (0, 1e6]")
    # GroupNorm splits channels into equal groups: every normalised width (sums of block widths
    # on the up path) must divide evenly.
    groups = cfg["norm_num_groups"]
    if any(c % groups for c in chans):
        raise _refuse("norm_num_groups", groups, f"a divisor of every block_out_channels {chans}")
    attn_groups = cfg["attn_norm_num_groups"]
    if (
        attn_groups is not None
        and cfg["mid_block_type"] is not None
        and cfg["add_attention"]
        and chans[-1] % attn_groups
    ):
        raise _refuse("attn_norm_num_groups", attn_groups, f"a divisor of {chans[-1]}")


def _json_value(value: Any) -> Any:
    # Tuples (as Python callers write them) become lists, as in a diffusers config.json.
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


def sinusoidal_embedding(
    timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 1e4
) -> Tensor:
    """diffusers' ``get_timestep_embedding`` (scale 1): (N,) timesteps -> (N, dim) float32."""
    half = dim // 2
    # Computed on the fly (not a buffer) so the values match diffusers bit for bit on any device.
    # Same operation order as diffusers (multiply, then divide) for identical rounding.
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    exponent = exponent / (half - freq_shift)
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


UNET_PRESETS: dict[str, dict[str, Any]] = {
    # the paper's 113.7M UNet: diffusers' train_unconditional default, which the authors ran
    "paper": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    },
    # about 6.5M parameters: a quick CIFAR-size model
    "small": {
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "block_out_channels": [64, 128, 128],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    },
    # tests and smoke runs on a CPU
    "tiny": {
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": [16, 32],
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    },
}


class TimestepEmbedding(nn.Module):
    """The time MLP (linear_1, SiLU, linear_2) of diffusers' ``TimestepEmbedding``."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` with time_embedding_norm="default" (time added as a bias)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_ch: int,
        groups: int,
        eps: float,
        act: str,
        dropout: float,
        output_scale_factor: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.act = _ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout)
        # A 1x1 projection on the skip path only when the channel count changes.
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_emb_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale_factor


class AttentionBlock(nn.Module):
    """Spatial self-attention as diffusers builds it for UNet2DModel.

    GroupNorm, q/k/v projections over the H*W tokens, multi-head scaled dot-product attention
    (scale head_dim**-0.5), output projection, residual add, then division by
    ``rescale_output_factor``.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        groups: int | None,
        eps: float,
        rescale_output_factor: float,
    ) -> None:
        super().__init__()
        self.heads = channels // head_dim
        if self.heads < 1:
            raise _refuse("attention_head_dim", head_dim, f"at most the block width {channels}")
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        # diffusers' to_out is [Linear, Dropout(0)]; only index 0 carries parameters.
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # Normalise the flattened (B, C, HW) view as diffusers does: on a channels-last input,
        # GroupNorm on the 4-D tensor takes another kernel and differs in the last bits.
        y = x.reshape(b, c, h * w)
        if self.group_norm is not None:
            y = self.group_norm(y)
        y = y.transpose(1, 2)  # (B, HW, C) tokens

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, h * w, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(y)), split(self.to_k(y)), split(self.to_v(y))
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.to_out[0](o.transpose(1, 2).reshape(b, h * w, -1))
        o = o.transpose(1, 2).reshape(b, c, h, w)
        return (o + x) / self.rescale_output_factor


class Downsample(nn.Module):
    """3x3 stride-2 conv (``Downsample2D`` with use_conv=True)."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        # padding=0 in diffusers means an asymmetric (right/bottom) zero pad of one pixel.
        self.pad_right = padding == 0

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv (``Upsample2D`` with use_conv=True)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _head_dim(cfg: Mapping[str, Any], channels: int) -> int:
    # attention_head_dim=None means one head spanning all channels, as in diffusers.
    return cfg["attention_head_dim"] if cfg["attention_head_dim"] is not None else channels


def _resnet(
    cfg: Mapping[str, Any], in_ch: int, out_ch: int, temb_ch: int, scale: float = 1.0
) -> ResnetBlock:
    groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
    return ResnetBlock(in_ch, out_ch, temb_ch, groups, eps, cfg["act_fn"], cfg["dropout"], scale)


def _attention(
    cfg: Mapping[str, Any], ch: int, groups: int | None = None, scale: float = 1.0
) -> AttentionBlock:
    groups = cfg["norm_num_groups"] if groups is None else groups
    return AttentionBlock(ch, _head_dim(cfg, ch), groups, cfg["norm_eps"], scale)


class DownBlock(nn.Module):
    """``DownBlock2D`` (attention=False) or ``AttnDownBlock2D`` (attention=True)."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        in_ch: int,
        out_ch: int,
        temb_ch: int,
        attention: bool,
        add_downsample: bool,
    ) -> None:
        super().__init__()
        n = cfg["layers_per_block"]
        # attentions registered before resnets: diffusers' state-dict order.
        self.attentions = (
            nn.ModuleList(_attention(cfg, out_ch) for _ in range(n)) if attention else None
        )
        self.resnets = nn.ModuleList(
            _resnet(cfg, in_ch if i == 0 else out_ch, out_ch, temb_ch) for i in range(n)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample(out_ch, cfg["downsample_padding"])])
            if add_downsample
            else None
        )

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips: list[Tensor] = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """``UpBlock2D`` (attention=False) or ``AttnUpBlock2D`` (attention=True)."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        in_ch: int,
        prev_out_ch: int,
        out_ch: int,
        temb_ch: int,
        attention: bool,
        add_upsample: bool,
    ) -> None:
        super().__init__()
        n = cfg["layers_per_block"] + 1  # one more than down: also eats the downsampler's skip
        resnets = []
        for i in range(n):
            # Each resnet sees the running features concatenated with one skip tensor; the last
            # skip comes from the previous level's output, hence in_ch.
            skip_ch = in_ch if i == n - 1 else out_ch
            run_ch = prev_out_ch if i == 0 else out_ch
            resnets.append(_resnet(cfg, run_ch + skip_ch, out_ch, temb_ch))
        self.attentions = (
            nn.ModuleList(_attention(cfg, out_ch) for _ in range(n)) if attention else None
        )
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        # Pops skips from the end: the most recent down-path activation first.
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """``UNetMidBlock2D`` (num_layers=1): resnet, attention (optional), resnet."""

    def __init__(self, cfg: Mapping[str, Any], ch: int, temb_ch: int) -> None:
        super().__init__()
        scale = cfg["mid_block_scale_factor"]
        self.attentions = (
            nn.ModuleList([_attention(cfg, ch, cfg["attn_norm_num_groups"], scale)])
            if cfg["add_attention"]
            else None
        )
        self.resnets = nn.ModuleList(_resnet(cfg, ch, ch, temb_ch, scale) for _ in range(2))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet2D(nn.Module):
    """diffusers ``UNet2DModel`` (positional time embedding, no class conditioning).

    Keyword arguments and defaults are those of ``UNet2DModel``; ``from_config`` builds one from
    a diffusers config.json dict. ``forward(sample, timestep)`` returns the model output (the
    epsilon prediction for the PureGen DDPM) as a tensor.
    """

    def __init__(
        self,
        *,
        sample_size: int | Sequence[int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: Sequence[str] = tuple(_DEFAULTS["down_block_types"]),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: Sequence[str] = tuple(_DEFAULTS["up_block_types"]),
        block_out_channels: Sequence[int] = tuple(_DEFAULTS["block_out_channels"]),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int | None = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        super().__init__()
        # locals() holds just the keyword arguments here (plus self/__class__, filtered out).
        cfg = {k: _json_value(v) for k, v in locals().items() if k in _DEFAULTS}
        _validate(cfg)
        # A plain, JSON-serialisable dict: save it as config.json and diffusers can load it.
        self.config: dict[str, Any] = {"_class_name": "UNet2DModel", **cfg}

        chans = list(block_out_channels)
        n = len(chans)
        temb_ch = time_embedding_dim or chans[0] * 4
        groups, eps = norm_num_groups, norm_eps

        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb_ch)

        # Registration order down, up, mid reproduces diffusers' state-dict order.
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        out_ch = chans[0]
        for i, name in enumerate(down_block_types):
            in_ch, out_ch = out_ch, chans[i]
            self.down_blocks.append(
                DownBlock(
                    cfg,
                    in_ch,
                    out_ch,
                    temb_ch,
                    attention=_block_type(name) == "AttnDownBlock2D",
                    add_downsample=i < n - 1,
                )
            )

        self.mid_block = MidBlock(cfg, chans[-1], temb_ch) if mid_block_type is not None else None

        rev = chans[::-1]
        out_ch = rev[0]
        for i, name in enumerate(up_block_types):
            prev_out_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            self.up_blocks.append(
                UpBlock(
                    cfg,
                    in_ch,
                    prev_out_ch,
                    out_ch,
                    temb_ch,
                    attention=_block_type(name) == "AttnUpBlock2D",
                    add_upsample=i < n - 1,
                )
            )

        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=eps)
        self.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UNet2D:
        """Build from a diffusers ``UNet2DModel`` config dict (e.g. a parsed config.json).

        Private keys (``_class_name``, ``_diffusers_version``, ...) are ignored; other unknown
        keys are ignored with a warning, since a newer diffusers option could change the model.
        """
        unknown = sorted(k for k in cfg if k not in _DEFAULTS and not k.startswith("_"))
        if unknown:
            warnings.warn(f"UNet2D.from_config: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in cfg.items() if k in _DEFAULTS})

    @staticmethod
    def _timesteps(timestep: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
        """Any accepted timestep form -> a (batch,) tensor on ``device``, without host syncs."""
        if isinstance(timestep, Tensor):
            # 0-d, (1,) or (B,): reshape/expand are metadata-only, so a device tensor stays on
            # the device with nothing read back (CUDA-graph and fullgraph-compile safe).
            t = timestep.to(device).reshape(-1)
        else:
            # diffusers turns a Python number into a long tensor, truncating fractions; do too.
            t = torch.full((1,), int(timestep), dtype=torch.long, device=device)
        return t.expand(batch)

    def forward(self, sample: Tensor, timestep: Tensor | int | float) -> Tensor:
        """Predict the noise for ``sample`` (B, C, H, W) at ``timestep`` (number, 0-d or (B,))."""
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0

        t = self._timesteps(timestep, sample.shape[0], sample.device)
        t_emb = sinusoidal_embedding(
            t,
            self.conv_in.out_channels,
            self.config["flip_sin_to_cos"],
            self.config["freq_shift"],
        )
        # The sinusoid is always float32; the MLP may run in another dtype.
        emb = self.time_embedding(t_emb.to(self.time_embedding.linear_1.weight.dtype))

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb)
            skips.extend(block_skips)

        if self.mid_block is not None:
            x = self.mid_block(x, emb)

        for block in self.up_blocks:
            x = block(x, skips, emb)

        return self.conv_out(F.silu(self.conv_norm_out(x)))


def convert_legacy_attention_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename old diffusers attention keys (query/key/value/proj_attn) to the current ones.

    UNet2DModel checkpoints saved by early diffusers versions store their attention weights
    under the old names; diffusers renames them on load (``_fix_state_dict_keys_on_load``), and
    a loader of ours must too. Returns a new dict; current keys pass through unchanged.
    """
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        prefix, _, leaf = name.rpartition(".")  # leaf: weight / bias
        module_path, _, last = prefix.rpartition(".")
        if ".attentions." in f".{module_path}." and last in renames:
            name = f"{module_path}.{renames[last]}.{leaf}"
        out[name] = value
    return out
