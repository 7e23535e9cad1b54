"""Loading and saving the two generative models in the authors' formats.

* EBM: a directory with ``config.json`` (``{"nf": .., "patch_size": ..}``, as huggingface_hub's
  ``PyTorchModelHubMixin`` writes it) and ``model.safetensors``.
* DDPM: a diffusers ``UNet2DModel`` directory: ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or the same inside ``unet/`` of a pipeline directory).

``src`` is a local directory, a weights file, or ``hf:owner/name`` (fetched once through
huggingface_hub's cache). Pickles are never unpickled: ``.pt``/``.bin`` only through
``torch.load(weights_only=True)``, after `pickle_scan.scan_torch_file` has checked their pickles'
nesting and item counts (torch's loader hashes a deeply nested key on the C stack). The loaded
module carries ``puregen_source`` and ``puregen_sha256`` (of the weights file) for the output
manifest.

A checkpoint is untrusted input: every problem with it raises `CheckpointError` (a `UsageError`,
exit 2) naming the file. The config is checked and the model built on the ``meta`` device (no
memory) first; then the weights' names, dtypes and shapes are compared with it (for safetensors
from the file's header, before any tensor is read); only then is the model allocated. Limits:
`MAX_PARAMETERS` parameters, `MAX_EBM_NF` / `MAX_EBM_PATCH` for the EBM config, the UNet's
``MAX_CHANNELS`` / ``MAX_LEVELS`` / ``MAX_LAYERS_PER_BLOCK``, `MAX_CONFIG_BYTES` and
`MAX_CONFIG_DEPTH` for a config.json. Weights must be float16, bfloat16, float32 or float64 tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puregen_fast.data.io import atomic_path, atomic_write, file_digest
from puregen_fast.data.pickle_scan import Budget, PickleLimitError, scan_torch_file
from puregen_fast.errors import CheckpointError
from puregen_fast.models.ebm import EBMSNGAN32

__all__ = [
    "DEFAULT_EBM",
    "DEFAULT_DDPM",
    "MAX_PARAMETERS",
    "MAX_EBM_NF",
    "MAX_EBM_PATCH",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "checkpoint_problem",
    "read_config",
    "SAMPLING",
    "SAMPLING_KEYS",
    "load_ebm",
    "read_sampling",
    "save_ebm",
    "load_ddpm",
    "save_ddpm",
]

DEFAULT_EBM = "hf:SunayBhat1/puregen-ebm-cinic10-imagenet"
# The chain an EBM was made for, beside its weights: purify, the API and eval use it unless a
# flag says otherwise (`train ebm` writes it; the authors' checkpoints have none).
SAMPLING = "sampling.json"
SAMPLING_KEYS = ("ebm_steps", "ebm_eps", "ebm_temp")
_MAX_SAMPLING_STEPS = 100_000
DEFAULT_DDPM = "hf:SunayBhat1/puregen-ddpm-cinic10-imagenet"

# About 1.07e9 parameters (4 GiB in float32): nine times the paper's 113.7M-parameter UNet.
MAX_PARAMETERS = 1 << 30
# The paper's EBM has nf=128, patch_size 1; nf=2048 is already 264M parameters.
MAX_EBM_NF = 2048
MAX_EBM_PATCH = 16
# diffusers writes about 2 KB of config, two levels deep.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
# safetensors' own limit on the JSON header.
_MAX_HEADER_BYTES = 100 << 20
# a .pt/.bin file: its pickles within pickle_scan's depth and item limits, what its members
# inflate to within MAX_PARAMETERS float64 values plus room for the pickle
_PICKLE_BUDGET = Budget(nbytes=_MAX_HEADER_BYTES)
_MAX_PICKLE_FILE_BYTES = MAX_PARAMETERS * 8 + _MAX_HEADER_BYTES

_EBM_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pt")
_DDPM_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")

# safetensors dtype codes by torch name; only the floating types load.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}  # fmt: skip
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_LOADABLE = tuple(_ITEMSIZE)

# (dtype name, shape) of each tensor in a weights file
_Specs = dict[str, tuple[str, tuple[int, ...]]]


def _q(path: Path | str) -> str:
    return repr(str(path))


def _show(value: Any, n: int = 80) -> str:
    """``repr(value)`` cut to ``n`` characters, for messages about untrusted values."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int too long to print, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= n else text[: n - 3] + "..."


