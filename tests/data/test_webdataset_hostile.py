"""Hostile WebDataset shards and patterns (issue 22): ignored members are skipped unread, image
and label members are capped from their headers before a byte is read, brace patterns are
counted before they are expanded, a shard is recognised through links, non-UTF-8 names and a
``.png`` holding another format are exit 2."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import FuzzHang, memory_cap, run_fuzz
from hypothesis import given, settings
from hypothesis import strategies as st
from peak_rss import SOURCE as PEAK_RSS
from PIL import Image

from puregen_fast.data import webdataset as pgwds
from puregen_fast.data.webdataset import (
    MAX_CLS_BYTES,
    MAX_SHARDS,
    count_expansions,
    expand_shards,
    index_webdataset,
    member_cap,
)
from puregen_fast.errors import UsageError

GiB = 1 << 30


def _png(rng_seed: int = 0) -> bytes:
    x = np.random.default_rng(rng_seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _shard(path: Path, members: list[tuple[str, bytes]], tail: bytes = b"") -> Path:
    """A tar of ``members``; ``tail``: raw blocks placed before the end-of-archive blocks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            _add(tf, name, data)
    raw = buf.getvalue().rstrip(b"\0")
    raw += b"\0" * (-len(raw) % 512)
    path.write_bytes(raw + tail + b"\0" * 1024)
    return path


def _sparse_header(name: str, realsize: int) -> bytes:
    """An old-GNU sparse member ('S') whose 512 bytes of data sit at the end of a file of
    ``realsize`` bytes: a 1 KiB entry that reads back as ``realsize`` bytes of zeros."""
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.GNUTYPE_SPARSE
    ti.size = 512
    hdr = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))
    hdr[386:398] = b"%011o\0" % (realsize - 512)  # sparse[0].offset
    hdr[398:410] = b"%011o\0" % 512  # sparse[0].numbytes
    hdr[483:495] = b"%011o\0" % realsize  # realsize
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr) + b"\1" * 512


def _capped(code: str, *args: str, limit: int = 2 * GiB, timeout: float = 120) -> dict:
    """Run ``code`` with ``args`` (it prints one JSON object) under an address-space cap."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=cap)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_INDEX = PEAK_RSS + """
import json, resource, sys
from puregen_fast.data.webdataset import index_webdataset
from puregen_fast.errors import UsageError
res = []
for path in sys.argv[1:]:
    try:
        out = {"ok": index_webdataset(path).keys}
    except UsageError as e:
        out = {"usage": str(e)}
    except BaseException as e:
        out = {"other": f"{type(e).__name__}: {e}"[:500]}
    res.append(out)
