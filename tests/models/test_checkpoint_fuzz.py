"""Property-based fuzz of load_ebm and load_ddpm on hostile checkpoints.

Each case writes a small checkpoint directory: a config.json that is valid, slightly wrong or
hostile (wrong types, nesting, huge numbers, NaN, unicode, raw bytes), weights as safetensors,
hand-made safetensors headers, ``.pt``/``.bin`` pickles (loaded with weights_only=True) or junk,
with tensors dropped, added, reshaped, retyped (float8, ints, bool) or made non-finite, and the
file maybe truncated or with bytes flipped. The loader must either return a finite model or
raise a UsageError naming the checkpoint; anything else, or a case over its time limit, fails.
Models stay small: a config may describe a large model, but weights never fit one, so nothing
large is ever allocated (the loader compares shapes on the meta device first).

300 cases per loader by default, 10,000 under ``-m slow``; each prints its tally.
"""

from __future__ import annotations

import collections
import functools
import json
import shutil
import signal
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from helpers import budget_spent, skip_if_cut
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import puregen_fast as pg
from puregen_fast.models.unet import _DEFAULTS

pytestmark = pytest.mark.usefixtures("one_thread")

DEADLINE_MS = 5000  # per case; a loader that takes longer fails the run
HANG_S = 30  # a case still running then is a hang: interrupted and reported

# --- values --------------------------------------------------------------------------------------

HOSTILE_NUMBERS = [0, -1, 1, 3, 2**31, 2**63, 10**30, -(10**30), 1.5, 1e308, -0.0, True, False]
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(HOSTILE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["DownBlock2D", "AttnUpBlock2D", "silu", "positional", "conv", "default"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
RAW_CONFIGS = [
    b"",
    b"{",
    b"[" * 200_000 + b"]" * 200_000,
    b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    b'{"nf": ' + b"[" * 600 + b"]" * 600 + b', "act_fn": ' + b"[" * 600 + b"]" * 600 + b"}",
    b"\xff\xfe{\x00}",
    b'{"nf": 1' + b"0" * 5000 + b"}",
    b'{"nf": NaN, "patch_size": Infinity}',
    b'{"nf": 4, "pad": "' + b"x" * (1 << 20) + b'"}',
    '{"nf": "\u2167", "\u00e9": "\U0001f600"}'.encode(),
]
DTYPES = [
    torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool,
]  # fmt: skip
SAFETENSORS_CODES = ["F32", "F16", "BF16", "F64", "F8_E4M3", "I32", "BOOL", "U8", "X9", "", "f32"]


# --- checkpoint descriptions ---------------------------------------------------------------------


@functools.cache
def ebm_state(nf: int, patch: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(nf * 10 + patch)
    return pg.EBMSNGAN32(nf=nf, patch_size=patch).state_dict()


DDPM_SHAPES = [([4], 2), ([8], 4), ([4, 8], 4), ([8, 8], 2), ([4, 4], 1)]


def ddpm_config(chans: list[int], groups: int, layers: int, attn: list[bool]) -> dict:
    return {
        "_class_name": "UNet2DModel",
        "sample_size": 8,
        "block_out_channels": chans,
        "norm_num_groups": groups,
        "layers_per_block": layers,
        "attention_head_dim": 4,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    }


@functools.cache
def ddpm_state(cfg_json: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pg.UNet2D.from_config(json.loads(cfg_json)).state_dict()


@st.composite
def tensor_edits(draw, state: dict[str, torch.Tensor]) -> dict[str, object]:
    """The state dict with up to three edits: the cases a loader must name, not crash on."""
    state = dict(state)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "extra", "reshape", "dtype", "nonfinite", "scalar"]))
        key = draw(st.sampled_from(sorted(state))) if state else "l5.weight"
        if op == "drop":
            state.pop(key, None)
        elif op == "extra":
            name = draw(st.one_of(st.text(min_size=1, max_size=12), st.just(key + ".extra")))
            state[name] = torch.zeros(draw(st.integers(0, 3)))
        elif op == "reshape":
            shape = draw(st.lists(st.integers(0, 5), max_size=4))
            state[key] = torch.randn(shape)
        elif op == "scalar":
            state[key] = torch.tensor(1.0)
        elif op == "dtype" and isinstance(state.get(key), torch.Tensor):
            state[key] = state[key].to(draw(st.sampled_from(DTYPES)))
        elif op == "nonfinite" and isinstance(state.get(key), torch.Tensor):
            t = state[key].clone().float()
            if t.numel():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(
                    st.sampled_from([float("nan"), float("inf"), -float("inf")])
                )
            state[key] = t
    return state


@st.composite
def pickle_edits(draw, state: dict[str, object]) -> object:
    """What a ``.pt`` can hold beyond a state dict: non-tensors, nesting, odd keys, views."""
    state = dict(state)
    op = draw(st.sampled_from(["none", "value", "nested", "intkey", "top", "wrap", "expanded"]))
    key = draw(st.sampled_from(sorted(state))) if state else "l5.weight"
    if op == "value":
        state[key] = draw(json_value)
    elif op == "nested":
        state[key] = {"inner": torch.zeros(2), "deeper": {"x": 1}}
    elif op == "intkey":
        state[draw(st.integers())] = torch.zeros(1)
    elif op == "top":
        return draw(st.one_of(json_value, st.just(torch.zeros(3)), st.just((1, 2))))
    elif op == "wrap":
        return {draw(st.sampled_from(["state_dict", "model", "ema"])): state}
    elif op == "expanded":  # a huge shape over a one-element storage
        state[key] = torch.zeros(1).expand(10**5, 10**5)
    return state


@st.composite
def raw_safetensors(draw, names: list[str]) -> bytes:
    """A hand-made safetensors file: any header, any data, maybe a lying length field."""
    header: dict[str, object] = {}
    for name in draw(st.lists(st.sampled_from(names) | st.text(max_size=8), max_size=4)):
        header[name] = draw(
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(SAFETENSORS_CODES) | json_leaf,
                    "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_value,
                    "data_offsets": st.lists(st.integers(-4, 2**40), max_size=3) | json_value,
                }
            )
        )
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_value)
    raw = json.dumps(header).encode() if draw(st.integers(0, 9)) else draw(st.binary(max_size=64))
    length = len(raw) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + draw(st.binary(max_size=128))