# --- sources -----------------------------------------------------------------------------------


def _hub_cli() -> str:
    """The Hub command the installed huggingface_hub ships: ``hf`` (0.34 on; later versions
    dropped ``huggingface-cli``), or ``huggingface-cli`` on an older install."""
    try:
        from importlib.metadata import distribution

        names = {ep.name for ep in distribution("huggingface_hub").entry_points}
    except Exception:  # not installed, or metadata unreadable: name the current command
        return "hf"
    return "huggingface-cli" if "hf" not in names and "huggingface-cli" in names else "hf"


def _pass(flag: str, value: str) -> str:
    """How to give ``value`` where ``flag`` takes it: a command-line flag (``--ebm DIR``), a
    Python keyword (``ebm="DIR"``) or a Python call (``pg.load_ebm("DIR")``)."""
    if flag.startswith("--"):
        return f"{flag} {value}"
    if flag.endswith("="):
        return f'{flag}"{value}"'
    return f'{flag}("{value}")'


def _offline_help(repo: str, flag: str) -> str:
    local = repo.split("/")[-1]
    return (
        f"On a machine with network run `{_hub_cli()} download {repo} --local-dir {local}`, "
        f"copy the directory {local} here and pass `{_pass(flag, local)}`; or set HF_HOME to "
        "a Hugging Face cache that holds it."
    )


def _resolve(src: str | os.PathLike[str], what: str, flag: str, fetch: bool = True) -> Path:
    """A local path for ``src``; ``hf:owner/name`` goes through the huggingface_hub cache
    (``fetch=False``: the cache only, no network)."""
    s = str(src)
    if s.startswith("hf:"):
        repo = s[3:]
        if repo.count("/") != 1:
            raise CheckpointError(f"{what} source {s!r} ({flag}): expected hf:owner/name")
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    repo_id=repo,
                    allow_patterns=["*.json", "*.safetensors", "unet/*"],
                    local_files_only=not fetch,
                )
            )
        except Exception as e:  # offline, no such repo, gated, ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            how = "fetch it from the Hugging Face Hub" if fetch else "find it in the cache"
            raise CheckpointError(
                f"{what} {s!r} ({flag}): could not {how} "
                f"({type(e).__name__}: {reason}). {_offline_help(repo, flag)}"
            ) from e
    p = Path(s).expanduser()
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte, ...
        is_dir = is_file = False
    if not is_dir and not is_file:
        if os.path.lexists(p):
            raise CheckpointError(
                f"{what} checkpoint {_q(p)} ({flag}) is not a regular file or directory"
            )
        raise CheckpointError(
            f"{what} checkpoint {_q(p)} ({flag}) does not exist; pass `{_pass(flag, 'DIR')}` "
            "with a checkpoint directory, a weights file, or hf:owner/name"
        )
    return p


