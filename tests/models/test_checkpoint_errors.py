"""Bad checkpoints raise CheckpointError naming the file, before any large allocation; the
offline message names the installed Hub command and the flag; checkpoint_problem checks a
source without loading it."""

import json
import os
import struct
from importlib.metadata import distribution

import pytest
import torch
from safetensors.torch import save_file

import puregen_fast as pg
from puregen_fast.models import checkpoints
from puregen_fast.models.checkpoints import checkpoint_problem, read_config
from puregen_fast.models.unet import UNET_PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def ebm_state(nf: int = 4, patch: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in pg.EBMSNGAN32(nf=nf, patch_size=patch).state_dict().items()}


def ebm_dir(path, state=None, config=None, name="model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    state = ebm_state() if state is None else state
    if name.endswith(".safetensors"):
        save_file(state, str(path / name))
    else:
        torch.save(state, path / name)
    cfg = {"nf": 4, "patch_size": 1} if config is None else config
    text = cfg if isinstance(cfg, (str, bytes)) else json.dumps(cfg)
    (path / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return path


TINY = dict(UNET_PRESETS["tiny"], block_out_channels=[8, 16], norm_num_groups=4)


def ddpm_dir(path, config=None, state=None):
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if state is None:
        state = pg.UNet2D.from_config(TINY).state_dict()
    save_file(dict(state), str(path / "diffusion_pytorch_model.safetensors"))
    cfg = TINY if config is None else config
    (path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


def raises_naming(fn, src, match, named):
    with pytest.raises(pg.CheckpointError, match=match) as info:
        fn(src)
    assert named in str(info.value), str(info.value)
    return str(info.value)


# --- item 1: every bad checkpoint is a CheckpointError naming it ------------------------------


def test_valid_checkpoints_still_load(tmp_path):
    d = ebm_dir(tmp_path / "e")
    ebm = pg.load_ebm(d)
    for k, v in ebm_state().items():
        assert torch.equal(ebm.state_dict()[k], v), k
    u = ddpm_dir(tmp_path / "u")
    unet = pg.load_ddpm(u)
    torch.manual_seed(0)
    ref = pg.UNet2D.from_config(TINY).state_dict()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in ref.items())
    # half-precision weights load into the float32 model, as before
    half = {k: v.half() for k, v in ebm_state().items()}
    assert pg.load_ebm(ebm_dir(tmp_path / "h", half)).block1.c1.weight.dtype == torch.float32
    # a .pt state dict, also wrapped in {"state_dict": ...}
    pt = ebm_dir(tmp_path / "p", {"state_dict": ebm_state()}, name="model.pt")
    assert torch.equal(pg.load_ebm(pt / "model.pt").l5.weight, ebm_state()["l5.weight"])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.bool])
def test_unsupported_dtypes_are_named(tmp_path, dtype):
    state = ebm_state()
    state["block2.c1.weight"] = state["block2.c1.weight"].to(dtype)
    d = ebm_dir(tmp_path / "d", state)
    raises_naming(pg.load_ebm, d, "unsupported dtypes: block2.c1.weight", "model.safetensors")
    torch.save(state, d / "model.pt")
    raises_naming(pg.load_ebm, d / "model.pt", "block2.c1.weight", "model.pt")


