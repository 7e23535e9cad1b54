"""EBMSNGAN32 against an independent functional re-implementation, in the authors' format."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import puregen_fast as pg

NAMES = [
    "block1.c1", "block1.c2", "block1.c_sc", "block2.c1", "block2.c2", "block2.c_sc",
    "block3.c1", "block3.c2", "block4.c1", "block4.c2",
]  # fmt: skip


def random_authors_state(nf: int, patch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict shaped like the authors' checkpoints, with non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    cin = {"block1.c1": 3 * patch**2, "block1.c_sc": 3 * patch**2}
    sd = {}
    for n in NAMES:
        k = 1 if n.endswith("c_sc") else 3
        ci = cin.get(n, nf)
        sd[f"{n}.weight"] = torch.randn(nf, ci, k, k, generator=g) * (1.0 / (ci * k * k)) ** 0.5
        sd[f"{n}.bias"] = torch.randn(nf, generator=g) * 0.1
    sd["l5.weight"] = torch.randn(1, nf, generator=g) * nf**-0.5
    return sd


def functional_energy(sd: dict[str, torch.Tensor], x: torch.Tensor, patch: int) -> torch.Tensor:
    """The architecture written out as plain functional ops, independently of puregen_fast."""

    def conv(h, n):
        w = sd[f"{n}.weight"]
        return F.conv2d(h, w, sd[f"{n}.bias"], padding=w.shape[-1] // 2)

    def pool(h):
        return F.avg_pool2d(h, 2)

    if patch > 1:
        x = F.pixel_unshuffle(x, patch)
    h = pool(conv(F.relu(conv(x, "block1.c1")), "block1.c2")) + conv(pool(x), "block1.c_sc")
    h = pool(conv(F.relu(conv(F.relu(h), "block2.c1")), "block2.c2")) + pool(conv(h, "block2.c_sc"))
    for b in ("block3", "block4"):
        h = h + conv(F.relu(conv(F.relu(h), f"{b}.c1")), f"{b}.c2")
    return (F.relu(h).mean((2, 3)) @ sd["l5.weight"].T).squeeze(1)


def write_authors_dir(path, sd, nf, patch):
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"nf": nf, "patch_size": patch}))


@pytest.mark.parametrize("nf, patch, hw", [(16, 1, 32), (8, 2, 64), (12, 1, 20)])
def test_authors_format_loads_and_energies_match(tmp_path, nf, patch, hw):
    sd = random_authors_state(nf, patch)
    write_authors_dir(tmp_path / "ebm", sd, nf, patch)
    ebm = pg.load_ebm(tmp_path / "ebm")
    assert (ebm.nf, ebm.patch_size) == (nf, patch)
    x = torch.rand(5, 3, hw, hw) * 2 - 1
    want = functional_energy(sd, x, patch)
    got = ebm(x)
    assert got.shape == (5,)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max())
    assert ebm.puregen_sha256 and len(ebm.puregen_sha256) == 64


def test_parameter_names_and_count():
    ebm = pg.EBMSNGAN32(nf=128)
    names = {k.rsplit(".", 1)[0] for k in ebm.state_dict()}
    assert names == set(NAMES) | {"l5"}
    assert "l5.bias" not in ebm.state_dict()
    n = sum(p.numel() for p in ebm.parameters())
    assert 1.0e6 < n < 1.2e6, n
    # Xavier-uniform weights, zero biases (the authors' init)
    assert all(float(b.abs().max()) == 0 for k, b in ebm.state_dict().items() if k.endswith("bias"))


def test_save_load_roundtrip_is_bit_exact(tmp_path):
    torch.manual_seed(1)
    ebm = pg.EBMSNGAN32(nf=8, patch_size=1)
    with torch.no_grad():
        for p in ebm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pg.save_ebm(ebm, tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    back = pg.load_ebm(tmp_path / "e")
    for k, v in ebm.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(ebm(x), back(x))
    # a bare weights file also loads (config inferred from shapes)
    assert torch.equal(pg.load_ebm(tmp_path / "e" / "model.safetensors")(x), back(x))


def test_missing_tensor_is_named(tmp_path):
    sd = random_authors_state(8, 1)
    del sd["block3.c2.bias"]
    write_authors_dir(tmp_path / "m", sd, 8, 1)
    with pytest.raises(pg.CheckpointError, match=r"missing tensors: block3\.c2\.bias"):
        pg.load_ebm(tmp_path / "m")


def test_misshaped_tensor_is_named(tmp_path):
    sd = random_authors_state(8, 1)
    sd["block2.c1.weight"] = torch.zeros(8, 8, 5, 5)
    write_authors_dir(tmp_path / "s", sd, 8, 1)
    with pytest.raises(pg.CheckpointError, match=r"block2\.c1\.weight \(8, 8, 5, 5\)"):
        pg.load_ebm(tmp_path / "s")


def test_non_finite_and_missing_paths(tmp_path):
    sd = random_authors_state(8, 1)
    sd["l5.weight"][0, 0] = float("nan")
    write_authors_dir(tmp_path / "n", sd, 8, 1)
    with pytest.raises(pg.CheckpointError, match="non-finite"):
        pg.load_ebm(tmp_path / "n")
    with pytest.raises(pg.CheckpointError, match="does not exist"):
        pg.load_ebm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pg.CheckpointError, match="model.safetensors"):
        pg.load_ebm(tmp_path / "empty")


@pytest.mark.parametrize(
    "config, msg",
    [
        ([8, 1], "JSON object"),
        ("nf", "JSON object"),
        ({"nf": "eight", "patch_size": 1}, "'nf' must be a whole number"),
        ({"nf": 8.5, "patch_size": 1}, "'nf' must be a whole number"),
        ({"nf": None}, "'nf' must be a whole number"),
        ({"nf": 8, "patch_size": True}, "'patch_size' must be a whole number"),
    ],
)
def test_bad_config_json_is_a_checkpoint_error(tmp_path, config, msg):
    write_authors_dir(tmp_path / "c", random_authors_state(8, 1), 8, 1)
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(pg.CheckpointError, match=msg) as ei:
        pg.load_ebm(tmp_path / "c")
    assert "config.json" in str(ei.value)
    with pytest.raises(pg.CheckpointError, match=msg):  # a weights file beside the config
        pg.load_ebm(tmp_path / "c" / "model.safetensors")


def test_pickles_are_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "model.pt")
    with pytest.raises(pg.CheckpointError, match="cannot read weights"):
        pg.load_ebm(tmp_path / "model.pt")


def test_hf_source_offline_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants

    # huggingface_hub reads its environment at import: set the values it uses
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    # the Python API names its own call, not a flag (issue 24 item 4)
    with pytest.raises(pg.CheckpointError) as info:
        pg.load_ebm("hf:SunayBhat1/puregen-ebm-cinic10-imagenet")
    assert 'pass `pg.load_ebm("puregen-ebm-cinic10-imagenet")`' in str(info.value)
    assert "--ebm" not in str(info.value)
    assert "download SunayBhat1/puregen-ebm-cinic10-imagenet --local-dir" in str(info.value)