def _find(d: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (d / n).is_file():
            return d / n
    raise CheckpointError(f"{what} directory {_q(d)} holds none of {', '.join(names)}")


def _locate_ebm(p: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of an EBM checkpoint at ``p``."""
    weights = _find(p, _EBM_WEIGHTS, "EBM") if p.is_dir() else p
    cfg = weights.parent / "config.json"
    return weights, cfg if cfg.is_file() else None


def _locate_ddpm(p: Path) -> tuple[Path, Path]:
    """(weights file, config.json) of a DDPM checkpoint at ``p`` (or its pipeline's unet/)."""
    if p.is_dir() and not (p / "config.json").is_file() and (p / "unet").is_dir():
        p = p / "unet"
    weights = _find(p, _DDPM_WEIGHTS, "DDPM") if p.is_dir() else p
    cfg = weights.parent / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"DDPM {_q(p)}: no config.json beside the weights")
    return weights, cfg


_KINDS: dict[str, tuple[str, str, str, Callable[[Path], tuple[Path, Path | None]]]] = {
    "ebm": ("EBM", "--ebm", DEFAULT_EBM, _locate_ebm),
    "ddpm": ("DDPM", "--ddpm", DEFAULT_DDPM, _locate_ddpm),
}


def checkpoint_problem(
    kind: str, src: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> str | None:
    """What stops `load_ebm` (``kind="ebm"``) or `load_ddpm` (``kind="ddpm"``) from finding
    ``src`` (None: the published default), as the message to show; None when nothing does.

    Checks that the files are there and the config.json reads, without reading any weights. An
    ``hf:`` source is fetched into the Hugging Face cache as loading would (``fetch=False``: the
    cache only). The message names the ``--ebm``/``--ddpm`` flag and what to place where.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    what, flag, default, locate = _KINDS[kind]
    try:
        weights, cfg = locate(_resolve(default if src is None else src, what, flag, fetch))
        if cfg is not None:
            read_config(cfg)
        if weights.suffix != ".safetensors" and weights.suffix not in _PICKLE_SUFFIXES:
            raise CheckpointError(_unknown_format(weights))
    except CheckpointError as e:
        return str(e)
    return None


# --- config.json -------------------------------------------------------------------------------


def read_config(path: str | os.PathLike[str], label: str | None = None) -> dict[str, Any]:
    """A JSON object from ``path``, or `CheckpointError` naming it (and ``label``, e.g. a flag):
    unreadable, over `MAX_CONFIG_BYTES`, not UTF-8, not JSON, nested deeper than
    `MAX_CONFIG_DEPTH`, or not an object."""
    path = Path(path)
    name = f"{label} {_q(path)}" if label else _q(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {name}: {e}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{name} is larger than {MAX_CONFIG_BYTES} bytes; a config.json is a few KB"
        )
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"cannot read {name}: not UTF-8 text ({e})") from e
    except RecursionError as e:
        raise CheckpointError(f"{name}: JSON nested too deeply") from e
    except ValueError as e:  # malformed JSON, an integer with too many digits
        raise CheckpointError(f"cannot read {name}: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{name}: expected a JSON object (a dict of settings), found {type(cfg).__name__}"
        )
    if _depth(cfg) > MAX_CONFIG_DEPTH:
        # later code (printing, copying, validating) recurses over the values
        raise CheckpointError(f"{name}: JSON nested too deeply (over {MAX_CONFIG_DEPTH} levels)")
    return cfg


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


# --- weights -----------------------------------------------------------------------------------


def _unknown_format(path: Path) -> str:
    return f"{_q(path)}: unknown weights format (use .safetensors, or .pt/.bin state dicts)"


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)


def _safetensors_specs(path: Path) -> _Specs:
    """Names, dtypes and shapes from a safetensors header, checked against the file's size,
    without reading any tensor."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{_q(path)}: not a safetensors file, or truncated (header of {n} bytes in "
                    f"a file of {size})"
                )
            raw = f.read(n)
        header = json.loads(raw.decode("utf-8"))
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"cannot read weights {_q(path)}: bad safetensors header ({e})"
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{_q(path)}: bad safetensors header (not a JSON object)")
    data = size - 8 - n
    specs: _Specs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str)
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        if not (ok and _is_shape(shape) and _is_shape(offsets) and len(offsets) == 2):
            raise CheckpointError(f"{_q(path)}: bad safetensors header entry for {_show(name)}")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if (
            end > data
            or begin > end
            or (dtype in _ITEMSIZE and end - begin != numel * _ITEMSIZE[dtype])
        ):
            raise CheckpointError(
                f"{_q(path)}: tensor {_show(name)} {_show(tuple(shape))} does not fit its bytes "
                f"[{begin}, {end}) of {data} (a truncated or corrupt file)"
            )
        specs[name] = (dtype, tuple(shape))
    return specs


def _pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.bin`` file through ``torch.load(weights_only=True)``, its
    pickles first checked by `scan_torch_file` (torch's loader builds and hashes as it reads:
    a deeply nested key overflows the C stack)."""
    try:
        scan_torch_file(path, _PICKLE_BUDGET, max_inflated=_MAX_PICKLE_FILE_BYTES)
    except (PickleLimitError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read weights {_q(path)}: {str(e)[:300]}") from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # not a zip/pickle, a forbidden global, truncated, ...
        # torch's message quotes names from the file: bounded
        raise CheckpointError(f"cannot read weights {_q(path)}: {str(e)[:500]}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{_q(path)}: expected a state dict, found {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{_q(path)}: state dict key {_show(k)} is not a string")
        if isinstance(v, dict):
            raise CheckpointError(
                f"{_q(path)}: holds a nested dict under {_show(k)}; save the model's "
                "state_dict() itself (names to tensors)"
            )
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{_q(path)}: {_show(k)} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.is_quantized:
            raise CheckpointError(f"{_q(path)}: {_show(k)} is not a dense tensor ({v.layout})")
    return state


def _read_specs(path: Path) -> tuple[_Specs, dict[str, torch.Tensor] | None]:
    """The weights' specs, plus the tensors where reading the specs already loaded them."""
    if path.suffix == ".safetensors":
        return _safetensors_specs(path), None
    if path.suffix in _PICKLE_SUFFIXES:
        state = _pickle_state(path)
        specs = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}
        return specs, state
    raise CheckpointError(_unknown_format(path))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # the header was checked; the library checks the rest
        raise CheckpointError(f"cannot read weights {_q(path)}: {e}") from e


