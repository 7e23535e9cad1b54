"""The loop both recipes share: run directory, exact resume, the step loop with its learning-rate
schedule, the divergence watch with rollback, checkpoints, metrics, progress, plots.

A recipe subclasses `Loop` and provides the model-specific parts (`build`, `forward_backward`,
`state`/`load_state`, `write_weights`, `load_weights`, `sample_rows`; `apply` where an update
does more than step the optimiser). The parts both recipes share are written here once: the
network set-up (`init_network`: seeded, DDP across ranks), the data order (`batch_indices`), the
gradients with their norm (`backward`) and the clipped optimiser step (`apply`).

Steps are counted as completed optimiser steps: the checkpoint "step k" holds the state after k
updates, and the update that follows it has index k (which keys its noise and data).
"""

from __future__ import annotations

import abc
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from puregen_fast.data.io import atomic_write_json
from puregen_fast.dist import Dist
from puregen_fast.errors import UsageError
from puregen_fast.train.config import check_config, recipe_of
from puregen_fast.train.data import TrainData, load_train_data
from puregen_fast.train.plots import SampleRangeError, save_curves, save_grid
from puregen_fast.train.state import RunDir, capture_rng, restore_rng
from puregen_fast.train.watch import DivergenceWatch, WatchConfig

__all__ = ["Loop", "TrainResult", "TrainingDiverged", "epoch_permutation", "grad_norm"]


def host_images(images: np.ndarray) -> torch.Tensor:
    """The training images as a host tensor. torch wants a writable buffer, and the data set's
    cache is a read-only map: a whole cached file is mapped again copy-on-write (nothing is
    copied, and the file can never change); anything else read-only is copied."""
    a = np.ascontiguousarray(images)
    if not a.flags.writeable:
        name = getattr(a, "filename", None)
        cow = np.load(name, mmap_mode="c") if name else None
        a = cow if cow is not None and cow.shape == a.shape and cow.dtype == a.dtype else a.copy()
    return torch.from_numpy(a)



class TrainingDiverged(UsageError):
    """Training blew up; the run directory was rolled back to its last good checkpoint."""

    def __init__(self, message: str, step: int, good_step: int, reason: str, ckpt: Path) -> None:
        super().__init__(message)
        self.step, self.good_step, self.reason, self.checkpoint = step, good_step, reason, ckpt


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # optimiser steps completed
    total_steps: int  # the recipe's epochs * steps per epoch
    stopped: str  # "done" (all epochs), "steps" (--steps reached), "interrupted"
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's
    checkpoint: Path | None = None


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of an epoch: a pure function of (seed, epoch), so resuming mid-epoch needs
    no saved permutation."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (1 << 63))
    return torch.randperm(n, generator=g)


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (0-d tensor, no host sync)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def _finite_or_none(v: float) -> float | None | str:
    return v if math.isfinite(v) else str(v)


