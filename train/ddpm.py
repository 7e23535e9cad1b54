"""`puregen-fast train ddpm`: the paper's purification-specialised DDPM.

diffusers' ``train_unconditional`` recipe, which the authors ran (its default UNet is the paper's
113.7M model), with one change: training timesteps are drawn only from [0, ``max_timestep``)
(250), because purification never noises past t = 75..250. Epsilon-prediction MSE, AdamW
(beta1 0.95, weight decay 1e-6), cosine learning rate with a linear warm-up (500 steps; the
first update has learning rate 0, as in diffusers), gradient norm clipped to 1.0, and an EMA of
the weights with diffusers' ``EMAModel`` warm-up (decay ``1 - (1 + n / inv_gamma)^-power``,
at most ``ema_max_decay``).

Output: ``--out`` holds the EMA weights at top level (``--save-weights raw`` swaps them) and the
other set in ``raw/`` (or ``ema/``); ``weights.json`` records which is where.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from puregen_fast import noise as pgnoise
from puregen_fast import reference
from puregen_fast.data.io import atomic_write_json
from puregen_fast.dist import Dist
from puregen_fast.errors import UsageError
from puregen_fast.models.checkpoints import read_config, save_ddpm
from puregen_fast.models.schedule import DDPMSchedule
from puregen_fast.runtime import precision_context
from puregen_fast.train.config import UNET_PRESETS, DDPMConfig
from puregen_fast.train.data import TrainData, to_x
from puregen_fast.train.loop import Loop, TrainResult, run_training

__all__ = ["DDPMTrainer", "train_ddpm", "unet_config", "ema_decay", "STREAM_TRAIN_DDPM"]

STREAM_TRAIN_DDPM: int = getattr(pgnoise, "STREAM_TRAIN_DDPM", 4)


def ema_decay(n: int, max_decay: float, inv_gamma: float, power: float) -> float:
    """diffusers ``EMAModel.get_decay`` with ``use_ema_warmup`` for its ``n``-th update (n >= 1):
    0 on the first (the EMA starts as a copy), then ``1 - (1 + s / inv_gamma) ** -power``."""
    s = max(0, n - 1)
    if s <= 0:
        return 0.0
    return max(0.0, min(1 - (1 + s / inv_gamma) ** -power, max_decay))


def unet_config(cfg: DDPMConfig, size: int) -> dict[str, Any]:
    if cfg.unet_config:
        conf = read_config(cfg.unet_config, label="--unet-config")
    else:
        conf = copy.deepcopy(UNET_PRESETS[cfg.unet])
    conf["sample_size"] = size
    return conf


class DDPMTrainer(Loop):
    recipe = "ddpm"
    relative_keys = ("loss", "grad_norm")
    loss_keys = ("loss", "grad_norm", "lr")

    def __init__(self, cfg: DDPMConfig, data: TrainData, dist: Dist) -> None:
        if not 1 <= cfg.max_timestep <= cfg.num_train_timesteps:
            raise UsageError(
                f"--max-timestep must lie in [1, --num-train-timesteps {cfg.num_train_timesteps}]; "
                f"got {cfg.max_timestep}"
            )
        if cfg.lr <= 0 or cfg.warmup_steps < 0 or cfg.grad_clip < 0:
            raise UsageError("--lr must be > 0, --warmup-steps and --grad-clip >= 0")
        if not 0 <= cfg.ema_max_decay < 1:
            raise UsageError(f"--ema-max-decay must lie in [0, 1); got {cfg.ema_max_decay}")
        if not cfg.ema_inv_gamma > 0:
            raise UsageError(f"--ema-inv-gamma must be > 0; got {cfg.ema_inv_gamma}")
        super().__init__(cfg, data, dist)
        try:
            self.schedule = DDPMSchedule(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        except ValueError as e:
            raise UsageError(f"--num-train-timesteps/--beta-start/--beta-end: {e}") from e

    # -- set-up --------------------------------------------------------------------------------
    def build(self) -> None:
        from puregen_fast.models.unet import UNet2D

        cfg, dev = self.cfg, self.device
        h, w = self.data.hw
        if h != w:
            raise UsageError(f"{self.data.source}: the UNet needs square images; got {h}x{w}")
        conf = unet_config(cfg, h)
        levels = len(conf.get("block_out_channels", [0] * 4))
        if h % (2 ** (levels - 1)):
            raise UsageError(
                f"{self.data.source}: image size {h} must be divisible by {2 ** (levels - 1)} "
                f"for a {levels}-level UNet"
            )

        def make() -> torch.nn.Module:
            try:
                return UNet2D.from_config(conf)
            except (TypeError, ValueError) as e:
                raise UsageError(f"UNet config: {e}") from e

        self.unet = self.init_network(make)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, **self.optimizer_hparams())
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False) if cfg.ema else None
        self.ema_updates = 0
        self.abar = self.schedule.alphas_cumprod.to(dev)
        self.show_idx = torch.arange(min(8, len(self.data)))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "unet_config": dict(self.unet.config),
            "parameters": sum(p.numel() for p in self.unet.parameters()),
            "schedule": self.schedule.config,
        }

    def optimizer_hparams(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "betas": (c.adam_beta1, c.adam_beta2),
            "weight_decay": c.weight_decay,
            "eps": c.adam_eps,
        }

    # -- schedule ------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """diffusers' get_cosine_schedule_with_warmup(warmup, total) at ``step``."""
        wu, total = self.cfg.warmup_steps, self.total_steps
        if step < wu:
            return step / max(1, wu)
        progress = (step - wu) / max(1, total - wu)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    # -- one update ----------------------------------------------------------------------------
    def forward_backward(self, step: int) -> dict[str, float]:
        cfg, dev, g = self.cfg, self.device, self.gen
        B = cfg.batch_size
        idx = self.batch_indices(step)
        flip = torch.rand(B, generator=g) < 0.5 if cfg.hflip else None
        t_all = torch.randint(0, cfg.max_timestep, (B,), generator=g)
        sh = self.dist.shard(B)
        ids = idx[sh]
        x0 = to_x(self.images[ids], dev)
        if flip is not None:
            f = flip[sh].to(dev)
            x0 = torch.where(f[:, None, None, None], x0.flip(-1), x0)
        t = t_all[sh].to(dev)
        # the target noise is keyed by (seed, stream, step, image index): exact on resume
        z = pgnoise.randn(cfg.seed, STREAM_TRAIN_DDPM, step, ids.to(dev), x0.shape[1:], device=dev)
        ab = self.abar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * z
        with precision_context(cfg.precision, dev):
            pred = self.model(x_t, t)
        loss = F.mse_loss(pred.float(), z)
        gn = self.backward(loss)
        m = self.dist.all_reduce_mean(torch.stack([loss.detach(), gn.to(dev)]))
        loss_v, gn = m.tolist()
        return {"loss": loss_v, "grad_norm": gn}

    def apply(self, step: int) -> None:
        super().apply(step)  # clip, step
        if self.ema is not None:
            self.ema_updates += 1
            d = ema_decay(
                self.ema_updates, self.cfg.ema_max_decay, self.cfg.ema_inv_gamma, self.cfg.ema_power
            )
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.unet.parameters()):
                    e.sub_((1 - d) * (e - p))  # diffusers: s -= (1 - decay) * (s - param)

    # -- checkpoints ---------------------------------------------------------------------------
    def _layout(self) -> dict[str, str | None]:
        """Where each set of weights goes, relative to a checkpoint or run directory."""
        if self.ema is None:
            return {"raw": ".", "ema": None}
        if self.cfg.save_weights == "ema":
            return {"ema": ".", "raw": "raw"}
        return {"raw": ".", "ema": "ema"}

    def state(self) -> dict[str, Any]:
        return {"ema_updates": self.ema_updates}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ema_updates = int(state.get("ema_updates", 0))

    def write_weights(self, d: Path) -> None:
        lay = self._layout()
        save_ddpm(self.unet, d / lay["raw"])
        if self.ema is not None and lay["ema"] is not None:
            save_ddpm(self.ema, d / lay["ema"])
        info = {
            "top_level": "ema" if lay["ema"] == "." else "raw",
            "raw": lay["raw"],
            "ema": lay["ema"],
            "ema_max_decay": self.cfg.ema_max_decay if self.ema is not None else None,
            "ema_inv_gamma": self.cfg.ema_inv_gamma,
            "ema_power": self.cfg.ema_power,
            "ema_updates": self.ema_updates,
            "note": "pg.load_ddpm(DIR) loads the top-level weights; purify with the EMA "
            "(the authors' published pipeline holds EMA weights)",
        }
        atomic_write_json(d / "weights.json", info, sort_keys=False)

    def load_weights(self, d: Path) -> None:
        try:
            info = json.loads((d / "weights.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"checkpoint {str(d)!r}: unreadable weights.json ({e})") from e
        name = "diffusion_pytorch_model.safetensors"
        self.unet.load_state_dict(self.read_tensors(d / info["raw"] / name))
        if self.ema is not None:
            if not info.get("ema"):
                raise UsageError(f"checkpoint {str(d)!r} has no EMA weights; resume with --no-ema")
            self.ema.load_state_dict(self.read_tensors(d / info["ema"] / name))

    # -- plots ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_rows(self) -> list[torch.Tensor]:
        """Clean data; noised to t = purify_steps; the DDPM's purification of it (EMA weights)."""
        cfg, dev = self.cfg, self.device
        model = self.ema if self.ema is not None else self.unet
        was_training = model.training
        model.eval()
        x = to_x(self.images[self.show_idx], dev)
        ids = self.show_idx.to(dev)
        steps = min(cfg.purify_steps, self.schedule.num_train_timesteps - 1)
        stream = pgnoise.STREAM_DDPM

        def z(i: int) -> torch.Tensor:
            return pgnoise.randn(cfg.seed, stream, i, ids, x.shape[1:], device=dev)

        noised = self.schedule.add_noise(x, z(0), steps)
        with precision_context(cfg.precision, dev):
            out = reference.ddpm_purify(model, self.schedule, x, steps, noise=z).float()
        model.train(was_training)
        # the noised row is an input, not a model sample: clamped here as the grid would draw it,
        # so only the model's output is held to the sample range
        return [x, noised.clamp(-1, 1), out]


def train_ddpm(cfg: DDPMConfig, data: TrainData | None = None) -> TrainResult:
    """Train the purification DDPM with ``cfg``; see `train_ebm` for the contract."""
    return run_training(DDPMTrainer, cfg, data)
