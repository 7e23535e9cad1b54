"""`puregen-fast train ebm`: the paper's EBM recipe, persistent contrastive divergence.

One update (index k):

1. the data batch: epoch ``k // steps_per_epoch``'s permutation (a pure function of the seed and
   epoch), images in [-1, 1] plus ``data_noise`` Gaussian noise;
2. ``batch_size`` bank slots drawn without replacement; each restarts with probability
   ``rejuvenation`` from a fresh noised data image;
3. ``mcmc_steps`` Langevin steps on those chains from the engine's sampler, noise keyed by
   ``(seed, STREAM_TRAIN_EBM, k * mcmc_steps + i, slot)``; the chains go back into the bank;
4. loss ``((E(data) - E(samples)).mean() + alpha * (E(data)^2 + E(samples)^2).mean()) / temp``
   (alpha = ``--energy-reg``, 0 in the paper), Adam, learning rate times ``lr_gamma`` at each
   milestone epoch (and an optional linear warm-up).

Batch selection, rejuvenation and the data noise come from one seeded ``torch.Generator`` whose
state is checkpointed with the bank, so ``--resume`` continues exactly. Every rank draws the
global batch's numbers and keeps its slice, and the bank is the same on every rank.

``--objective dsm`` trains the same network by denoising score matching instead (Vincent 2011;
for EBMs, Saremi et al. 2018): each data image gets noise ``sigma * z`` with ``sigma`` drawn
log-uniformly from ``[dsm_sigma_min, dsm_sigma_max]``, and the score the sampler follows,
``-grad_x E / mcmc_temp``, is regressed on the denoising direction ``-z / sigma``; loss
``mean over images of |sigma * score + z|^2 / pixels`` (1 for an EBM that knows nothing). No
chains run, so an update costs one double backward instead of ``mcmc_steps`` sampler steps and
the energy cannot learn a drift the chains then follow. Why it exists: a small EBM trained
briefly by contrastive divergence on a CPU learns almost no pull back toward the images, so
Langevin purification with it is close to a random walk (12.3 levels RMS after 80 steps); the
same network trained by DSM pulls noise back (README, "A real-image experiment on a CPU"). No
bank: the checkpoint's is empty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from puregen_fast import noise as pgnoise
from puregen_fast import paper
from puregen_fast.dist import Dist
from puregen_fast.errors import UsageError
from puregen_fast.models.checkpoints import save_ebm
from puregen_fast.models.ebm import EBMSNGAN32
from puregen_fast.runtime import precision_context
from puregen_fast.train.config import EBMConfig
from puregen_fast.train.data import TrainData, to_x
from puregen_fast.train.loop import Loop, TrainResult, run_training
from puregen_fast.train.sampler import TrainSampler

__all__ = ["EBMTrainer", "train_ebm", "STREAM_TRAIN_EBM"]

STREAM_TRAIN_EBM: int = getattr(pgnoise, "STREAM_TRAIN_EBM", 3)


def _parse_milestones(spec: str) -> list[int]:
    try:
        return sorted(int(t) for t in spec.split(",") if t.strip())
    except ValueError as e:
        raise UsageError(f"--lr-milestones {spec!r}: expected comma-separated epochs") from e


class EBMTrainer(Loop):
    recipe = "ebm"
    relative_keys = ("energy_abs", "gap_abs", "grad_norm")
    # energies drift and the gap crosses zero on healthy runs: the trend rule would misread them
    trend_keys = ("grad_norm",)
    loss_keys = ("loss", "e_data", "e_samples", "grad_norm")

    def __init__(self, cfg: EBMConfig, data: TrainData, dist: Dist) -> None:
        checks = [
            (cfg.nf >= 1, "--nf must be >= 1"),
            (cfg.patch_size >= 1, "--patch-size must be >= 1"),
            (cfg.mcmc_steps >= 1, "--mcmc-steps must be >= 1"),
            (cfg.mcmc_eps > 0 and cfg.mcmc_temp > 0, "--mcmc-eps and --mcmc-temp must be > 0"),
            (0 <= cfg.rejuvenation <= 1, "--rejuvenation must lie in [0, 1]"),
            (cfg.data_noise >= 0, "--data-noise must be >= 0"),
            (
                0 < cfg.dsm_sigma_min <= cfg.dsm_sigma_max,
                "--dsm-sigma-min and --dsm-sigma-max must satisfy 0 < min <= max",
            ),
            (cfg.lr > 0, "--lr must be > 0"),
            (
                cfg.grad_clip >= 0 and cfg.energy_reg >= 0 and cfg.warmup_steps >= 0,
                "--grad-clip, --energy-reg and --warmup-steps must be >= 0",
            ),
            (
                cfg.objective == "dsm" or cfg.bank_size >= cfg.batch_size,
                f"--bank-size {cfg.bank_size} must be >= --batch-size {cfg.batch_size}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        super().__init__(cfg, data, dist)
        self.milestones = _parse_milestones(cfg.lr_milestones)

    # -- set-up --------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, dev = self.cfg, self.device
        self.ebm = self.init_network(lambda: EBMSNGAN32(nf=cfg.nf, patch_size=cfg.patch_size))
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, **self.optimizer_hparams())
        self.sampler = TrainSampler(
            self.ebm,
            cfg.mcmc_steps,
            cfg.mcmc_eps,
            cfg.mcmc_temp,
            cfg.seed,
            dev,
            cfg.precision,
            cfg.backend,
            cfg.conv_impl,
        )
        self.bank = self._init_bank()
        # a fixed set of data images for the sample grids
        self.show_idx = torch.arange(min(16, len(self.data)))

    def _noised_data(self, idx: torch.Tensor) -> torch.Tensor:
        x = to_x(self.images[idx], self.device)
        z = torch.randn(x.shape, generator=self.gen).to(self.device)
        return x + self.cfg.data_noise * z

    def _init_bank(self) -> torch.Tensor:
        cfg = self.cfg
        h, w = self.data.hw
        if cfg.objective == "dsm":  # no chains
            return torch.empty((0, 3, h, w), device=self.device)
        bank = torch.empty((cfg.bank_size, 3, h, w), device=self.device)
        for lo in range(0, cfg.bank_size, 1024):  # chunks keep the host copy small
            n = min(1024, cfg.bank_size - lo)
            if cfg.bank_init == "uniform":
                bank[lo : lo + n] = (torch.rand((n, 3, h, w), generator=self.gen) * 2 - 1).to(
                    self.device
                )
            else:
                idx = torch.randint(len(self.data), (n,), generator=self.gen)
                bank[lo : lo + n] = self._noised_data(idx)
        return bank

    def describe(self) -> dict[str, Any]:
        if self.cfg.objective == "dsm":
            loss = ("(|sigma * (-grad_x E(x + sigma z) / mcmc_temp) + z|^2).mean over images "
                    "/ pixels, log sigma ~ U[log dsm_sigma_min, log dsm_sigma_max]")  # fmt: skip
        else:
            loss = ("((E(data) - E(samples)).mean() "
                    "+ energy_reg * (E(data)^2 + E(samples)^2).mean()) / mcmc_temp")  # fmt: skip
        return {**super().describe(), "sampler": self.sampler.impl, "loss": loss}

    def optimizer_hparams(self) -> dict[str, Any]:
        c = self.cfg
        return {"betas": (c.adam_beta1, c.adam_beta2), "weight_decay": c.weight_decay}

    # -- schedule ------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        f = self.cfg.lr_gamma ** sum(epoch >= m for m in self.milestones)
        if self.cfg.warmup_steps > 0:
            f *= min(1.0, (step + 1) / self.cfg.warmup_steps)
        return f

    # -- one update ----------------------------------------------------------------------------
    def progress_units(self) -> int:
        """PCD: each of the chains' ``mcmc_steps`` moves the bar, then the update (DSM runs no
        chain: the update alone)."""
        return 1 if self.cfg.objective == "dsm" else self.cfg.mcmc_steps + 1

    def energies(self, x: torch.Tensor) -> torch.Tensor:
        """E of a batch through the (DDP-wrapped) model; one forward for data and samples."""
        with precision_context(self.cfg.precision, self.device):
            return self.model(x).float()

    def _negatives(self, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` bank slots, rejuvenate some from fresh noised data, run the sampler on this
        rank's share of them and put the chains back: (this rank's negatives, rejuvenated)."""
        cfg, dev, g = self.cfg, self.device, self.gen
        slots = torch.randperm(cfg.bank_size, generator=g)[:n]
        rejuv = torch.rand(n, generator=g) < cfg.rejuvenation
        fresh = torch.randint(len(self.data), (n,), generator=g)
        fresh_x = self._noised_data(fresh)
        slots_dev = slots.to(dev)
        if bool(rejuv.any()):
            r = rejuv.to(dev)
            self.bank[slots_dev[r]] = fresh_x[r]
        my_slots = slots_dev[self.dist.shard(n)]
        x_neg = self.sampler(self.bank[my_slots], my_slots, STREAM_TRAIN_EBM, step * cfg.mcmc_steps,
                             progress=self.tick)  # fmt: skip
        self.bank[slots_dev] = self.dist.all_gather_cat(x_neg.detach())
        return x_neg, rejuv

    def _flipped(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.hflip:
            return x
        flip = (torch.rand(x.shape[0], generator=self.gen) < 0.5).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def forward_backward(self, step: int) -> dict[str, float]:
        if self.cfg.objective == "dsm":
            return self._dsm(step)
        cfg, dev = self.cfg, self.device
        B = cfg.batch_size
        # global draws, in a fixed order, on every rank
        x_data = self._flipped(self._noised_data(self.batch_indices(step)))
        x_neg, rejuv = self._negatives(step, B)

        e = self.energies(torch.cat([x_data[self.dist.shard(B)], x_neg.detach()]))
        e_d, e_s = e[: x_neg.shape[0]], e[x_neg.shape[0] :]
        loss = e_d.mean() - e_s.mean()
        if cfg.energy_reg > 0:
            loss = loss + cfg.energy_reg * (e_d.square() + e_s.square()).mean()
        loss = loss / cfg.mcmc_temp
        gn = self.backward(loss)
        m = torch.stack(
            [
                loss.detach(),
                e_d.mean().detach(),
                e_s.mean().detach(),
                gn.to(dev),
                rejuv.sum().to(dev, torch.float32),  # one global draw: the same on every rank
            ]
        )
        # the samples' peak rides on the metrics' one host read; NaN -> inf so a MAX reduce
        # over ranks cannot drop it
        xmax = torch.nan_to_num(x_neg.detach().abs().amax().float(), nan=math.inf)
        xmax = self.dist.all_reduce_max(xmax)
        vals = torch.cat([self.dist.all_reduce_mean(m), xmax.reshape(1).to(m.device)])
        loss_v, ed, es, gn_v, nrej, xmax = vals.tolist()
        return {
            "loss": loss_v,
            "e_data": ed,
            "e_samples": es,
            "gap": ed - es,
            "energy_abs": max(abs(ed), abs(es)),
            "gap_abs": abs(ed - es),
            "grad_norm": gn_v,
            "sample_abs_max": xmax,
            "rejuvenated": nrej,
        }

    def _dsm(self, step: int) -> dict[str, float]:
        """One denoising-score-matching update (module docstring)."""
        cfg, dev, g = self.cfg, self.device, self.gen
        B = cfg.batch_size
        # global draws, in a fixed order, on every rank; this rank keeps its slice
        x = self._flipped(to_x(self.images[self.batch_indices(step)], dev))
        lo, hi = math.log(cfg.dsm_sigma_min), math.log(cfg.dsm_sigma_max)
        sigma = torch.exp(torch.rand(B, generator=g) * (hi - lo) + lo).to(dev)[:, None, None, None]
        z = torch.randn(x.shape, generator=g).to(dev)
        mine = self.dist.shard(B)
        x, sigma, z = x[mine], sigma[mine], z[mine]
        xn = (x + sigma * z).requires_grad_(True)
        # clean and noised images in one forward; the score is taken at the noised ones only
        e = self.energies(torch.cat([x, xn]))
        e_d, e_n = e[: x.shape[0]], e[x.shape[0] :]
        (grad,) = torch.autograd.grad(e_n.sum(), xn, create_graph=True)
        score = -grad / cfg.mcmc_temp
        loss = (sigma * score + z).square().flatten(1).sum(1).mean() / x[0].numel()
        gn = self.backward(loss)
        m = torch.stack([loss.detach(), e_d.mean().detach(), e_n.mean().detach(), gn.to(dev)])
        loss_v, ed, es, gn_v = self.dist.all_reduce_mean(m).tolist()
        return {
            "loss": loss_v,
            "e_data": ed,
            "e_samples": es,  # the noised images
            "gap": ed - es,
            "energy_abs": max(abs(ed), abs(es)),
            "gap_abs": abs(ed - es),
            "grad_norm": gn_v,
            "sample_abs_max": float(self.dist.all_reduce_max(xn.detach().abs().amax())),
            "rejuvenated": 0.0,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"bank": self.bank.detach().cpu()}

    def load_state(self, state: dict[str, Any]) -> None:
        bank = state["bank"]
        if tuple(bank.shape) != tuple(self.bank.shape):
            raise UsageError(
                f"--resume: the checkpoint's bank has shape {tuple(bank.shape)}, "
                f"this run's {tuple(self.bank.shape)}"
            )
        self.bank.copy_(bank.to(self.device))

    def sampling(self) -> dict[str, Any]:
        """The chain this EBM is made for, written beside its weights (sampling.json): purify
        uses it unless flags say otherwise. Contrastive training shapes the energy for the
        training chain's step size and temperature, with the paper's 150 steps; a denoising
        (DSM) network for the colder chain measured on the photo set (README)."""
        if self.cfg.objective == "dsm":
            return {"ebm_steps": 80, "ebm_eps": 5e-3, "ebm_temp": 1e-5,
                    "why": "train ebm --objective dsm: the colder chain measured for DSM EBMs"}
        return {"ebm_steps": paper.LANGEVIN_STEPS, "ebm_eps": self.cfg.mcmc_eps,
                "ebm_temp": self.cfg.mcmc_temp,
                "why": f"train ebm --objective pcd: the paper's {paper.LANGEVIN_STEPS} steps at "
                       "the training chain's --mcmc-eps and --mcmc-temp"}  # fmt: skip

    def write_weights(self, d: Path) -> None:
        save_ebm(self.ebm, d, sampling=self.sampling())

    def load_weights(self, d: Path) -> None:
        self.ebm.load_state_dict(self.read_tensors(d / "model.safetensors"))

    # -- plots ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_rows(self) -> list[torch.Tensor]:
        """Data; bank chains (the negatives; not for dsm); data after one sampler run (a
        purification)."""
        x = to_x(self.images[self.show_idx], self.device)
        ids = self.show_idx.to(self.device)
        purified = self.sampler(x, ids, pgnoise.STREAM_EBM, 0)
        if self.cfg.objective == "dsm":
            return [x, purified]
        return [x, self.bank[: len(self.show_idx)], purified]


def train_ebm(cfg: EBMConfig, data: TrainData | None = None) -> TrainResult:
    """Train an EBM with ``cfg``; returns when the epochs or ``cfg.steps`` are done.

    Raises `UsageError` for bad input and `TrainingDiverged` (a UsageError) after rolling the
    run directory back to its last good checkpoint.
    """
    return run_training(EBMTrainer, cfg, data, min_hw=4 * cfg.patch_size)