# --- building ----------------------------------------------------------------------------------


def _build_meta(factory: Callable[[], nn.Module], where: Path, what: str) -> nn.Module:
    """The model on the meta device: its shapes without its memory; refused over the limit."""
    try:
        with torch.device("meta"):
            model = factory()
    except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"{_q(where)}: bad {what} config: {e}") from e
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise CheckpointError(
            f"{_q(where)}: the config describes a {what} of {count:,} parameters, over the "
            f"loader's limit of {MAX_PARAMETERS:,}; check the config"
        )
    return model


def _check_fit(model: nn.Module, specs: _Specs, where: Path) -> None:
    """The weights' names, shapes and dtypes against the model's, every problem in one message."""
    own = model.state_dict()
    missing = sorted(set(own) - set(specs))
    unexpected = sorted(set(specs) - set(own))
    misshaped = [
        f"{k} {specs[k][1]} (expected {tuple(v.shape)})"
        for k, v in own.items()
        if k in specs and specs[k][1] != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(
            "missing tensors: " + ", ".join(missing[:8]) + (" ..." * (len(missing) > 8))
        )
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(_show(k) for k in unexpected[:8]))
    if misshaped:
        problems.append("wrong shapes: " + ", ".join(misshaped[:8]))
    if problems:
        raise CheckpointError(f"{_q(where)} does not fit the model: " + "; ".join(problems))
    bad = [f"{k} ({d})" for k, (d, _) in specs.items() if d not in _LOADABLE]
    if bad:
        raise CheckpointError(
            f"{_q(where)}: unsupported dtypes: {', '.join(bad[:8])}; the weights must be "
            f"{', '.join(_LOADABLE)}"
        )


def _materialize(meta: nn.Module, state: dict[str, torch.Tensor], where: Path) -> nn.Module:
    """Allocate ``meta`` on the CPU and fill it from ``state`` (already checked to fit)."""
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{_q(where)}: non-finite values in " + ", ".join(bad[:8]))
    own = meta.state_dict()
    # Every tensor is overwritten, so the random init would be wasted work.
    model = meta.to_empty(device="cpu")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


def _finish(model: nn.Module, src: str, weights: Path, device: str | torch.device) -> nn.Module:
    model.eval().requires_grad_(False).to(device)
    model.puregen_source = src  # type: ignore[assignment]
    model.puregen_sha256 = file_digest(weights)  # type: ignore[assignment]
    return model


def _ebm_size(
    cfg: dict, key: str, inferred: int, top: int, cfg_path: Path | None, weights: Path
) -> int:
    """``nf`` / ``patch_size`` from config.json, else as inferred from block1.c1.weight."""
    if key not in cfg:
        if not 1 <= inferred <= top:
            raise CheckpointError(
                f"{_q(weights)}: block1.c1.weight implies {key}={inferred}, outside the "
                f"loader's range [1, {top}]"
            )
        return inferred
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
        raise CheckpointError(
            f"{_q(cfg_path or 'config.json')}: {key!r} must be a whole number >= 1 (at most "
            f"{top}), got {_show(v)}; fix config.json or remove the entry"
        )
    return v