@st.composite
def checkpoint(draw, kind: str) -> dict[str, object]:
    if kind == "ebm":
        nf, patch = draw(st.integers(1, 6)), draw(st.sampled_from([1, 2]))
        base = ebm_state(nf, patch)
        valid_cfg: dict[str, object] = {"nf": nf, "patch_size": patch}
        keys = ["nf", "patch_size", "other"]
    else:
        chans, groups = draw(st.sampled_from(DDPM_SHAPES))
        attn = draw(st.lists(st.booleans(), min_size=len(chans), max_size=len(chans)))
        valid_cfg = ddpm_config(chans, groups, draw(st.integers(1, 2)), attn)
        base = ddpm_state(json.dumps(valid_cfg, sort_keys=True))
        keys = [*_DEFAULTS, "_class_name", "some_future_option"]
    state = draw(tensor_edits(base))

    cfg_kind = draw(st.sampled_from(["valid", "edited", "edited", "value", "raw", "absent"]))
    config: bytes | None
    if cfg_kind == "valid":
        config = json.dumps(valid_cfg).encode()
    elif cfg_kind == "edited":
        cfg = dict(valid_cfg)
        for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3)):
            cfg[key] = draw(json_value)
        config = json.dumps(cfg).encode()
    elif cfg_kind == "value":
        config = json.dumps(draw(json_value)).encode()
    elif cfg_kind == "raw":
        config = draw(st.sampled_from(RAW_CONFIGS) | st.binary(max_size=64))
    else:
        config = None

    fmt = draw(st.sampled_from(["safetensors", "safetensors", "pt", "raw", "junk", "dir"]))
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    return {
        "state": state,
        "pickled": draw(pickle_edits(state)) if fmt == "pt" else None,
        "raw": draw(raw_safetensors(sorted(base))) if fmt == "raw" else None,
        "junk": draw(st.binary(max_size=256)) if fmt == "junk" else None,
        "config": config,
        "fmt": fmt,
        "damage": damage,
        "cut": draw(st.floats(0, 1)),
        "flips": draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4)),
        "by_file": draw(st.booleans()),
    }


