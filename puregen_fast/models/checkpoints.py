"""Loading and saving the two generative models in the authors' formats.

* EBM: a directory with ``config.json`` (``{"nf": .., "patch_size": ..}``, as huggingface_hub's
  ``PyTorchModelHubMixin`` writes it) and ``model.safetensors``.
* DDPM: a diffusers ``UNet2DModel`` directory: ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or the same inside ``unet/`` of a pipeline directory).

``src`` is a local directory, a weights file, or ``hf:owner/name`` (fetched once through
huggingface_hub's cache). Pickles are never unpickled: ``.pt``/``.bin`` only through
``torch.load(weights_only=True)``. The loaded module carries ``puregen_source`` and
``puregen_sha256`` (of the weights file) for the output manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from puregen_fast.data.io import atomic_path, atomic_write, file_digest
from puregen_fast.errors import CheckpointError
from puregen_fast.models.ebm import EBMSNGAN32

__all__ = [
    "DEFAULT_EBM",
    "DEFAULT_DDPM",
    "load_ebm",
    "save_ebm",
    "load_ddpm",
    "save_ddpm",
]

DEFAULT_EBM = "hf:SunayBhat1/puregen-ebm-cinic10-imagenet"
DEFAULT_DDPM = "hf:SunayBhat1/puregen-ddpm-cinic10-imagenet"

_EBM_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pt")
_DDPM_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _resolve(src: str | os.PathLike[str], what: str) -> Path:
    """A local path for ``src``; ``hf:owner/name`` goes through the huggingface_hub cache."""
    s = str(src)
    if s.startswith("hf:"):
        repo = s[3:]
        if repo.count("/") != 1:
            raise CheckpointError(f"{what} source {s!r}: expected hf:owner/name")
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    repo_id=repo,
                    allow_patterns=["*.json", "*.safetensors", "unet/*"],
                )
            )
        except Exception as e:  # offline, no such repo, gated, ...
            raise CheckpointError(
                f"could not fetch the {what} {s!r} from the Hugging Face Hub ({type(e).__name__}: "
                f"{e}). Offline: on a machine with network run `huggingface-cli download {repo} "
                f"--local-dir DIR`, copy DIR here and pass it as a local path; or set HF_HOME to "
                "a cache that holds it."
            ) from e
    p = Path(s).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what} checkpoint {str(p)!r} does not exist")
    return p


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in (".pt", ".pth", ".bin"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a state dict, found {type(state)}")
            return state
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read weights {str(path)!r}: {e}") from e
    raise CheckpointError(
        f"{str(path)!r}: unknown weights format (use .safetensors, or .pt/.bin state dicts)"
    )


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{str(path)!r}: expected a JSON object (a dict of settings), found "
            f"{type(cfg).__name__}"
        )
    return cfg


def _config_int(cfg: dict, key: str, default: int, where: Path) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CheckpointError(
            f"{str(where)!r}: {key!r} must be a whole number >= 1, got {v!r}; fix config.json "
            "or remove the entry"
        )
    return v


def _find(d: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (d / n).is_file():
            return d / n
    raise CheckpointError(f"{what} directory {str(d)!r} holds none of {', '.join(names)}")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(
            "missing tensors: " + ", ".join(missing[:8]) + (" ..." * (len(missing) > 8))
        )
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected[:8]))
    if misshaped:
        problems.append("wrong shapes: " + ", ".join(misshaped[:8]))
    if problems:
        raise CheckpointError(f"{str(where)!r} does not fit the model: " + "; ".join(problems))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{str(where)!r}: non-finite values in " + ", ".join(bad[:8]))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _finish(model: nn.Module, src: str, weights: Path, device: str | torch.device) -> nn.Module:
    model.eval().requires_grad_(False).to(device)
    model.puregen_source = src  # type: ignore[assignment]
    model.puregen_sha256 = file_digest(weights)  # type: ignore[assignment]
    return model


def load_ebm(src: str | os.PathLike[str], device: str | torch.device = "cpu") -> EBMSNGAN32:
    """An `EBMSNGAN32` from a directory in the authors' format, a weights file, or hf:owner/name."""
    p = _resolve(src, "EBM")
    if p.is_dir():
        weights = _find(p, _EBM_WEIGHTS, "EBM")
        cfg = _read_config(p / "config.json") if (p / "config.json").is_file() else {}
    else:
        weights, cfg = p, {}
        if (p.parent / "config.json").is_file():
            cfg = _read_config(p.parent / "config.json")
    cfg_path = (p if p.is_dir() else p.parent) / "config.json"
    state = _read_state(weights)
    if "block1.c1.weight" not in state:
        raise CheckpointError(
            f"{str(weights)!r}: missing tensor block1.c1.weight; not an EBMSNGAN32"
        )
    w = state["block1.c1.weight"]
    nf = _config_int(cfg, "nf", int(w.shape[0]), cfg_path)
    patch = _config_int(cfg, "patch_size", max(1, round((w.shape[1] / 3) ** 0.5)), cfg_path)
    try:
        model = EBMSNGAN32(nf=nf, patch_size=patch)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(p)!r}: bad EBM config {cfg}: {e}") from e
    _load_strict(model, state, weights)
    return _finish(model, str(src), weights, device)  # type: ignore[return-value]


def save_ebm(ebm: EBMSNGAN32, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` + ``model.safetensors``: what `load_ebm` and the authors read."""
    from safetensors.torch import save_file

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ebm.state_dict().items()
    }
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write(d / "config.json", json.dumps(ebm.config, indent=2))
    return d


def load_ddpm(src: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """A `UNet2D` from a diffusers ``UNet2DModel`` directory (or its pipeline's ``unet/``)."""
    from puregen_fast.models.unet import UNet2D

    p = _resolve(src, "DDPM")
    if p.is_dir() and not (p / "config.json").is_file() and (p / "unet").is_dir():
        p = p / "unet"
    if p.is_dir():
        weights = _find(p, _DDPM_WEIGHTS, "DDPM")
        cfg_path = p / "config.json"
    else:
        weights, cfg_path = p, p.parent / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"DDPM {str(p)!r}: no config.json beside the weights")
    cfg = _read_config(cfg_path)
    try:
        model = UNet2D.from_config(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{str(cfg_path)!r}: {e}") from e
    _load_strict(model, _read_state(weights), weights)
    return _finish(model, str(src), weights, device)


def save_ddpm(unet: nn.Module, out_dir: str | os.PathLike[str]) -> Path:
    """Write a diffusers-format ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
    from safetensors.torch import save_file

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    cfg = {"_class_name": "UNet2DModel", **dict(unet.config)}
    with atomic_path(d / "diffusion_pytorch_model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write(d / "config.json", json.dumps(cfg, indent=2))
    return d