print(json.dumps({"results": res, "peak_mb": peak_rss_mib()}))
"""


@pytest.mark.slow
def test_a_sparse_member_declaring_6_gib_is_skipped_or_refused_unread(tmp_path):
    """Issue 22: a 4 KB shard with a GNU-sparse member declaring 6 GiB drove memory to 6.6 GB
    and ended in MemoryError (exit 1): every member was read whole, ignored ones too. Under a
    2 GiB address-space cap: an ignored one is skipped, an image one refused from its size.
    (Slow: a fresh interpreter, about 7 s; `test_members_are_capped_before_they_are_read` is
    the same rule in the default suite.)"""
    good = [("a.png", _png()), ("a.cls", b"1")]
    ignored = _shard(tmp_path / "ignored.tar", good, _sparse_header("a.bin", 6 * GiB))
    image = _shard(tmp_path / "image.tar", good, _sparse_header("b.png", 6 * GiB))
    assert ignored.stat().st_size < 8192
    got = _capped(_INDEX, str(ignored), str(image))
    res, res2 = got["results"]
    assert res.get("ok") == ["a"], res
    assert "usage" in res2, res2
    assert f"{6 * GiB} bytes, more than the {member_cap(pgwds.MAX_PIXELS)}" in res2["usage"]
    assert "b.png" in res2["usage"] and "--max-image-pixels" in res2["usage"]
    assert got["peak_mb"] < 1024


def test_members_are_capped_before_they_are_read(tmp_path, monkeypatch):
    """An image member over the cap of --max-image-pixels and a label over MAX_CLS_BYTES are
    refused from their headers: nothing of them is read."""
    reads = []
    real = tarfile.ExFileObject.read

    def spy(self, size=-1):
        reads.append(size)
        return real(self, size)

    monkeypatch.setattr(tarfile.ExFileObject, "read", spy)
    big = b"\x89PNG" + b"\0" * (member_cap(16) + 1)
    p = _shard(tmp_path / "big.tar", [("a.png", big), ("a.cls", b"0")])
    with pytest.raises(UsageError, match=rf"member 'a.png': {len(big)} bytes, more than the "
                       rf"{member_cap(16)} an image member may hold"):  # fmt: skip
        index_webdataset(p, max_pixels=16)
    assert reads == []
    p = _shard(tmp_path / "cls.tar", [("a.png", _png()), ("a.cls", b" " * MAX_CLS_BYTES + b"1")])
    with pytest.raises(UsageError, match=f"more than the {MAX_CLS_BYTES} a label member"):
        index_webdataset(p)
    # ignored members are never read, however many
    p = _shard(tmp_path / "ok.tar", [("a.png", _png()), ("a.cls", b"2"), ("a.json", b"{}" * 999),
                                     ("a.seg.png", b"junk"), ("README", b"text")])  # fmt: skip
    reads.clear()
    assert index_webdataset(p).keys == ["a"]
    assert len(reads) == 2  # the image and the label


def test_a_huge_declared_image_is_refused_without_pillows_warning(tmp_path):
    """A member whose header declares 12000 x 12000 (over Pillow's own limit) is refused by the
    cap, naming the flag; Pillow's DecompressionBombWarning is not printed beside it."""
    from fixtures_data import png_header_only

    p = _shard(tmp_path / "s.tar", [("a.png", png_header_only(12000, 12000)), ("a.cls", b"0")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match=r"12000x12000 = 144000000 pixels.*--max-image-pix"):
            index_webdataset(p)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(
    "pattern",
    ["x-{0..9999999}.tar", "{0..9}" * 8, "s{0..99999999999999999999}.tar",
     "{a,b}{0..999}{0..999}.tar", "x{0..99999}.tar::y{0..9}.tar"],
)  # fmt: skip
def test_brace_patterns_are_counted_before_they_are_expanded(tmp_path, pattern):
    """Issue 22: 'x-{0..9999999}.tar' and eight {0..9} groups hung in the expansion. A pattern
    naming more than MAX_SHARDS shards is refused at once, naming the limit."""
    t = time.perf_counter()
    with pytest.raises(UsageError, match=f"more than the {MAX_SHARDS} allowed"):
        expand_shards(str(tmp_path / pattern))
    assert time.perf_counter() - t < 1.0


def test_a_missing_first_shard_is_reported_quickly(tmp_path):
    """'{0..99999}' (at the limit) took 11.7 s and 340 MB to say that shard 0 is missing."""
    t = time.perf_counter()
    with pytest.raises(UsageError, match="x-00000.tar cannot be read"):
        expand_shards(str(tmp_path / "x-{00000..99999}.tar"))
    assert time.perf_counter() - t < 5.0  # 0.7 s on a shared 2-core machine


_ATOM = st.sampled_from(["a", "b", "7", "-", ".", ",", "..", "\\", "\\{", "\\,", "${X}"])


@st.composite
def _patterns(draw, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["atom", "range", "chars", "list", "brace"] if depth < 3
                                    else ["atom"]))  # fmt: skip
        if kind == "atom":
            parts.append(draw(_ATOM))
        elif kind == "range":
            a, b = draw(st.integers(-4, 4)), draw(st.integers(-4, 4))
            pad = draw(st.sampled_from(["", "0", "00"]))
            step = draw(st.sampled_from(["", "..0", "..3", "..-2"]))
            parts.append(f"{{{pad}{a}..{b}{step}}}")
        elif kind == "chars":
            a, b = draw(st.sampled_from("aZzA")), draw(st.sampled_from("bYyB"))
            parts.append(f"{{{a}..{b}{draw(st.sampled_from(['', '..2', '..99']))}}}")
        elif kind == "list":
            items = draw(st.lists(_patterns(depth + 1), min_size=1, max_size=3))
            parts.append("{" + ",".join(items) + "}")
        else:
            parts.append(draw(st.sampled_from(["{", "}", "{}", "{x}"])))
    return "".join(parts)


@given(a=_patterns(), b=st.none() | _patterns())
@settings(max_examples=150, deadline=None)
def test_the_count_is_the_expansion_length(a, b):
    """The counter follows webdataset's expansion exactly (``::`` parts, ${WDS_X}, escapes,
    ranges with padding and steps, letter ranges, lists, nesting, literal and unbalanced
    braces), so the limit is the number of shards that would be read."""
    from hypothesis import assume
    from webdataset.shardlists import expand_urls

    spec = a if b is None else f"{a}::{b}"
    os.environ["WDS_X"] = "{1,2,3}"
    try:
        try:  # big expansions are slow to list: compare on those that are quick
            assume(count_expansions(spec) <= 3000)
        except UsageError:
            pass
        try:
            want = len(expand_urls(spec))
        except ValueError:  # braceexpand's UnbalancedBracesError
            with pytest.raises(UsageError, match="unbalanced braces"):
                count_expansions(spec)
            return
        assert count_expansions(spec) == want
    finally:
        del os.environ["WDS_X"]


def test_an_unset_pattern_variable_is_exit_2(tmp_path, monkeypatch):
    """webdataset replaces ${name} with $WDS_name and asserts it is set (exit 1 before)."""
    monkeypatch.delenv("WDS_NOPE", raising=False)
    with pytest.raises(UsageError, match=r"WDS_NOPE is not set"):
        expand_shards(f"{tmp_path}/${{NOPE}}-{{0..3}}.tar")


def test_a_link_to_a_listed_shard_is_the_same_shard(tmp_path):
    """The duplicate check compared names: a link to a listed shard was read twice."""
    p = _shard(tmp_path / "s-0.tar", [("a.png", _png()), ("a.cls", b"0")])
    (tmp_path / "s-1.tar").symlink_to(p)
    os.link(p, tmp_path / "hard.tar")
    for spec in (f"{tmp_path}/s-{{0..1}}.tar", f"{p}::{tmp_path / 'hard.tar'}", str(tmp_path)):
        with pytest.raises(UsageError, match="more than once .*are the same file"):
            expand_shards(spec)


def test_a_non_utf8_member_name_is_exit_2(tmp_path):
    p = tmp_path / "s.tar"
    with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, os.fsdecode(b"\xff\xfe.png"), _png())
        _add(tf, os.fsdecode(b"\xff\xfe.cls"), b"0")
    with pytest.raises(UsageError, match=r"member name '\\xff\\xfe.png' is not UTF-8"):
        index_webdataset(p)


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "BMP"])
@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_an_image_member_must_hold_png_jpeg_or_webp(tmp_path, fmt, ext):
    """A .png member holding TIFF or GIF was decoded by those decoders; only the PNG, JPEG and
    WebP decoders ever see shard bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format=fmt)
    p = _shard(tmp_path / "s.tar", [(f"a.{ext}", buf.getvalue()), ("a.cls", b"0")])
    with pytest.raises(UsageError, match=f"the .{ext} member holds {fmt} data; only PNG, JPEG "
                       "and WebP images are read"):  # fmt: skip
        index_webdataset(p)


def test_one_of_the_three_formats_under_anothers_extension_is_still_read(tmp_path):
    """Mislabelled but safe (a PNG named .jpg) is read as before: only the decoder set is
    restricted, so a healthy shard's bytes and hash do not change."""
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    p = _shard(tmp_path / "s.tar", [("a.jpg", buf.getvalue()), ("a.cls", b"0")])
    from puregen_fast.data.webdataset import open_webdataset

    np.testing.assert_array_equal(open_webdataset(p).images[0], x)