class Loop(abc.ABC):
    recipe = ""
    relative_keys: tuple[str, ...] = ()
    trend_keys: tuple[str, ...] | None = None  # the watch's trend rule (None: relative_keys)
    loss_keys: tuple[str, ...] = ("loss",)  # the panels of loss.png

    def __init__(self, cfg: Any, data: TrainData, dist: Dist) -> None:
        self.cfg, self.data, self.dist = cfg, data, dist
        self.device = dist.device
        self.run = RunDir(cfg.out, self.recipe)
        self.hparams = recipe_of(cfg)
        n, b = len(data), cfg.batch_size
        if b < 1 or b % dist.world:
            raise UsageError(
                f"--batch-size {b} must be a positive multiple of the {dist.world} ranks"
            )
        if n < b:
            raise UsageError(
                f"{data.source}: {n} images, fewer than --batch-size {b}; lower --batch-size"
            )
        if cfg.epochs < 1:
            raise UsageError(f"--epochs must be >= 1; got {cfg.epochs}")
        self.steps_per_epoch = n // b  # the last partial batch is dropped: fixed shapes
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_at = self.total_steps if cfg.steps is None else min(cfg.steps, self.total_steps)
        if cfg.steps is not None and cfg.steps > self.total_steps and dist.is_main:
            # --epochs binds first: say so, or a run stops short of the --steps asked for
            print(f"train {self.recipe}: --steps {cfg.steps} is more than --epochs "
                  f"{cfg.epochs} x {self.steps_per_epoch} steps per epoch ({n} images // batch "
                  f"{b}) = {self.total_steps}: training stops after {self.total_steps} steps; "
                  f"raise --epochs to run {cfg.steps}", file=sys.stderr)  # fmt: skip
        if cfg.steps is not None and cfg.steps < 0:
            raise UsageError(f"--steps must be >= 0; got {cfg.steps}")
        if cfg.log_every < 1:
            raise UsageError(f"--log-every must be >= 1; got {cfg.log_every}")
        self.gen = torch.Generator().manual_seed(cfg.seed)  # everything but the keyed noise
        wcfg = WatchConfig.from_config(cfg)
        if wcfg.problems():
            raise UsageError("; ".join(wcfg.problems()))
        self.watch = DivergenceWatch(wcfg, self.relative_keys, self.trend_keys)
        self.images = host_images(data.images)  # uint8 NHWC, host
        self.step = 0
        self.saved_step: int | None = None  # in memory on every rank: ranks decide alike
        self._stop = False
        self._plotted_step: int | None = None
        self._perm_cache: tuple[int, torch.Tensor] | None = None
        self._gn = torch.zeros(())  # the last `backward`'s gradient norm
        # told of the parts of the current update done (`progress_units`); set while a bar shows
        self.tick: Callable[[int], None] | None = None
        self.model: nn.Module
        self.params: list[nn.Parameter]
        self.optimizer: torch.optim.Optimizer

    # -- hooks -------------------------------------------------------------------------------
    @abc.abstractmethod
    def build(self) -> None: ...

    def progress_units(self) -> int:
        """The parts one update reports to the bar through `tick` (the EBM's PCD: each chain
        step, then the update), so a long update moves it; 1: the update alone."""
        return 1

    @abc.abstractmethod
    def forward_backward(self, step: int) -> dict[str, float]:
        """Compute the loss of update ``step`` and its gradients; return the metrics (reduced
        over ranks). The optimiser has not stepped yet, so a bad step can be refused."""
        ...

    def apply(self, step: int) -> None:
        """Clip the gradient norm to ``--grad-clip`` (0: off), then step the optimiser; a recipe
        that also updates an EMA extends this."""
        if self.cfg.grad_clip > 0:
            coef = torch.clamp(self.cfg.grad_clip / (self._gn + 1e-6), max=1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.device))
        self.optimizer.step()

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what `state` saved (none by default)."""

    @abc.abstractmethod
    def write_weights(self, d: Path) -> None: ...

    @abc.abstractmethod
    def load_weights(self, d: Path) -> None: ...

    def sample_rows(self) -> list[torch.Tensor]:
        return []

    def lr_factor(self, step: int) -> float:
        return 1.0

    def describe(self) -> dict[str, Any]:
        """What ran, for recipe.json; a recipe adds its own entries."""
        return {
            "device": str(self.device),
            "world_size": self.dist.world,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "data": {"source": self.data.source, "images": len(self.data)},
        }

    def optimizer_hparams(self) -> dict[str, Any]:
        """The optimiser's per-group settings from the flags (betas, weight decay, ...)."""
        return {}

    # -- the pieces both recipes share ---------------------------------------------------------
    def init_network(self, make: Callable[[], nn.Module]) -> nn.Module:
        """``make()`` on this device, its initial weights a function of ``--seed`` only, in
        training mode; sets ``self.params`` and ``self.model`` (DDP-wrapped across ranks)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            net = make().to(self.device)
        net.train()
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.model = net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.device
            self.model = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        return net

    def read_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """A safetensors file's tensors on this device."""
        from safetensors.torch import load_file

        return load_file(str(path), device=str(self.device))

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, epoch_permutation(self.cfg.seed, epoch, len(self.data)))
        return self._perm_cache[1]

    def batch_indices(self, step: int) -> torch.Tensor:
        """The data indices of update ``step`` (the global batch): its slice of its epoch's
        permutation."""
        epoch, b = divmod(step, self.steps_per_epoch)
        n = self.cfg.batch_size
        return self._perm(epoch)[b * n : (b + 1) * n]

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The gradients of ``loss``; returns their global norm, which `apply` clips with."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._gn = grad_norm(self.params)
        return self._gn

    # -- learning rate -----------------------------------------------------------------------
    def set_lr(self, step: int) -> float:
        """A pure function of the step, so the schedule resumes exactly with the step."""
        lr = self.cfg.lr * self.lr_factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    # -- checkpoints -------------------------------------------------------------------------
    def _full_state(self) -> dict[str, Any]:
        return {
            "hparams": self.hparams,
            "epoch": self.step // self.steps_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "kind": "step-function",
                "last_step": self.step,
                "lr": self.optimizer.param_groups[0]["lr"],
            },
            "generator": self.gen.get_state(),
            "rng": capture_rng(),
            "watch": self.watch.state_dict(),
            **self.state(),
        }

    def save(self) -> Path | None:
        path = None
        if self.dist.is_main:
            path = self.run.save_checkpoint(
                self.step, self._full_state(), self.write_weights, self.cfg.keep_ckpts
            )
        self.dist.barrier()
        self.saved_step = self.step
        return path

    def _check_resume(self, run_src: Path, cands: list[Path]) -> tuple[Path, dict[str, Any]]:
        """The newest readable checkpoint among ``cands`` (newest first) and its state; a
        damaged one (truncated state.pt or weights, bad JSON) is skipped with a warning."""
        doc = self.run.read_recipe(run_src)
        if doc is not None:
            self._check_doc(doc, run_src)
        damaged: list[str] = []
        for ckpt in cands:
            why = RunDir.damage(ckpt)
            state: dict[str, Any] | None = None
            if why is None:
                try:
                    state = RunDir.load_state(ckpt, self.device)
                except UsageError as e:
                    why = str(e)
            if state is None:
                damaged.append(f"{ckpt.name} ({why})")
                if self.dist.is_main and len(cands) > 1:
                    print(
                        f"train {self.recipe}: warning: checkpoint {str(ckpt)!r} is damaged "
                        f"({why}); trying the one before it",
                        file=sys.stderr,
                    )
                continue
            self._check_doc(
                {
                    "recipe": state.get("recipe"),
                    "format": state.get("format"),
                    "hparams": state.get("hparams", {}),
                },
                ckpt,
            )
            return ckpt, state
        if len(cands) == 1 and damaged:
            raise UsageError(f"--resume: cannot read checkpoint {str(cands[0])!r}: {damaged[0]}")
        raise UsageError(
            f"--resume {str(run_src)!r}: every checkpoint is damaged ({'; '.join(damaged)}); "
            "start a fresh run with another --out"
        )

    def _check_doc(self, doc: dict[str, Any], where: Path) -> None:
        try:
            self.run.check_recipe(doc, self.hparams, where)
        except UsageError:
            if not self.cfg.force_resume or doc.get("recipe") != self.recipe:
                raise
            self._forced = True

    def _start(self) -> None:
        """Build, then resume (``--resume``) or start a fresh run with a step-0 checkpoint."""
        self._forced = False
        self.build()
        used = bool(self.run.checkpoints()) or self.run.read_recipe() is not None
        self.dist.barrier()  # every rank looks at --out before rank 0 writes into it
        if self.dist.is_main:
            gone = self.run.clean_leftovers()
            if gone:
                print(
                    f"train {self.recipe}: removed {len(gone)} leftover(s) of an interrupted "
                    f"write in {str(self.run.path)!r}",
                    file=sys.stderr,
                )
        if self.cfg.resume is not None:
            self._resume(used)
            return
        if used:
            raise UsageError(
                f"--out {str(self.run.path)!r} already holds a training run; pass --resume to "
                "continue it, or choose another --out"
            )
        if self.dist.is_main:
            self.run.write_recipe(self.hparams, {"describe": self.describe()})
        self.save()  # step 0: there is always a good checkpoint to roll back to

    def _resume(self, used: bool) -> None:
        run_src, cands = self.run.resume_candidates(self.cfg.resume)
        elsewhere = run_src.resolve() != self.run.path.resolve()
        if elsewhere and used:
            raise UsageError(
                f"--out {str(self.run.path)!r} already holds another training run; resume "
                f"from {str(run_src)!r} into a new --out, or into {str(run_src)!r} itself"
            )
        ckpt, state = self._check_resume(run_src, cands)
        self.dist.barrier()  # every rank has read the checkpoints before any is moved
        if not elsewhere and self.dist.is_main:
            self._set_aside_newer(ckpt)
        self._restore(ckpt, state)
        if not elsewhere and self.dist.is_main:
            self.run.truncate_metrics(self.step)  # the steps after it are logged again
        if self.dist.is_main:
            self._log_event("resume", {"from": str(ckpt), "forced_recipe_change": self._forced})
            if self._forced or elsewhere:
                self.run.write_recipe(self.hparams, {"resumed_from": str(ckpt)})
        self.dist.barrier()
        if elsewhere:  # the new run directory starts with the state it continues from
            self.save()

    def _restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        self.load_weights(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        for g in self.optimizer.param_groups:  # this run's flags (differ only if forced)
            g.update(self.optimizer_hparams())
        self.gen.set_state(state["generator"].cpu())
        restore_rng(state["rng"])
        self.watch.load_state_dict(state["watch"])
        self.load_state(state)
        self.step = int(state["step"])
        self.saved_step = self.step

    # -- logging -----------------------------------------------------------------------------
    def _log_event(self, event: str, info: dict[str, Any]) -> None:
        self.run.log({"event": event, "step": self.step, "time": time.time(), **info})

    def _plots(self) -> None:
        """The sample grid and loss.png (rank 0). Samples of the current weights that are
        non-finite or out of range are a divergence (every rank rolls back), not a grid."""
        if self._plotted_step == self.step:
            return
        self._plotted_step = self.step
        bad = self._draw() if self.dist.is_main else None
        if self.dist.enabled:
            flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
            refused = bool(self.dist.all_reduce_max(flag).item() > 0)
        else:
            refused = bad is not None
        if not refused:
            return
        why = f"the sample grid {bad or '(on rank 0)'}"
        if self.watch.cfg.enabled:
            raise self._rollback(self.step, why, self.step)
        if bad is not None:
            print(f"train {self.recipe}: no grid at step {self.step}: {why}", file=sys.stderr)

    def _draw(self) -> str | None:
        """Write the grid and loss.png; the grid's refusal, if it refused."""
        self.run.samples.mkdir(parents=True, exist_ok=True)
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            # a grid never moves the global RNG: the next checkpoint saves it
            with torch.random.fork_rng(devices=devices):
                rows = self.sample_rows()
        except Exception as e:  # a plot must not end a long run
            print(
                f"train {self.recipe}: no sample grid at step {self.step} "
                f"({type(e).__name__}: {e})",
                file=sys.stderr,
            )
            rows = []
        refused = None
        if rows:
            try:
                save_grid(
                    rows,
                    self.run.samples / f"step_{self.step:08d}.png",
                    margin=self.watch.cfg.sample_margin,
                )
            except SampleRangeError as e:
                refused = str(e)
        by_step: dict[int, dict[str, Any]] = {}
        for r in self.run.read_metrics():
            if "event" not in r and "step" in r:
                by_step[int(r["step"])] = r  # a re-run step (after a resume) overrides
        steps = sorted(by_step)
        series = {}
        for k in self.loss_keys:
            pts = [(s, by_step[s][k]) for s in steps if isinstance(by_step[s].get(k), (int, float))]
            series[k] = ([p[0] for p in pts], [p[1] for p in pts])
        save_curves(
            series, self.run.path / "loss.png", title=f"train {self.recipe}: {self.run.path.name}"
        )
        return refused

    def _set_aside_newer(self, ckpt: Path) -> None:
        """Resuming an older checkpoint of this run abandons the newer ones: move them aside so
        a later --resume, the pruning and a rollback never pick the abandoned trajectory."""
        if not ckpt.name.startswith("step_"):
            return
        resumed = int(ckpt.name[5:])
        n, aside = self.run.move_newer_aside(resumed)
        if not n:
            return
        self.run.point_latest(resumed, ckpt)
        print(
            f"train {self.recipe}: resuming step {resumed} abandons {n} newer "
            f"checkpoint(s); moved to {str(aside)!r}",
            file=sys.stderr,
        )

    # -- divergence ----------------------------------------------------------------------------
    def _rollback(self, at_step: int, reason: str, suspect_from: int | None) -> TrainingDiverged:
        """Reset the run directory to the newest checkpoint older than ``suspect_from`` (the
        first step whose weights misbehaved: its checkpoint is suspect too); newer ones are
        moved aside."""
        saved = self.saved_step if self.saved_step is not None else -1
        ck = [(k, d) for k, d in self.run.checkpoints() if k <= saved]
        bound = saved if suspect_from is None else min(saved, suspect_from - 1)
        trusted = [(k, d) for k, d in ck if k <= bound]
        note = ""
        if ck and not trusted:
            note = (
                f" (no checkpoint before step {bound + 1} is left; step {ck[0][0]} is the "
                "oldest and may hold the diverging weights)"
            )
            trusted = ck[:1]
        if not ck:  # cannot happen: a run always starts by saving one; be clear if it does
            return TrainingDiverged(
                f"training diverged at step {at_step}: {reason}; no checkpoint to roll back to",
                at_step,
                -1,
                reason,
                self.run.ckpt_root,
            )
        good_step, good = trusted[-1]
        if self.dist.is_main:
            _, aside = self.run.move_newer_aside(good_step)
            self.run.point_latest(good_step, good)
            self.run.publish_weights(good)
            info = {
                "diverged_at_step": at_step,
                "reason": reason,
                "rolled_back_to_step": good_step,
                "checkpoint": str(good),
                "set_aside": str(aside) if aside else None,
            }
            atomic_write_json(self.run.path / "divergence.json", info, sort_keys=False)
            self._log_event("diverged", info)
        self.load_weights(good)  # the in-memory model is the good one too
        self.dist.barrier()
        msg = (
            f"training diverged at step {at_step}: {reason}. Rolled back: {str(self.run.path)!r} "
            f"holds the last good checkpoint, step {good_step} ({good}){note}. To go on from "
            "there, add "
            "a stabiliser (--grad-clip 1.0, --energy-reg 0.1, --warmup-steps 1000, or a lower "
            "--lr) and pass --resume --force-resume; or disable the watch with --no-watch"
        )
        return TrainingDiverged(msg, at_step, good_step, reason, good)

    # -- the loop ----------------------------------------------------------------------------
    def _install_signals(self) -> list[tuple[int, Any]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        old = []

        def handler(signum: int, frame: Any) -> None:
            if self._stop:  # a second interrupt: stop now
                raise KeyboardInterrupt
            self._stop = True

        for s in (signal.SIGINT, signal.SIGTERM):
            old.append((s, signal.signal(s, handler)))
        return old

    def _stop_requested(self) -> bool:
        if not self.dist.enabled:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        return bool(self.dist.all_reduce_mean(flag).item() > 0)

    def _progress_bar(self) -> Any:
        if not (self.dist.is_main and self.cfg.progress):
            return None
        from tqdm import tqdm

        units = self.progress_units()
        kw: dict[str, Any] = {}
        if units > 1:  # counts the parts of updates, shows updates to a tenth (as purify's bar)
            kw = {"unit_scale": 1 / units, "bar_format": _PART_BAR}
        return tqdm(
            total=self.stop_at * units,
            initial=self.step * units,
            desc=f"train {self.recipe}",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.25,
            **kw,
        )

    def _update(self) -> tuple[dict[str, float], float, float]:
        """One update, refused (and the run rolled back) when the watch fires; returns its
        metrics, learning rate and images per second."""
        t0 = time.perf_counter()
        k = self.step  # the index of this update
        lr = self.set_lr(k)
        metrics = self.forward_backward(k)
        reason = self.watch.check(k + 1, metrics)
        if reason is not None:
            raise self._rollback(k + 1, reason, self.watch.suspect_from)
        self.apply(k)
        self.step = k + 1
        return metrics, lr, self.cfg.batch_size / max(time.perf_counter() - t0, 1e-9)

    def _log_step(self, metrics: dict[str, float], lr: float, ips: float) -> None:
        if not self.dist.is_main:
            return
        if self.step % self.cfg.log_every and self.step != self.stop_at:
            return
        row = {k: _finite_or_none(v) for k, v in metrics.items()}
        self.run.log(
            {
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "lr": lr,
                "images_per_s": round(ips, 2),
                "time": time.time(),
                **row,
            }
        )

    def _after_step(self, save_due: bool) -> bool:
        """Sample grids at epoch ends, a checkpoint when one is due and the watch has no open
        streak; returns whether one is still due."""
        cfg, per = self.cfg, self.steps_per_epoch
        if self.step % per == 0 and (self.step // per) % max(cfg.sample_every, 1) == 0:
            self._plots()
        save_due = save_due or self.step % max(cfg.ckpt_every, 1) == 0
        if save_due and not self.watch.pending:
            self.save()
            return False
        return save_due

    def _steps(self, bar: Any) -> tuple[dict[str, float], str]:
        """Update until the end, ``--steps`` or an interrupt: (last metrics, why it stopped)."""
        metrics: dict[str, float] = {}
        save_due, rate = False, 0.0
        while self.step < self.stop_at:
            parts = _Parts(bar, self.progress_units())
            self.tick = parts if bar is not None else None
            try:
                metrics, lr, ips = self._update()
            finally:
                self.tick = None
            rate = ips if rate == 0 else 0.9 * rate + 0.1 * ips
            self._log_step(metrics, lr, ips)
            if bar is not None:
                parts.finish()
                bar.set_postfix(
                    loss=f"{metrics.get('loss', float('nan')):.4g}", img_s=f"{rate:.1f}"
                )
            save_due = self._after_step(save_due)
            if self._stop_requested():
                return metrics, "interrupted"
        return metrics, "done" if self.step >= self.total_steps else "steps"

    def _finish(self) -> None:
        if self.watch.pending:  # ending inside an open streak: keep the last good checkpoint
            if self.dist.is_main:
                ck = self.run.checkpoints()
                self.run.publish_weights(ck[-1][1])
                self._log_event("end_pending", {"kept_step": ck[-1][0]})
            return
        self._plots()  # first: weights whose samples diverge are not saved
        if self.saved_step != self.step:  # not the disk: rank 0 may be writing it now
            self.save()

    def train(self) -> TrainResult:
        """Start or resume, update to the end (or ``--steps``, or an interrupt), checkpoint."""
        self._start()
        old_handlers = self._install_signals()
        bar = self._progress_bar()
        try:
            metrics, stopped = self._steps(bar)
            self._finish()
        finally:
            if bar is not None:
                bar.close()
            for s, h in old_handlers:
                signal.signal(s, h)
        last = self.run.checkpoints()
        return TrainResult(
            self.run.path,
            self.step,
            self.total_steps,
            stopped,
            metrics,
            last[-1][1] if last else None,
        )


# updates to a tenth (tqdm's own format would print the scaled count's every float digit)
_PART_BAR = ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} [{elapsed}<{remaining}, "
             "{rate_fmt}{postfix}]")  # fmt: skip


class _Parts:
    """One update's parts on the bar: `tick` moves it as they are done (counted on the host),
    `finish` completes the update exactly, whatever was told."""

    def __init__(self, bar: Any, units: int) -> None:
        self.bar, self.left = bar, units

    def __call__(self, k: int) -> None:
        k = min(int(k), self.left)
        if k > 0 and self.bar is not None:
            self.left -= k
            self.bar.update(k)

    def finish(self) -> None:
        self(self.left)


def run_training(
    trainer: type[Loop], cfg: Any, data: TrainData | None = None, min_hw: int = 1
) -> TrainResult:
    """Set up the ranks, load the data (rank 0 first, so it downloads and caches once), train."""
    check_config(cfg)  # every field in its range before anything is loaded or written
    dist = Dist.from_env(cfg.device)
    try:
        if data is None:
            data = dist.staged(
                lambda: load_train_data(
                    cfg.dataset,
                    cfg.data_dir,
                    cfg.split,
                    limit=cfg.limit,
                    classes=cfg.classes,
                    min_hw=min_hw,
                )
            )
        return trainer(cfg, data, dist).train()
    finally:
        dist.close()
