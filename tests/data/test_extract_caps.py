"""`safe_extract` is bounded (issue 22): a 2 KB sparse tar became a 300 MB file and a 300 KB zip
300 MB. The members' declared sizes are checked against the caps (per file, in all, per archive
byte, members) before anything is written; sparse members are refused. The default run uses
small caps (monkeypatched) so each case takes milliseconds; ``-m slow`` runs the issue's archives
at the real caps in a fresh interpreter under an address-space cap."""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peak_rss import SOURCE as PEAK_RSS

from puregen_fast.data import download
from puregen_fast.data.download import COMPLETE_MARKER, safe_extract
from puregen_fast.errors import UsageError

KiB, MiB = 1 << 10, 1 << 20


def _tar(path: Path, sizes: list[int], mode: str = "w:gz", fill: bytes = b"\0") -> Path:
    with tarfile.open(path, mode) as tf:
        for i, n in enumerate(sizes):
            ti = tarfile.TarInfo(f"d/f{i}")
            ti.size = n
            tf.addfile(ti, io.BytesIO(fill * n))
    return path


def _zip(path: Path, sizes: list[int], fill: bytes = b"\0") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, n in enumerate(sizes):
            zf.writestr(f"d/f{i}", fill * n)
    return path


def _sparse_tar(path: Path, realsize: int) -> Path:
    """An old-GNU sparse member of ``realsize`` bytes stored in 512: a 2 KiB archive."""
    ti = tarfile.TarInfo("big.bin")
    ti.type = tarfile.GNUTYPE_SPARSE
    ti.size = 512
    hdr = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))
    hdr[386:398] = b"%011o\0" % (realsize - 512)
    hdr[398:410] = b"%011o\0" % 512
    hdr[483:495] = b"%011o\0" % realsize
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    path.write_bytes(bytes(hdr) + b"x" * 512 + b"\0" * 1024)
    return path


def _nothing_written(target: Path) -> None:
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if ".extract-" in p.name] == []


@pytest.fixture
def small_caps(monkeypatch):
    """Caps of KiB instead of MiB (raising=False: the test must also run, and fail, where the
    caps do not exist)."""
    caps = {"MAX_MEMBER_BYTES": 8 * KiB, "MAX_EXTRACT_BYTES": 20 * KiB, "MAX_MEMBERS": 12,
            "MAX_EXPANSION": 4}  # fmt: skip
    for k, v in caps.items():
        monkeypatch.setattr(download, k, v, raising=False)
    return caps


def test_a_sparse_member_is_refused_before_anything_is_written(tmp_path):
    arc = _sparse_tar(tmp_path / "a.tar", 300 * MiB)
    assert arc.stat().st_size <= 2 * KiB
    with pytest.raises(UsageError, match="'big.bin': it is a sparse file"):
        safe_extract(arc, tmp_path / "t")
    _nothing_written(tmp_path / "t")


@pytest.mark.parametrize("make", [_tar, _zip])
def test_one_member_over_the_cap(tmp_path, small_caps, make):
    arc = make(tmp_path / "a", [1, 8 * KiB + 1], fill=b"\x17")
    with pytest.raises(UsageError, match=rf"'d/f1': it declares {8 * KiB + 1} bytes, more than "
                       rf"the {8 * KiB} a file may hold \(MAX_MEMBER_BYTES"):  # fmt: skip
        safe_extract(arc, tmp_path / "t")
    _nothing_written(tmp_path / "t")


@pytest.mark.parametrize("make", [_tar, _zip])
def test_a_small_archive_that_inflates_far_beyond_its_size(tmp_path, small_caps, make):
    """The 300 KB zip of the issue in small: zeros compress ~1000:1, so members under the per
    file cap add up to more than MAX_EXPANSION times the archive (and the 8 KiB floor)."""
    arc = make(tmp_path / "a", [6 * KiB] * 3)
    assert arc.stat().st_size < 1 * KiB
    with pytest.raises(UsageError, match=r"declare more than 8192 bytes in all .*MAX_EXPANSION"):
        safe_extract(arc, tmp_path / "t")
    _nothing_written(tmp_path / "t")


def _incompressible(n: int) -> bytes:
    import random

    return random.Random(n).randbytes(n)