# ----------------------------------------------------------------------------- fuzz

FUZZ_EXAMPLES = 150
FUZZ_SLOW_EXAMPLES = 10_000
HANG_S = 8.0  # a case still running after this is stopped and counted as a hang
MEMORY_CAP = 1 << 30  # bytes a case may map beyond what the process maps before it

_KEYS = ["a", "b", "dir/a", "../a", "/a", "a.b", "__k__", os.fsdecode(b"\xff"), "L" * 120]
_EXTS = ["png", "PNG", "jpg", "jpeg", "webp", "cls", "cls", "json", "seg.png", "txt", None]
_PAYLOADS = ["png", "png16", "jpeg", "gif", "tiff", "bmp", "webp", "junk", "cut-png",
             "bomb-png", "cls0", "cls7", "cls-1", "clsbig", "clsjunk", "empty"]  # fmt: skip
_MEMBER = st.tuples(st.sampled_from(_KEYS), st.sampled_from(_EXTS),
                    st.sampled_from(["file"] * 6 + ["dir", "sym", "hard", "fifo"]),
                    st.sampled_from(_PAYLOADS))  # fmt: skip
# Good samples (an image and its label under one key) with hostile members among them, so whole
# shards are also read and decoded, not only refused.
_GOOD = st.builds(
    lambda k, img, cls: [(f"k{k}", img[0], "file", img[1]), (f"k{k}", "cls", "file", cls)],
    st.integers(0, 3),
    st.sampled_from([("png", "png"), ("jpg", "jpeg"), ("webp", "webp"), ("PNG", "png16")]),
    st.sampled_from(["cls0", "cls7"]),
)
_TAME = st.builds(
    lambda goods, extra, at: _insert(sum(goods, []), extra, at),
    st.lists(_GOOD, min_size=1, max_size=4, unique_by=lambda g: g[0][0]),
    st.lists(_MEMBER.filter(lambda m: m[1] not in ("png", "PNG", "jpg", "jpeg", "webp", "cls")),
             max_size=2),
    st.integers(0, 8),
)  # fmt: skip