@pytest.mark.parametrize(
    "value, match",
    [
        (3, "'block2.c1.weight' is a int, not a tensor"),
        ("w", "is a str, not a tensor"),
        ([1.0, 2.0], "is a list, not a tensor"),
        ({"inner": torch.zeros(1)}, "nested dict under 'block2.c1.weight'"),
        (None, "is a NoneType"),
    ],
)
def test_pt_values_that_are_not_tensors(tmp_path, value, match):
    state = ebm_state()
    state["block2.c1.weight"] = value
    torch.save(state, tmp_path / "model.pt")
    raises_naming(pg.load_ebm, tmp_path / "model.pt", match, "model.pt")
    torch.save({"model": ebm_state()}, tmp_path / "nested.pt")
    raises_naming(pg.load_ebm, tmp_path / "nested.pt", "nested dict under 'model'", "nested.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    raises_naming(pg.load_ebm, tmp_path / "list.pt", "expected a state dict", "list.pt")
    torch.save({1: torch.zeros(1)}, tmp_path / "intkey.pt")
    raises_naming(pg.load_ebm, tmp_path / "intkey.pt", "is not a string", "intkey.pt")


def test_expanded_pt_tensor_is_refused_by_shape_before_use(tmp_path):
    state = ebm_state()
    # 10^12 elements over a one-element storage: touching it would allocate terabytes.
    state["block2.c1.weight"] = torch.zeros(1).expand(10**6, 10**6)
    torch.save(state, tmp_path / "model.pt")
    raises_naming(pg.load_ebm, tmp_path / "model.pt", "wrong shapes", "model.pt")


@pytest.mark.parametrize(
    "config, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (b"\xff\xfe{\x00}", "not UTF-8"),
        (json.dumps({"nf": 4, "pad": "x" * (2 << 20)}), "larger than"),
        ("1" * 5000, "cannot read"),  # an int past Python's digit limit
        ('{"nf": NaN}', "'nf' must be a whole number"),
        ("[]", "JSON object"),
        ('"nf"', "JSON object"),
        ({"nf": 4096, "patch_size": 1}, "at most 2048"),
        ({"nf": 10**40, "patch_size": 1}, "at most 2048"),
        ({"nf": 4, "patch_size": 10**9}, "at most 16"),
        ({"nf": -4, "patch_size": 1}, "whole number >= 1"),
    ],
)
def test_hostile_ebm_config_json(tmp_path, config, match):
    d = ebm_dir(tmp_path / "c", config=config)
    raises_naming(pg.load_ebm, d, match, "config.json")


def test_large_ebm_config_is_checked_against_the_weights_before_allocating(tmp_path, monkeypatch):
    devices = []
    real = checkpoints.EBMSNGAN32

    def spy(*args, **kwargs):
        devices.append(torch.get_default_device().type)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "EBMSNGAN32", spy)
    d = ebm_dir(tmp_path / "big", config={"nf": 2048, "patch_size": 1})
    raises_naming(pg.load_ebm, d, r"wrong shapes: block1\.c1\.weight \(4, 3, 3, 3\)", "model")
    assert devices == ["meta"]  # 264M parameters described, none allocated


def test_truncated_and_corrupt_weights(tmp_path):
    d = ebm_dir(tmp_path / "t")
    blob = (d / "model.safetensors").read_bytes()
    for cut in (0, 5, 8, 20, len(blob) // 2, len(blob) - 1):
        (d / "model.safetensors").write_bytes(blob[:cut])
        raises_naming(pg.load_ebm, d, None, "model.safetensors")
    # a header length far beyond the file
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**63) + blob[8:])
    raises_naming(pg.load_ebm, d, "truncated", "model.safetensors")
    # a header entry whose shape disagrees with its bytes
    header = json.dumps({"l5.weight": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4]}})
    raw = header.encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    raises_naming(pg.load_ebm, d, "does not fit its bytes", "model.safetensors")