@given(
    sizes=st.lists(st.integers(0, 10 * KiB), max_size=14),
    fmt=st.sampled_from(["tar", "tar.gz", "zip"]),
)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
def test_extraction_succeeds_exactly_within_the_caps(tmp_path_factory, small_caps, sizes, fmt):
    """Property: with incompressible members (so the expansion rule is not what decides), an
    archive extracts whole exactly when every member, their count and their sum are within the
    caps; otherwise it is a UsageError naming the cap and nothing is written."""
    root = tmp_path_factory.mktemp("caps")
    arc = root / f"a.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(arc, "w", zipfile.ZIP_STORED) as zf:
            for i, n in enumerate(sizes):
                zf.writestr(f"d/f{i}", _incompressible(n))
    else:
        with tarfile.open(arc, "w:gz" if fmt == "tar.gz" else "w") as tf:
            for i, n in enumerate(sizes):
                ti = tarfile.TarInfo(f"d/f{i}")
                ti.size = n
                tf.addfile(ti, io.BytesIO(_incompressible(n)))
    total_cap = min(20 * KiB, max(8 * KiB, 4 * arc.stat().st_size))
    fits = (all(n <= 8 * KiB for n in sizes) and sum(sizes) <= total_cap
            and len(sizes) <= 12)  # fmt: skip
    target = root / "t"
    if fits:
        safe_extract(arc, target)
        got = sorted(p.stat().st_size for p in target.rglob("*") if p.is_file()
                     and p.name != COMPLETE_MARKER)  # fmt: skip
        assert got == sorted(sizes)
    else:
        with pytest.raises(UsageError, match="MAX_MEMBER_BYTES|MAX_EXTRACT_BYTES|MAX_MEMBERS"):
            safe_extract(arc, target)
        _nothing_written(target)


def test_too_many_members(tmp_path, small_caps):
    arc = _tar(tmp_path / "a.tar.gz", [0] * 13)
    with pytest.raises(UsageError, match="more than 12 members"):
        safe_extract(arc, tmp_path / "t")
    _nothing_written(tmp_path / "t")


_RUN = PEAK_RSS + """
import json, resource, sys
from pathlib import Path
from puregen_fast.data.download import safe_extract
from puregen_fast.errors import UsageError
res = []
for arc in sys.argv[1:]:
    target = Path(arc + ".out")
    try:
        safe_extract(Path(arc), target)
        res.append({"extracted": sum(p.stat().st_size for p in target.rglob("*") if p.is_file())})
    except UsageError as e:
        res.append({"usage": str(e)})
    except BaseException as e:
        res.append({"other": f"{type(e).__name__}: {e}"[:300]})
print(json.dumps({"results": res, "peak_mb": peak_rss_mib()}))
"""


@pytest.mark.slow
def test_the_issue_archives_at_the_real_caps(tmp_path):
    """The issue's archives: a 2 KB sparse tar of 300 MB and a 300 KB zip of 300 MB (five 60 MB
    members, each under the 64 MiB per-file cap) in a fresh interpreter under a 2 GiB
    address-space cap: both refused, nothing written, little memory."""
    sparse = _sparse_tar(tmp_path / "sparse.tar", 300 * MiB)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zeros = bytes(60 * MiB)
        for i in range(5):
            zf.writestr(f"d/f{i}", zeros)
    assert bomb.stat().st_size < 400 * KiB

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run([sys.executable, "-c", _RUN, str(sparse), str(bomb)], capture_output=True,
                       text=True, timeout=120, preexec_fn=cap)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (a, b) = out["results"]
    assert "sparse file" in a.get("usage", ""), a
    assert "MAX_EXPANSION" in b.get("usage", ""), b
    print(f"\nthe issue's archives at the real caps: refused, peak RSS {out['peak_mb']:.0f} MB")
    assert out["peak_mb"] < 1024
    for arc in (sparse, bomb):
        _nothing_written(Path(f"{arc}.out"))


@pytest.mark.parametrize("make", [_tar, _zip])
def test_a_huge_member_name_is_refused_with_a_short_message(tmp_path, make):
    arc = tmp_path / "a"
    if make is _tar:
        with tarfile.open(arc, "w", format=tarfile.GNU_FORMAT) as tf:
            tf.addfile(tarfile.TarInfo("d/" + "n" * 60_000))
    else:
        with zipfile.ZipFile(arc, "w") as zf:
            zf.writestr("d/" + "n" * 60_000, b"")
    with pytest.raises(UsageError, match="name is longer than 4096 characters") as e:
        safe_extract(arc, tmp_path / "t")
    assert len(str(e.value)) < 1000
    _nothing_written(tmp_path / "t")