def _insert(members: list, extra: list, at: int) -> list:
    i = at % (len(members) + 1)
    return members[:i] + extra + members[i:]


_CASE = st.tuples(
    st.one_of(st.lists(_MEMBER, max_size=8), _TAME, _TAME),
    st.lists(st.tuples(st.sampled_from(["a.png", "a.bin", "b.cls", "c.jpg"]),
                       st.integers(0, 1 << 36)), max_size=2),  # sparse members at the end
    st.sampled_from(["none", "none", "truncate", "flip"]),
    st.integers(0, 10**6),
    st.integers(1, 255),
)  # fmt: skip


def _payload(kind: str) -> bytes:
    if kind.startswith("cls"):
        return {"cls0": b"0", "cls7": b" 7\n", "cls-1": b"-1", "clsbig": b"9" * 5000,
                "clsjunk": b"\xff\x00x"}[kind]  # fmt: skip
    if kind in ("junk", "empty"):
        return b"\x00junk" * 40 if kind == "junk" else b""
    if kind == "bomb-png":  # a PNG header claiming 100000 x 100000 pixels
        import struct
        import zlib

        ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                + struct.pack(">I", zlib.crc32(chunk)))  # fmt: skip
    fmt = {"png": "PNG", "png16": "PNG", "jpeg": "JPEG", "gif": "GIF", "tiff": "TIFF",
           "bmp": "BMP", "webp": "WEBP", "cut-png": "PNG"}[kind]  # fmt: skip
    im = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    if kind == "png16":
        im = Image.fromarray(np.full((8, 8), 4000, np.uint16))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    raw = buf.getvalue()
    return raw[: len(raw) // 2] if kind == "cut-png" else raw


def _build(path: Path, case) -> None:
    members, sparse, how, where, byte = case
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for key, ext, typ, payload in members:
            ti = tarfile.TarInfo(key if ext is None else f"{key}.{ext}")
            data = None
            if typ == "file":
                raw = _payload(payload)
                ti.size, data = len(raw), io.BytesIO(raw)
            else:
                ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                           "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[typ]  # fmt: skip
                ti.linkname = "a.png" if typ in ("sym", "hard") else ""
            tf.addfile(ti, data)
    raw = buf.getvalue().rstrip(b"\0")
    raw += b"\0" * (-len(raw) % 512)
    for name, real in sparse:
        raw += _sparse_header(name, max(real, 512))
    raw += b"\0" * 1024
    if how == "truncate":
        raw = raw[: where % (len(raw) + 1)]
    elif how == "flip" and raw:
        i = where % len(raw)
        raw = raw[:i] + bytes([raw[i] ^ byte]) + raw[i + 1 :]
    path.write_bytes(raw)


def _one(root: Path, case) -> str:
    import signal

    from puregen_fast.data.webdataset import open_webdataset

    path = root / f"case-{time.perf_counter_ns()}.tar"
    try:
        _build(path, case)
    except (ValueError, UnicodeError, tarfile.TarError):
        return "unbuildable"
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        with memory_cap(MEMORY_CAP):
            ix = index_webdataset(path)
            np.asarray(open_webdataset(path, index=ix).images[:])  # every image decoded
        return "read"
    except UsageError:
        return "clean error"
    except FuzzHang:
        return "hang"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        path.unlink(missing_ok=True)


def _fuzz(tmp_path_factory, n: int) -> dict:
    root = tmp_path_factory.mktemp("wdsfuzz")
    return run_fuzz("WebDataset", _CASE, lambda case: _one(root, case), n, success="read",
                    min_cases=0.9)  # fmt: skip


def test_webdataset_fuzz(tmp_path_factory):
    """Hostile shards built from random members (names with '..', absolute, non-UTF-8, long;
    folders, links, FIFOs; PNG, 16-bit PNG, JPEG, WebP, GIF, TIFF, BMP, junk, cut and
    bomb-header images; good and bad labels; GNU-sparse members declaring up to 64 GiB), some
    cut or flipped afterwards. Indexing and decoding every image may only succeed or raise
    UsageError, within HANG_S seconds and MEMORY_CAP bytes beyond the process."""
    _fuzz(tmp_path_factory, FUZZ_EXAMPLES)


@pytest.mark.slow
def test_webdataset_fuzz_long(tmp_path_factory):
    _fuzz(tmp_path_factory, FUZZ_SLOW_EXAMPLES)


@given(st.text(alphabet="{}.,:0123456789aZ\\$-/", max_size=80))
@settings(max_examples=150, deadline=2000)
def test_any_data_dir_pattern_is_a_clean_error(tmp_path_factory, spec):
    """Whatever --data-dir holds (unbalanced, nested, huge ranges, ${}, '::'), naming shards
    that do not exist: a UsageError within the deadline, never another exception."""
    root = tmp_path_factory.getbasetemp() / "no-shards-here"
    with pytest.raises(UsageError):
        expand_shards(f"{root}/{spec}")


def test_a_huge_member_name_is_refused_with_a_short_message(tmp_path):
    """A GNU long name can be as long as the shard; the key and the message stay bounded."""
    p = _shard(tmp_path / "s.tar", [("k" * 100_000 + ".png", _png()), ("a.cls", b"0")])
    with pytest.raises(UsageError, match="a member name of 100004 characters") as e:
        index_webdataset(p)
    assert len(str(e.value)) < 1000