def write_checkpoint(root: Path, kind: str, case: dict[str, object]) -> Path:
    stem = "model" if kind == "ebm" else "diffusion_pytorch_model"
    fmt = case["fmt"]
    weights = root / f"{stem}.{'bin' if fmt == 'pt' else 'safetensors'}"
    if fmt == "safetensors":
        state = {k: v.contiguous() for k, v in case["state"].items()}  # type: ignore[union-attr]
        save_file(state, str(weights))
    elif fmt == "pt":
        torch.save(case["pickled"], weights)
    elif fmt == "dir":  # a directory where the weights file should be
        weights.mkdir()
    else:
        weights.write_bytes(case["raw"] if fmt == "raw" else case["junk"])  # type: ignore[arg-type]
    if weights.is_file() and case["damage"] != "none":
        blob = bytearray(weights.read_bytes())
        if case["damage"] == "truncate":
            blob = blob[: int(len(blob) * case["cut"])]  # type: ignore[operator]
        else:
            for where, byte in case["flips"]:  # type: ignore[union-attr]
                if blob:
                    blob[min(int(where * len(blob)), len(blob) - 1)] = byte
        weights.write_bytes(bytes(blob))
    if case["config"] is not None:
        (root / "config.json").write_bytes(case["config"])  # type: ignore[arg-type]
    return weights if case["by_file"] else root


# --- the property --------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised in a case that outlives HANG_S; a BaseException so no `except Exception` eats it."""


def _alarm(signum, frame):
    raise Hang(f"a case ran past {HANG_S} s")


def fuzz(kind: str, examples: int, tmp: Path) -> collections.Counter:
    load = pg.load_ebm if kind == "ebm" else pg.load_ddpm
    tally: collections.Counter = collections.Counter()

    @settings(
        max_examples=examples,
        deadline=DEADLINE_MS,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(case=checkpoint(kind))
    def one(case: dict[str, object]) -> None:
        if budget_spent():
            return
        root = Path(tempfile.mkdtemp(dir=tmp))
        try:
            src = write_checkpoint(root, kind, case)
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(HANG_S)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = load(src)
            except pg.UsageError as e:
                tally["clean errors"] += 1
                assert str(root) in str(e), f"the message does not name the checkpoint: {e}"
            except Hang:
                tally["hangs"] += 1
                raise
            except Exception:
                tally["other exceptions"] += 1
                raise
            else:
                tally["loaded"] += 1
                assert all(torch.isfinite(p).all() for p in model.parameters())
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
        finally:
            tally["cases"] += 1
            shutil.rmtree(root, ignore_errors=True)

    try:
        one()
    finally:
        counts = ", ".join(f"{k} {tally[k]}" for k in ("cases", "loaded", "clean errors"))
        print(
            f"\nfuzz load_{kind}: {counts}, other exceptions {tally['other exceptions']}, "
            f"hangs {tally['hangs']}"
        )
    skip_if_cut(f"load_{kind} fuzz", tally["cases"], examples)
    return tally


@pytest.mark.parametrize("kind", ["ebm", "ddpm"])
def test_fuzz_loader(kind, tmp_path):
    tally = fuzz(kind, 300, tmp_path)
    assert tally["other exceptions"] == 0 and tally["hangs"] == 0
    assert tally["clean errors"] > 0 and tally["loaded"] > 0  # both outcomes were exercised


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ebm", "ddpm"])
def test_fuzz_loader_long(kind, tmp_path):
    tally = fuzz(kind, 10_000, tmp_path)
    assert tally["other exceptions"] == 0 and tally["hangs"] == 0
