"""Hostile poison files (issue 22): nesting that overflows the C stack, memo fan-out, huge
claimed sizes, shared buffers, expanded tensors, zip inflation, out-of-range indices and labels,
meta and sparse tensors. Each is loaded in a child process under a deadline and a memory cap
(`poison_cases`), since the failure modes are a crash, a hang or gigabytes: every one must be
a UsageError naming the limit it hit. Healthy files, in both torch formats, load as torch itself
loads them, and `pickle_scan` passes every pickle that real picklers write.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import poison_cases as C
import pytest
import torch
from fixtures_data import write_cifar10
from helpers import skip_if_cut
from PIL import Image

from puregen_fast.data import pickle_scan as S
from puregen_fast.eval import poisons as P

CHILD = Path(C.__file__)
MEMORY_CAP = 3 << 30  # address space of the child: torch's import alone maps about 0.9 GiB
DEADLINE_S = 20.0  # per case; each takes milliseconds
FUZZ_CASES = 25  # generated files per format in the default run; -m slow: 10,000 each

# what each case's message must name (the limit, or the global refused)
NEEDLES = {
    "deep tuple dict key": "pickle depth",
    "deep tuple in frozenset": "pickle depth",
    "deep list": "pickle depth",
    "memo fan-out 10x10": "pickle items",
    "fan-out as image mode": "pickle items",
    "fan-out as codecs encoding": "pickle items",
    "shape of 200 huge ints": "pickle integer",
    "shape of 8 x 2**40": "numpy array shape",
    "one pixel buffer in 400 images": "pickle bytes",
    "expanded tensor as indices": "size and stride",
    "storage claiming 2**40 elements": "tensor bytes",
    "memo index 2**32-1": "pickle items",
    "bytes claiming 2**62": "claims 4611686018427387904 bytes",
    "self-referencing list": "self-referencing",
    "index 2**70": "an index out of range",
    "bp deep tuple": "pickle depth",
    "bp memo fan-out": "pickle items",
    "bp index 2**70": "an index out of range",
    "bp label 2**70": "a poison label out of range",
    "bp negative label": "a poison label out of range",
    "bp expanded idx": "size and stride",
    "bp meta image": "_rebuild_meta_tensor_no_storage",
    "bp sparse image": "_rebuild_sparse_tensor",
    "bp inflates to 300 MB": "zip inflated bytes",
    "bp declares less than it inflates": "Bad CRC",
    "bp storage claims 2**40 elements": "tensor bytes",
    "bp legacy format, huge claim": "tensor bytes",
    "npy deep header": "not a readable .npy trigger",
    "npy huge shape": "s <= 1024",
    "npy unbalanced header": "cannot parse the .npy header",
    "npy header claims 4 GiB": "npy header bytes",
    "npy object dtype": "float (1, 3, s, s)",
    "cifar deep tuple key": "pickle depth",
    "cifar memo index 2**32-1": "pickle items",
    "checkpoint deep tuple key": "pickle depth",
    "checkpoint legacy deep tuple": "pickle depth",
    "checkpoint legacy with a zip appended": "pickle depth",
    "bp two members of one name": "two members of one name",
}


def _more_cases(tmp: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    """The same nesting in the other pickles read: CIFAR-10 batches and .pt weights."""
    deep_key = C.wrap(b"}" + C.deep_tuple(300_000) + C.p_int(1) + b"s", 2)
    out = {
        "cifar deep tuple key": ("cifar", {"cifar-10-batches-py/batches.meta": deep_key}),
        "cifar memo index 2**32-1": (
            "cifar",
            {"cifar-10-batches-py/test_batch": C.wrap(b"]r\xff\xff\xff\xff", 2)},
        ),
        "checkpoint deep tuple key": ("ckpt", {"model.pt": C.torch_zip(deep_key, {})}),
        "checkpoint legacy deep tuple": (
            "ckpt",
            {"model.pt": C.legacy_torch(deep_key, [], [])},
        ),
        # torch reads this as legacy (its first bytes), zipfile would find the zip at its end
        "checkpoint legacy with a zip appended": (
            "ckpt",
            {"model.pt": C.legacy_torch(deep_key, [], []) + C.torch_zip(C.wrap(b"}", 2), {})},
        ),
        "bp two members of one name": ("bp", {"poison_00799.pth": _twice(deep_key)}),
    }
    return out


def _twice(pkl: bytes) -> bytes:
    """A torch zip holding data.pkl twice: a healthy one, then ``pkl``."""
    import io
    import warnings
    import zipfile

    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        z.writestr("archive/data.pkl", C.wrap(b"}", 2))
        z.writestr("archive/data.pkl", pkl)
    return buf.getvalue()


def run_child(
    tmp_path: Path, cases: dict, memory: int = MEMORY_CAP, timeout: float = 0, **extra
) -> dict:
    """Loads ``cases`` (name -> (loader, files)) in a child process; its JSON report."""
    folders = []
    for i, (name, (loader, files)) in enumerate(cases.items()):
        d = tmp_path / f"case{i}"
        if loader == "cifar":
            write_cifar10(d)
        C.write_case(d, files)
        folders.append((name, loader, str(d)))
    spec = tmp_path / "run.json"
    spec.write_text(
        json.dumps({"memory_bytes": memory, "deadline_s": DEADLINE_S, "cases": folders, **extra})
    )
    r = subprocess.run(
        [sys.executable, str(CHILD), str(spec)],
        capture_output=True,
        text=True,
        timeout=timeout or DEADLINE_S * len(cases) + 120,
    )
    # a crash (SIGSEGV: -11) or an uncaught error fails here, with what it printed
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def child_report(tmp_path_factory) -> dict:
    """One child loads every hostile file and runs the default fuzz (one torch import)."""
    tmp = tmp_path_factory.mktemp("hostile")
    cases = {**C.hostile_cases(), **_more_cases(tmp)}
    assert set(cases) == set(NEEDLES)
    fuzz = {"formats": ["gm", "bp", "narcissus"], "cases": FUZZ_CASES}
    return run_child(tmp, cases, timeout=600, fuzz=fuzz)


def test_hostile_poison_files_are_clean_errors(child_report):
    report = child_report
    results = report["results"]
    bad = {
        name: r["out"]
        for name, r in results.items()
        if not r["out"].startswith("usage: ") or NEEDLES[name] not in r["out"]
    }
    assert not bad, bad
    print(f"{len(results)} hostile files: all clean errors; peak RSS {report['peak_rss_mib']} MiB")
    assert report["peak_rss_mib"] < 600  # nothing was built: about torch's import alone (300)


@pytest.mark.slow
def test_a_real_zip_bomb_is_refused_before_inflating(tmp_path):
    # 300 MB of zeros deflated to about 0.3 MB, declared truthfully
    report = run_child(tmp_path, {"bomb": ("bp", {"poison_00799.pth": C.zip_bomb(300 << 20)})})
    assert "zip inflated bytes" in report["results"]["bomb"]["out"]
    assert report["peak_rss_mib"] < 1500


# ----------------------------------------------------------------------------- healthy files


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_torch_files_read_as_torch_reads_them(tmp_path, zipped):
    # the .pth reader is ours now: every tensor, dtype, view and container as torch.load
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 5, 5, generator=gen)
    obj = {
        "poison": [(base[i], i) for i in range(4)],  # views sharing one storage
        "idx": torch.arange(10, 14),
        "misc": OrderedDict(
            half=torch.ones(2, dtype=torch.float16),
            bf=torch.ones(3, dtype=torch.bfloat16),
            flags=torch.tensor([True, False]),
            t=base[:, 1, ::2].transpose(0, 1),  # a strided view
            param=torch.nn.Parameter(torch.zeros(2)),
            empty=torch.zeros(0, 3),
            zeros=torch.zeros(64, 256),  # deflates to far less than it holds
            nested=[{"a": (1, 2.5, "x", b"y", None)}],
        ),
    }
    path = tmp_path / "f.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    want = torch.load(path, weights_only=True)
    got = P._read_torch(path.read_bytes(), "f.pth")

    def same(a, b) -> None:
        assert type(a) is type(b) or isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        else:
            assert a == b

    same(want, got)
    # a deflated zip, as a zip tool would re-pack it, reads the same
    if zipped:
        import zipfile

        packed = tmp_path / "packed.pth"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as z:
            for info in src.infolist():
                z.writestr(info.filename, src.read(info))
        same(want, P._read_torch(packed.read_bytes(), "packed.pth"))


def test_bullseye_polytope_legacy_format_loads_like_the_zip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    obj = {"poison": [(torch.randn(3, 8, 8, generator=gen), 2) for _ in range(3)], "idx": [5, 1, 7]}
    torch.save(obj, tmp_path / "a.pth")
    torch.save(obj, tmp_path / "b.pth", _use_new_zipfile_serialization=False)
    a, b = (
        P.load_bullseye_polytope(tmp_path / "a.pth"),
        P.load_bullseye_polytope(tmp_path / "b.pth"),
    )
    want = np.stack([P._unnormalise(t) for t, _ in obj["poison"]])
    assert np.array_equal(a.images, want) and np.array_equal(b.images, want)
    assert a.indices.tolist() == b.indices.tolist() == [5, 1, 7]


def _objects() -> list:
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    shared = [1, 2]
    return [
        [(img, 3), (img.convert("L"), 1)],
        {b"data": np.zeros((3, 8), np.uint8), b"labels": list(range(300)), "s": "x" * 5000},
        (shared, shared, frozenset({1, (2, 3)}), {4, 5}, OrderedDict(a=1)),
        torch.arange(6).reshape(2, 3),
        [2**200, -(2**70), 1.5, True, None, bytearray(b"ab")],
    ]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_scan_passes_what_picklers_write(protocol):
    for obj in _objects():
        data = pickle.dumps(obj, protocol=protocol)
        assert S.scan_pickle(data) == len(data)


def test_scan_counts_what_sharing_expands_to():
    # 4 levels of 10 references: 10**4 items when copied; a budget of 5,000 refuses it, one
    # of 20,000 passes it
    data = C.wrap(C.fanout(4, 10))
    S.scan_pickle(data, S.Budget(items=20_000))
    with pytest.raises(S.PickleLimitError, match="pickle items"):
        S.scan_pickle(data, S.Budget(items=5_000))
    # a 1,000-byte string referenced 100 times is 100,000 bytes built
    s = C.wrap(b"](" + C.p_bytes(bytes(1000)) + C.MEMOIZE + b"h\x00" * 99 + b"e")
    S.scan_pickle(s, S.Budget(nbytes=100_000))
    with pytest.raises(S.PickleLimitError, match="pickle bytes"):
        S.scan_pickle(s, S.Budget(nbytes=99_999))
    # depth: exactly at the limit passes
    S.scan_pickle(C.wrap(C.deep_tuple(99)), S.Budget(depth=100))
    with pytest.raises(S.PickleLimitError, match="pickle depth"):
        S.scan_pickle(C.wrap(C.deep_tuple(100)), S.Budget(depth=100))


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b"\x80\x02]\x94h\x00a.", "self-referencing"),  # L.append(L)
        (b"\x80\x02]\x94]\x94h\x01a\x85h\x01h\x00a.", "self-referencing"),  # changed after use
        (b"\x80\x02K\x01K\x02a.", "cannot hold items"),
        (b"\x80\x02t.", "MARK"),
        (b"\x80\x02K\x01", "no STOP"),
        (b"\x80\x02\xff.", "unknown pickle opcode"),
        (b"\x80\x02h\x07.", "read before it is written"),
        (b"\x80\x02I" + b"1" * 5000 + b"\n.", "pickle integer"),
        (b"\x80\x02K\x01p" + b"9" * 20 + b"\n.", "memo index"),
    ],
    ids=["self", "changed", "int-target", "no-mark", "cut", "opcode", "memo", "int", "put"],
)
def test_scan_refuses_malformed_streams(raw, needle):
    with pytest.raises(ValueError, match=needle):
        S.scan_pickle(raw)


def test_messages_never_stringify_untrusted_objects():
    nested: list = []
    for _ in range(10):
        nested = [nested] * 10  # 10**10 items if printed
    assert P._brief(nested) == "a list of length 10"
    assert P._brief(2**4000) == "an integer of 4001 bits"
    assert P._brief("x" * 10**6) == "a str of length 1000000"
    assert P._brief("RGBA") == "'RGBA'"
    with pytest.raises(ValueError, match="PIL image mode a list of length 10"):
        P._PickledImage().__setstate__([{}, nested, (1, 1), None, b"abc"])
    with pytest.raises(P.UnsafePickleError, match="a list of length 10"):
        P._codecs_encode("x", nested)


# ----------------------------------------------------------------------------- fuzz

SLOW_FUZZ_CASES = 10_000


def _check_fuzz(reports: list[dict], cases: int) -> None:
    for r in reports:
        c = r["counts"]
        print(
            f"{r['format']}: {c.get('cases', 0)} cases, {c.get('ok', 0)} loaded, "
            f"{c.get('clean', 0)} clean errors, {c.get('other', 0)} other, {c.get('hang', 0)} "
            f"hangs; slowest {r['slowest_s']} s, peak RSS {r['peak_rss_mib']} MiB"
        )
        assert c.get("ok", 0) + c.get("clean", 0) == c.get("cases"), r["others"]
        if c.get("cases", 0) < cases:
            skip_if_cut(f"{r['format']} poison fuzz", c.get("cases", 0), cases)
        assert c.get("cases") == cases


def test_fuzz_poison_files(child_report):
    _check_fuzz(child_report["fuzz"], FUZZ_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gm", "bp", "narcissus"])
def test_fuzz_poison_files_slow(tmp_path, fmt):
    fuzz = {"formats": [fmt], "cases": SLOW_FUZZ_CASES}
    _check_fuzz(run_child(tmp_path, {}, timeout=3 * 3600, fuzz=fuzz)["fuzz"], SLOW_FUZZ_CASES)


def test_a_torch_file_inside_a_torch_file_is_refused():
    # torch.storage._load_from_bytes inside the legacy file that _load_from_bytes reads: each
    # level would start another reader
    inner = C.legacy_torch(C.wrap(C.p_pid("0", 1, "LongStorage", legacy=True), 2), ["0"],
                           [(1, bytes(8))])  # fmt: skip
    for _ in range(3):
        storage = C.p_call(C.p_global("torch.storage", "_load_from_bytes"), [C.p_bytes(inner)])
        inner = C.legacy_torch(C.wrap(storage, 2), [], [])
    with pytest.raises(P.UnsafePickleError, match="inside a torch file"):
        P._read_torch(inner, "nested")


def test_a_huge_global_name_is_not_printed_whole(tmp_path):
    name = "m" * (1 << 20)  # a 1 MB module name in a 1 MB file
    data = C.wrap(C.p_str(name) + C.p_str("x") + b"\x93")
    (tmp_path / "p.pickle").write_bytes(data)
    with pytest.raises(P.UnsafePickleError) as info:
        P.safe_unpickle(tmp_path / "p.pickle")
    assert "m" * 100 in str(info.value) and len(str(info.value)) < 1000
    write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").write_bytes(data)
    from puregen_fast.data.datasets import open_dataset
    from puregen_fast.errors import UsageError

    with pytest.raises(UsageError) as info:
        open_dataset("cifar10", tmp_path / "c", "test", download=False, cache=False)
    assert "test_batch" in str(info.value) and len(str(info.value)) < 1000