def test_first_conv_of_the_wrong_rank_without_config(tmp_path):
    state = ebm_state()
    state["block1.c1.weight"] = torch.zeros(4)
    save_file(state, str(tmp_path / "model.safetensors"))
    raises_naming(pg.load_ebm, tmp_path / "model.safetensors", "has shape", "model.safetensors")
    del state["block1.c1.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    raises_naming(pg.load_ebm, tmp_path / "model.safetensors", "is missing", "model.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    raises_naming(pg.load_ebm, tmp_path / "model.safetensors", "not a regular file", "load_ebm")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("norm_num_groups", 0, "norm_num_groups"),
        ("norm_num_groups", 3, "divisor of every block_out_channels"),
        ("norm_num_groups", -4, "norm_num_groups"),
        ("attention_head_dim", 0, "attention_head_dim"),
        ("block_out_channels", [-8, 16], "block_out_channels"),
        ("block_out_channels", [2**40, 2**40], "block_out_channels"),
        ("block_out_channels", "816", "block_out_channels"),
        ("block_out_channels", [8.0, 16.0], "block_out_channels"),
        ("layers_per_block", 10**6, "layers_per_block"),
        ("layers_per_block", "1", "layers_per_block"),
        ("in_channels", 10**30, "in_channels"),
        ("norm_eps", "small", "norm_eps"),
        ("dropout", 2.0, "dropout"),
        ("act_fn", ["silu"], "act_fn"),
        ("down_block_types", "DownBlock2D", "down_block_types"),
        ("down_block_types", [1, 2], "down_block_types"),
        ("mid_block_scale_factor", 0, "mid_block_scale_factor"),
        ("center_input_sample", "yes", "center_input_sample"),
        ("sample_size", {"h": 1}, "sample_size"),
        ("time_embedding_dim", -1, "time_embedding_dim"),
    ],
)
def test_invalid_unet_configs(tmp_path, key, value, match):
    d = ddpm_dir(tmp_path / "u", config=dict(TINY, **{key: value}))
    raises_naming(pg.load_ddpm, d, match, "config.json")
    with pytest.raises(ValueError, match=match):  # the model class says the same, in Python
        pg.UNet2D.from_config(dict(TINY, **{key: value}))