def load_ebm(src: str | os.PathLike[str], device: str | torch.device = "cpu", *,
             flag: str = "pg.load_ebm") -> EBMSNGAN32:  # fmt: skip
    """An `EBMSNGAN32` from a directory in the authors' format, a weights file, or hf:owner/name.
    ``flag``: how the caller's user gives ``src``, for the messages: ``--ebm`` (a command),
    ``ebm=`` (a Python keyword), or by default this function's own call."""
    weights, cfg_path = _locate_ebm(_resolve(src, "EBM", flag))
    cfg = read_config(cfg_path) if cfg_path is not None else {}
    specs, state = _read_specs(weights)
    # Without nf / patch_size in the config they follow from the first conv's shape.
    shape = specs.get("block1.c1.weight", ("", ()))[1]
    if ("nf" not in cfg or "patch_size" not in cfg) and len(shape) != 4:
        found = f"has shape {_show(shape)}" if "block1.c1.weight" in specs else "is missing"
        raise CheckpointError(f"{_q(weights)}: tensor block1.c1.weight {found}; not an EBMSNGAN32")
    nf_seen, patch_seen = (
        (shape[0], max(1, round((shape[1] / 3) ** 0.5))) if len(shape) == 4 else (0, 0)
    )
    nf = _ebm_size(cfg, "nf", nf_seen, MAX_EBM_NF, cfg_path, weights)
    patch = _ebm_size(cfg, "patch_size", patch_seen, MAX_EBM_PATCH, cfg_path, weights)
    meta = _build_meta(lambda: EBMSNGAN32(nf=nf, patch_size=patch), cfg_path or weights, "EBM")
    _check_fit(meta, specs, weights)
    sampling = read_sampling(weights.parent / SAMPLING)
    model = _materialize(meta, state if state is not None else _read_tensors(weights), weights)
    model = _finish(model, str(src), weights, device)
    model.puregen_sampling = sampling  # type: ignore[assignment]
    return model  # type: ignore[return-value]


def read_sampling(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sampling defaults in ``path`` (`SAMPLING` beside an EBM's weights): ``ebm_steps``
    (a whole number in [1, 100000]), ``ebm_eps`` and ``ebm_temp`` (finite, > 0), any of them,
    and ``path``; None where there is no such file; `CheckpointError` naming the file and the
    key for anything else."""
    path = Path(path)
    if not path.is_file():
        return None
    doc = read_config(path)
    out: dict[str, Any] = {}
    for k in SAMPLING_KEYS:
        if k not in doc:
            continue
        v = doc[k]
        if k == "ebm_steps":
            ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_SAMPLING_STEPS
            want = f"a whole number in [1, {_MAX_SAMPLING_STEPS}]"
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
            want = "a finite number > 0"
        if not ok:
            raise CheckpointError(f"{_q(path)}: {k!r} must be {want}, got {_show(v)}; fix "
                                  f"{SAMPLING} or remove the entry")  # fmt: skip
        out[k] = v
    return {**out, "path": str(path)} if out else None


def save_ebm(ebm: EBMSNGAN32, out_dir: str | os.PathLike[str],
             sampling: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write ``config.json`` + ``model.safetensors``: what `load_ebm` and the authors read; and,
    with ``sampling`` (`SAMPLING_KEYS`, plus a ``why`` line), the chain the EBM was made for."""
    from safetensors.torch import save_file

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ebm.state_dict().items()
    }
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write(d / "config.json", json.dumps(ebm.config, indent=2))
    if sampling is not None:
        atomic_write(d / SAMPLING, json.dumps(sampling, indent=2))
    return d


def load_ddpm(src: str | os.PathLike[str], device: str | torch.device = "cpu", *,
              flag: str = "pg.load_ddpm") -> nn.Module:  # fmt: skip
    """A `UNet2D` from a diffusers ``UNet2DModel`` directory (or its pipeline's ``unet/``);
    ``flag`` as for `load_ebm`."""
    from puregen_fast.models.unet import UNet2D

    weights, cfg_path = _locate_ddpm(_resolve(src, "DDPM", flag))
    cfg = read_config(cfg_path)
    meta = _build_meta(lambda: UNet2D.from_config(cfg), cfg_path, "UNet2D")
    specs, state = _read_specs(weights)
    _check_fit(meta, specs, weights)
    model = _materialize(meta, state if state is not None else _read_tensors(weights), weights)
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
