"""Property-based fuzz of `safe_extract` (issue 11): random tar and zip archives built from
random member names (``..``, absolute, unicode, very long, empty), types (file, folder, symlink,
hard link, FIFO, character and block device, unknown), link targets, sizes and modes, some of
them damaged afterwards. Only the project's own error (UsageError, exit 2) may escape, nothing
may change outside the target folder (a sentinel tree around it is compared byte for byte, link
counts included), what is extracted holds plain files and folders only, and no case may hang.

The default run tries ``DEFAULT_EXAMPLES`` archives, ``-m slow`` tries ``SLOW_EXAMPLES``. Each
run prints its counts (run with ``-s`` to see them): cases, extracted, clean errors, other
exceptions, hangs, writes outside and links or special files extracted; the last four must be
0."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import signal
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from helpers import FuzzHang, run_fuzz, tree_snapshot
from hypothesis import strategies as st

from puregen_fast.data.download import COMPLETE_MARKER, safe_extract
from puregen_fast.errors import UsageError

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # zip writer

DEFAULT_EXAMPLES = 300
SLOW_EXAMPLES = 10_000
HANG_S = 8.0  # a case still running after this is stopped and counted as a hang
DEADLINE_MS = 10_000  # hypothesis' own limit per case, a backstop above HANG_S

BOX, VICTIM = "\x01BOX\x01", "\x01VICTIM\x01"  # replaced by the case's absolute paths

SEGMENT = st.one_of(
    st.sampled_from(["a", "b", "t", "x.png", "..", ".", "", "~", " ", "C:", "a\\..\\b",
                     "\x00", "ünïcødé", "名前", COMPLETE_MARKER, "victim.txt"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6),
    st.integers(240, 300).map(lambda n: "L" * n),  # at and past the file system's name limit
)  # fmt: skip
LEAD = st.sampled_from(["", "", "", "./", "/", "../", "../../", BOX + "/", "/" + BOX + "/"])
NAME = st.builds(
    lambda lead, segs, slash: lead + "/".join(segs) + ("/" if slash else ""),
    LEAD,
    st.lists(SEGMENT, max_size=4),
    st.booleans(),
)
LINK = st.one_of(NAME, st.sampled_from([".", "..", VICTIM, BOX, "../victim.txt", "l/..",
                                        "../../victim.txt", "t", "a/../.."]))  # fmt: skip
TYPES = ["file", "dir", "sym", "hard", "fifo", "chr", "blk", "cont", "odd"]
MEMBER = st.tuples(
    NAME,
    st.sampled_from(TYPES),
    LINK,
    st.one_of(st.integers(0, 64), st.integers(0, 20_000)),
    st.sampled_from([0o644, 0o755, 0o000, 0o4755, 0o7777, 0o111]),
)
# Names and types a real data archive has, so that whole archives also extract and the writing
# path (unicode, long names, repeated folders, "./" roots) is exercised, not only refusals.
TAME_SEGMENT = st.one_of(
    st.sampled_from(["a", "b", "t", "x.png", "ünïcødé", "名前", " ", "~"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\0"),
            min_size=1, max_size=6).filter(lambda s: s not in (".", "..", COMPLETE_MARKER)),
    st.integers(200, 255).map(lambda n: "L" * n),
)  # fmt: skip
TAME = st.tuples(
    st.builds(lambda lead, segs: lead + "/".join(segs), st.sampled_from(["", "./"]),
              st.lists(TAME_SEGMENT, min_size=1, max_size=3)),
    st.sampled_from(["file", "dir", "cont"]),
    st.just(""),
    st.integers(0, 3000),
    st.sampled_from([0o644, 0o755, 0o4755]),
)  # fmt: skip
# A link whose text stays inside: the kind a text check lets through
INSIDE_LINK = st.tuples(
    st.sampled_from(["l", "a/l", "./t/l"]),
    st.sampled_from(["sym", "hard"]),
    st.sampled_from([".", "a", "t", "x.png", "l/..", "a/b/.."]),
    st.just(0),
    st.just(0o777),
)
KINDS = ["tar", "tar.gz", "tar.bz2", "tar.xz", "tar-gnu", "tar-ustar", "zip", "zip-deflate"]
CASE = st.tuples(
    st.sampled_from(KINDS),
    st.one_of(
        st.lists(MEMBER, max_size=8),
        st.lists(st.one_of(TAME, TAME, TAME, INSIDE_LINK, MEMBER), max_size=8),
    ),
    st.sampled_from(["none", "none", "none", "flip", "truncate", "gz-of-junk"]),
    st.integers(0, 10**6),
    st.integers(1, 255),
)
_TAR_TYPE = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
             "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE,
             "blk": tarfile.BLKTYPE, "cont": tarfile.CONTTYPE, "odd": b"Z"}  # fmt: skip
_ZIP_TYPE = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "sym": stat.S_IFLNK,
             "hard": stat.S_IFREG, "fifo": stat.S_IFIFO, "chr": stat.S_IFCHR,
             "blk": stat.S_IFBLK, "cont": 0, "odd": stat.S_IFSOCK}  # fmt: skip


def _data(size: int) -> bytes:
    return (b"puregen-" * (size // 8 + 1))[:size]


def _tar(path: Path, kind: str, members: list[tuple]) -> None:
    mode = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}.get(kind, "w")
    fmt = {"tar-gnu": tarfile.GNU_FORMAT, "tar-ustar": tarfile.USTAR_FORMAT}.get(
        kind, tarfile.PAX_FORMAT
    )
    try:
        _write_tar(path, mode, fmt, members)
    except ValueError:  # a name or link too long for ustar: the same members in pax
        _write_tar(path, mode, tarfile.PAX_FORMAT, members)


def _write_tar(path: Path, mode: str, fmt: int, members: list[tuple]) -> None:
    with tarfile.open(path, mode, format=fmt) as tf:
        for name, typ, link, size, perm in members:
            ti = tarfile.TarInfo(name)
            ti.type = _TAR_TYPE[typ]
            ti.mode = perm
            data = None
            if typ in ("file", "cont", "odd"):
                ti.size = size
                data = io.BytesIO(_data(size))
            elif typ in ("sym", "hard"):
                ti.linkname = link
            elif typ in ("chr", "blk"):
                ti.devmajor, ti.devminor = size % 256, perm % 256
            tf.addfile(ti, data)


def _zip(path: Path, kind: str, members: list[tuple]) -> None:
    method = zipfile.ZIP_DEFLATED if kind == "zip-deflate" else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, typ, link, size, perm in members:
            zi = zipfile.ZipInfo(name + ("/" if typ == "dir" and not name.endswith("/") else ""))
            zi.create_system = 3
            zi.compress_type = method
            zi.external_attr = (_ZIP_TYPE[typ] | (perm & 0o7777)) << 16
            zf.writestr(zi, link.encode() if typ == "sym" else _data(size))


def _damage(path: Path, how: str, where: int, byte: int) -> None:
    raw = path.read_bytes()
    if how == "flip" and raw:
        i = where % len(raw)
        path.write_bytes(raw[:i] + bytes([raw[i] ^ byte]) + raw[i + 1 :])
    elif how == "truncate":
        path.write_bytes(raw[: where % (len(raw) + 1)])
    elif how == "gz-of-junk":  # a valid compressed stream around a damaged archive
        comp = [gzip.compress, bz2.compress, lzma.compress][where % 3]
        path.write_bytes(comp(raw[: where % (len(raw) + 1)] + bytes([byte]) * 600))




def _plain(target: Path) -> bool:
    """What was extracted holds plain files (one link each, no set-id bits) and folders only."""
    for dirpath, dirnames, filenames in os.walk(target):
        for n in dirnames + filenames:
            st_ = os.lstat(Path(dirpath) / n)
            if stat.S_ISDIR(st_.st_mode):
                continue
            if not stat.S_ISREG(st_.st_mode) or st_.st_nlink != 1:
                return False
            if st_.st_mode & (stat.S_ISUID | stat.S_ISGID):
                return False
    return (target / COMPLETE_MARKER).is_file()


def _one(root: Path, case) -> str:
    """Build, extract and check one case; the outcome's name."""
    kind, members, how, where, byte = case
    base = Path(tempfile.mkdtemp(dir=root))
    try:
        box = base / "box"
        (box / "a" / "b").mkdir(parents=True)
        for p in (box / "victim.txt", box / "a" / "victim.txt", box / "a" / "b" / "victim.txt"):
            p.write_text("sentinel")
        target = box / "a" / "b" / "t"
        fill = {BOX: str(box), VICTIM: str(box / "a" / "victim.txt")}

        def real(s: str) -> str:
            for k, v in fill.items():
                s = s.replace(k, v)
            return s

        members = [(real(n), t, real(ln), size, perm) for n, t, ln, size, perm in members]
        archive = base / f"archive.{kind}"
        try:
            (_zip if kind.startswith("zip") else _tar)(archive, kind, members)
        except (ValueError, IndexError, UnicodeError, OverflowError, tarfile.TarError):
            return "unbuildable"  # the writer itself refuses these members
        _damage(archive, how, where, byte)
        before = tree_snapshot(box, target)
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
        try:
            safe_extract(archive, target)
            outcome = "extracted"
        except UsageError:
            outcome = "clean error"
        except FuzzHang:
            outcome = "hang"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if tree_snapshot(box, target) != before:
            return "write outside"
        left = sorted(os.listdir(target.parent))
        if left != (["t", "victim.txt"] if outcome == "extracted" else ["victim.txt"]):
            return "write outside"  # a leftover temporary folder, or a target on failure
        if outcome == "extracted" and not _plain(target):
            return "not plain"  # a link, device or set-id file came through
        if sorted(os.listdir(base)) != [archive.name, "box"]:
            return "write outside"
        return outcome
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(tmp_path_factory, n: int) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    return run_fuzz("safe_extract", CASE, lambda case: _one(root, case), n, success="extracted",
                    failures=("hang", "write outside", "not plain"), deadline_ms=DEADLINE_MS,
                    min_cases=0.9)  # fmt: skip


def test_safe_extract_fuzz(tmp_path_factory):
    _run(tmp_path_factory, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_safe_extract_fuzz_long(tmp_path_factory):
    _run(tmp_path_factory, SLOW_EXAMPLES)
