"""Run directories, checkpoints and exact resume.

Layout of ``--out DIR``::

    recipe.json                  {"recipe": "ebm"|"ddpm", "format": 1, "hparams": {...}}
    <weights>                    the newest good weights, loadable by pg.load_ebm / pg.load_ddpm
    checkpoints/step_00001234/   <weights> + state.pt (optimiser, schedule, RNG, bank, step, ...)
    checkpoints/latest.json      {"step": 1234, "dir": "step_00001234"}
    metrics.jsonl, samples/*.png, loss.png

Every file is written through `puregen_fast.data.io` (a temporary name, renamed into place), and
a checkpoint directory counts only once its ``state.pt``, written last, is there; so a run killed
at any moment leaves the previous checkpoint intact. ``state.pt`` holds only tensors, numbers,
strings, lists and dicts: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puregen_fast.data.io import atomic_path, atomic_write, atomic_write_json
from puregen_fast.errors import UsageError
from puregen_fast.train.config import RECIPE_DEFAULTS

__all__ = ["FORMAT", "RunDir", "capture_rng", "restore_rng"]

FORMAT = 1
_STEP_DIR = "step_{:08d}"
_TMP = re.compile(r"^\..+\.tmp-(\d+)")  # puregen_fast.data.io.tmp_name: .<name>.tmp-<pid><suffix>


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # nothing of this run is being written yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, Python). The training loops draw from
    their own checkpointed generators and the keyed stream; these are saved so that anything
    else drawing from the globals (a user's augmentation, a library) resumes exactly too."""
    mt, pos, has_gauss, gauss = np.random.get_state()[1:]
    ver, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(mt, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {"version": ver, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


class RunDir:
    """One training run's output directory."""

    def __init__(self, out: str | os.PathLike[str], recipe: str) -> None:
        if not str(out):
            raise UsageError("--out DIR is required")
        self.path = Path(out)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {str(self.path)!r} is a file; choose a directory")
        self.recipe = recipe
        self.ckpt_root = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.samples = self.path / "samples"

    # -- recipe --------------------------------------------------------------------------------
    def read_recipe(self, where: Path | None = None) -> dict[str, Any] | None:
        p = (where or self.path) / "recipe.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(
                f"{str(p)!r} is unreadable ({e}); remove it or use another --out"
            ) from e

    def write_recipe(self, hparams: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {str(self.path)!r}: cannot create it ({e})") from e
        doc = {"recipe": self.recipe, "format": FORMAT, "hparams": hparams, **(extra or {})}
        atomic_write_json(self.path / "recipe.json", doc)

    def check_recipe(
        self, found: dict[str, Any] | None, hparams: dict[str, Any], where: Path
    ) -> None:
        """Refuse to resume a run of another recipe or other hyper-parameters."""
        if found is None:
            raise UsageError(
                f"--resume {str(where)!r}: no recipe.json there; it is not a training run of "
                "puregen-fast train (start a fresh run with another --out)"
            )
        if found.get("recipe") != self.recipe:
            raise UsageError(
                f"--resume {str(where)!r}: written by `train {found.get('recipe')}`, not "
                f"`train {self.recipe}`; pass the right subcommand or another directory"
            )
        if found.get("format") != FORMAT:
            raise UsageError(
                f"--resume {str(where)!r}: checkpoint format {found.get('format')} "
                f"(this build reads {FORMAT})"
            )
        old = {**{k: v for k, v in RECIPE_DEFAULTS.items() if k in hparams},
               **found.get("hparams", {})}  # fmt: skip
        diff = sorted(k for k in set(old) | set(hparams) if old.get(k) != hparams.get(k))
        if diff:
            shown = ", ".join(
                f"--{k.replace('_', '-')} {old.get(k)!r} -> {hparams.get(k)!r}" for k in diff[:8]
            )
            raise UsageError(
                f"--resume {str(where)!r}: the recipe differs from the checkpoint's ({shown}); "
                "resume with the original flags, add --force-resume to accept the change, or "
                "start a fresh run with another --out"
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self, root: Path | None = None) -> list[tuple[int, Path]]:
        """Complete checkpoints (directories holding state.pt), oldest first."""
        root = root or self.ckpt_root
        out = []
        if root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and d.name.startswith("step_") and (d / "state.pt").is_file():
                    try:
                        out.append((int(d.name[5:]), d))
                    except ValueError:
                        continue
        return sorted(out)

    def find_resume(self, spec: str) -> tuple[Path, Path]:
        """(run directory, checkpoint directory) for ``--resume [spec]``."""
        run, cands = self.resume_candidates(spec)
        return run, cands[0]

    def resume_candidates(self, spec: str) -> tuple[Path, list[Path]]:
        """(run directory, its checkpoints newest first) for ``--resume [spec]``; a checkpoint
        directory named explicitly is the only candidate."""
        src = Path(spec) if spec else self.path
        if (src / "state.pt").is_file():  # a checkpoint directory itself
            run = src.parent.parent if src.parent.name == "checkpoints" else src
            return run, [src]
        ck = self.checkpoints(src / "checkpoints")
        if not ck:
            if not src.exists():
                raise UsageError(f"--resume {str(src)!r}: no such directory")
            raise UsageError(
                f"--resume {str(src)!r}: no checkpoint there (checkpoints/step_*/state.pt); "
                "start without --resume"
            )
        return src, [d for _, d in reversed(ck)]

    @staticmethod
    def damage(ckpt: Path) -> str | None:
        """Why a checkpoint's files cannot be read (a truncated weight file, unparsable JSON),
        or None; ``state.pt`` is checked by `load_state`. Headers only: cheap."""
        from safetensors import safe_open

        for f in sorted(ckpt.rglob("*")):
            try:
                if f.suffix == ".json":
                    json.loads(f.read_text())
                elif f.suffix == ".safetensors":
                    with safe_open(str(f), "pt") as st:
                        st.keys()
            except Exception as e:  # any failure to parse is damage
                return f"{f.relative_to(ckpt)}: {e}"
        return None

    def point_latest(self, step: int, ckpt: Path) -> None:
        atomic_write_json(self.ckpt_root / "latest.json", {"step": step, "dir": ckpt.name})

    def move_newer_aside(self, step: int) -> tuple[int, Path | None]:
        """Move the checkpoints newer than ``step`` to ``checkpoints/abandoned-<time>/`` so no
        resume, pruning or rollback picks them: (how many, where)."""
        newer = [d for k, d in self.checkpoints() if k > step]
        if not newer:
            return 0, None
        aside = self.ckpt_root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for d in newer:
            os.replace(d, aside / d.name)
        return len(newer), aside

    def clean_leftovers(self) -> list[Path]:
        """Remove what a killed run left: checkpoint folders without their ``state.pt`` and the
        temporary files of `puregen_fast.data.io` (``.<name>.tmp-<pid>...``) of dead processes.
        Returns what was removed."""
        gone: list[Path] = []
        if self.ckpt_root.is_dir():
            for d in self.ckpt_root.iterdir():
                if d.is_dir() and d.name.startswith("step_") and not (d / "state.pt").is_file():
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d)
        if self.path.is_dir():
            for folder, _, files in os.walk(self.path):
                for name in files:
                    m = _TMP.match(name)
                    if m and not _alive(int(m.group(1))):
                        p = Path(folder) / name
                        p.unlink(missing_ok=True)
                        gone.append(p)
        return gone

    def save_checkpoint(
        self,
        step: int,
        state: dict[str, Any],
        write_weights: Callable[[Path], None],
        keep: int,
    ) -> Path:
        """Write checkpoints/step_N (``state.pt`` last: it marks the checkpoint complete), point
        latest.json at it, copy its weights to the top of the run directory, and delete all but
        the newest ``keep`` checkpoints."""
        final = self.ckpt_root / _STEP_DIR.format(step)
        if final.exists():  # re-reaching a step after a rollback, or a write cut by a kill
            shutil.rmtree(final)
        final.mkdir(parents=True)
        write_weights(final)
        with atomic_path(final / "state.pt") as tmp:
            torch.save({**state, "format": FORMAT, "recipe": self.recipe, "step": step}, tmp)
        self.point_latest(step, final)
        self.publish_weights(final)
        for _, old in self.checkpoints()[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def publish_weights(self, ckpt: Path) -> None:
        """Copy a checkpoint's weight files (not state.pt) to the top of the run directory."""
        for src in sorted(ckpt.rglob("*")):
            if src.is_dir() or src.name == "state.pt":
                continue
            dst = self.path / src.relative_to(ckpt)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)

    @staticmethod
    def load_state(ckpt: Path, device: torch.device) -> dict[str, Any]:
        try:
            return torch.load(ckpt / "state.pt", map_location=device, weights_only=True)
        except Exception as e:  # truncated, foreign, or from an incompatible build
            raise UsageError(f"cannot read checkpoint {str(ckpt / 'state.pt')!r}: {e}") from e

    # -- metrics -------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_metrics(self, step: int) -> int:
        """Drop the metric rows after ``step`` (and lines cut by a kill) before a resumed run
        logs them again; events stay, they record what happened. Returns how many went."""
        if not self.metrics.is_file():
            return 0
        lines = self.metrics.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" in r or not isinstance(r.get("step"), int) or r["step"] <= step:
                keep.append(line)
        if len(keep) != len(lines):
            atomic_write(self.metrics, "".join(s + "\n" for s in keep))
        return len(lines) - len(keep)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return rows