def test_unet_config_nan_and_nesting(tmp_path):
    d = ddpm_dir(tmp_path / "n", config=json.dumps(TINY)[:-1] + ', "norm_eps": NaN}')
    raises_naming(pg.load_ddpm, d, "norm_eps", "config.json")
    d = ddpm_dir(tmp_path / "d", config='{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    raises_naming(pg.load_ddpm, d, "nested too deeply", "config.json")
    # shallow enough for the JSON parser, too deep for code that walks the values
    d = ddpm_dir(tmp_path / "e", config='{"act_fn": ' + "[" * 600 + "]" * 600 + "}")
    raises_naming(pg.load_ddpm, d, "nested too deeply", "config.json")


def test_huge_unet_config_is_refused_before_allocating(tmp_path):
    # 8 levels of 16384 channels: within every per-value limit, billions of parameters
    cfg = dict(
        TINY,
        block_out_channels=[16384] * 8,
        down_block_types=["DownBlock2D"] * 8,
        up_block_types=["UpBlock2D"] * 8,
    )
    d = ddpm_dir(tmp_path / "h", config=cfg)
    raises_naming(pg.load_ddpm, d, "over the loader's limit", "config.json")


def test_float8_ddpm_weights(tmp_path):
    torch.manual_seed(0)
    state = pg.UNet2D.from_config(TINY).state_dict()
    state["conv_in.weight"] = state["conv_in.weight"].to(torch.float8_e4m3fn)
    d = ddpm_dir(tmp_path / "f", state=state)
    raises_naming(pg.load_ddpm, d, "unsupported dtypes: conv_in.weight", "diffusion_pytorch")


def test_cli_exits_2_naming_the_checkpoint(tmp_path, capsys):
    from puregen_fast.cli.main import main

    d = ddpm_dir(tmp_path / "u", config=dict(TINY, norm_num_groups=0))
    rc = main(["bench", "--method", "ddpm", "--ddpm", str(d), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "config.json" in err and "Traceback" not in err, err


# --- item 3: offline and first-run messages ----------------------------------------------------


def installed_hub_commands() -> set[str]:
    return {e.name for e in distribution("huggingface_hub").entry_points}


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    # huggingface_hub reads its environment at import: set the values it uses
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("kind, load", [("ebm", pg.load_ebm), ("ddpm", pg.load_ddpm)])
def test_offline_message_names_the_installed_command_and_the_flag(kind, load, offline_hub):
    cmd = checkpoints._hub_cli()
    assert cmd in installed_hub_commands()
    default = checkpoints.DEFAULT_EBM if kind == "ebm" else checkpoints.DEFAULT_DDPM
    repo = default.removeprefix("hf:")
    name = repo.split("/")[1]
    with pytest.raises(pg.CheckpointError) as info:
        load(default, flag=f"--{kind}")  # as the commands call it
    # the message checkpoint_problem gives is the one loading raises
    for msg in (str(info.value), checkpoint_problem(kind), checkpoint_problem(kind, fetch=False)):
        assert f"`{cmd} download {repo} --local-dir {name}`" in msg, msg
        assert f"`--{kind} {name}`" in msg, msg
        if "hf" in installed_hub_commands():
            assert "huggingface-cli" not in msg


def test_hub_command_follows_the_installed_version(monkeypatch):
    class Dist:
        def __init__(self, names):
            self.entry_points = [type("EP", (), {"name": n})() for n in names]

    import importlib.metadata as md

    monkeypatch.setattr(md, "distribution", lambda _: Dist(["huggingface-cli"]))
    assert checkpoints._hub_cli() == "huggingface-cli"
    monkeypatch.setattr(md, "distribution", lambda _: Dist(["hf", "tiny-agents"]))
    assert checkpoints._hub_cli() == "hf"


def test_checkpoint_problem(tmp_path):
    assert checkpoint_problem("ebm", ebm_dir(tmp_path / "e")) is None
    assert checkpoint_problem("ddpm", ddpm_dir(tmp_path / "u")) is None
    # files present but unreadable weights: not loaded here, so not reported here
    (tmp_path / "e" / "model.safetensors").write_bytes(b"junk")
    assert checkpoint_problem("ebm", tmp_path / "e") is None
    msg = checkpoint_problem("ebm", tmp_path / "nope")
    assert "does not exist" in msg and "--ebm" in msg
    (tmp_path / "empty").mkdir()
    assert "model.safetensors" in checkpoint_problem("ebm", tmp_path / "empty")
    (tmp_path / "u" / "config.json").unlink()
    assert "no config.json" in checkpoint_problem("ddpm", tmp_path / "u")
    (tmp_path / "u" / "config.json").write_text("[1]")
    assert "JSON object" in checkpoint_problem("ddpm", tmp_path / "u")
    msg = checkpoint_problem("ddpm", "hf:only-one-part")
    assert "hf:owner/name" in msg and "--ddpm" in msg
    with pytest.raises(ValueError, match="kind"):
        checkpoint_problem("vae", tmp_path)


# --- item 4: read_config is public -------------------------------------------------------------


def test_read_config(tmp_path):
    (tmp_path / "c.json").write_text('{"a": 1}')
    assert read_config(tmp_path / "c.json") == {"a": 1}
    (tmp_path / "c.json").write_text("[1]")
    with pytest.raises(pg.UsageError, match="--unet-config .*c.json.*JSON object"):
        read_config(tmp_path / "c.json", label="--unet-config")
    with pytest.raises(pg.CheckpointError, match="cannot read"):
        read_config(tmp_path / "missing.json")


@pytest.mark.parametrize("flag, says", [
    ("pg.load_ddpm", 'pass `pg.load_ddpm("DIR")`'), ("ddpm=", 'pass `ddpm="DIR"`'),
    ("--ddpm", "pass `--ddpm DIR`"),
])  # fmt: skip
def test_a_missing_checkpoint_is_named_as_the_caller_gives_it(tmp_path, flag, says):
    """The Python API's errors name its argument, the commands' their flag (issue 24 item 4)."""
    kw = {} if flag == "pg.load_ddpm" else {"flag": flag}
    with pytest.raises(pg.CheckpointError) as info:
        pg.load_ddpm(tmp_path / "nope", **kw)
    assert says in str(info.value) and "does not exist" in str(info.value)


def test_the_one_loader_names_python_keywords_for_ray(tmp_path):
    """PurifyBatches / EnergyBatches load through `load_models` with their keywords named."""
    from puregen_fast.purifier import load_models

    with pytest.raises(pg.CheckpointError, match='pass `ebm="DIR"`'):
        load_models("ebm", str(tmp_path / "nope"), named=("ebm=", "ddpm="))
    with pytest.raises(pg.CheckpointError, match="pass `--ebm DIR`"):
        load_models("ebm", str(tmp_path / "nope"))
