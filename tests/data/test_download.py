"""Downloads (issue 3, acceptance 2) against a local HTTP server on 127.0.0.1: a good archive is
fetched, verified and extracted; a corrupted or truncated one fails with exit 2 and leaves
nothing a later run would take as complete; archives with escaping members are refused.

Hostile archives (issue 11) are built here with tarfile/zipfile: links of any kind (the
CVE-2025-4517 symlink chain included), device files, FIFOs, absolute and ``..`` paths, file/folder
clashes. Each is refused with exit 2 before anything is written, and a sentinel tree around the
target is compared byte for byte before and after. Only the cache is a download target: a given
``--data-dir`` without the data set is exit 2 and is not created."""

from __future__ import annotations

import errno
import http.server
import io
import os
import stat
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import (
    CIFAR_CLASSES,
    make_cifar10_tarball,
    make_cinic10_tarball,
    make_evil_tar,
    make_evil_zip,
    make_tinyimagenet_zip,
)
from helpers import tree_snapshot

from puregen_fast.cli.main import main
from puregen_fast.data import download
from puregen_fast.data.datasets import open_dataset
from puregen_fast.data.download import COMPLETE_MARKER, safe_extract
from puregen_fast.data.io import file_digest
from puregen_fast.errors import UsageError


class _Server:
    """http.server in a thread serving ``files`` (path -> bytes). ``truncate`` paths announce
    their full length but send only half and close."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        self.barrier: threading.Barrier | None = None  # hold requests until all have arrived
        self.pause = 0.0  # seconds between the two halves of a body
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                if outer.barrier is not None:
                    outer.barrier.wait(timeout=20)
                self.end_headers()
                if outer.pause:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    time.sleep(outer.pause)
                    self.wfile.write(data[len(data) // 2 :])
                elif self.path in outer.truncate:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.wfile.write(data)

            def log_message(self, *a):  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    s = _Server()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "cache"))
    for name in ("CIFAR10", "CINIC10", "TINYIMAGENET"):
        monkeypatch.delenv(f"PUREGEN_FAST_URL_{name}", raising=False)


def _point(monkeypatch, server, name: str, archive: Path, *, corrupt=False, truncate=False):
    """Serve ``archive`` for data set ``name`` and pin its md5 to the good file's."""
    data = archive.read_bytes()
    md5 = file_digest(archive, "md5")
    if corrupt:
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    path = f"/{name}/{archive.name}"
    server.files[path] = data
    if truncate:
        server.truncate.add(path)
    monkeypatch.setattr(download.ARCHIVES[name], "url", server.url(path))
    monkeypatch.setattr(download.ARCHIVES[name], "digest", md5)
    monkeypatch.setattr(download.ARCHIVES[name], "algo", "md5")


def _nothing_complete(root: Path, name: str, filename: str) -> None:
    assert not (root / name / COMPLETE_MARKER).exists()
    assert not (root / name).exists()
    assert not (root / filename).exists()
    if root.exists():
        assert not [p for p in root.iterdir() if ".extract-" in p.name or ".part" in p.name]


def test_good_archive_fetched_verified_extracted(tmp_path, server, monkeypatch):
    tar, exp = make_cifar10_tarball(tmp_path)
    _point(monkeypatch, server, "cifar10", tar)
    ds = open_dataset("cifar10", None, "test", quiet=True)  # None: the cache folder
    np.testing.assert_array_equal(ds.images, exp["test"][0])
    np.testing.assert_array_equal(ds.labels, exp["test"][1])
    assert ds.class_names == CIFAR_CLASSES
    cache = tmp_path / "cache"
    assert (cache / "cifar10" / COMPLETE_MARKER).is_file()
    assert (cache / "cifar-10-python.tar.gz").is_file()
    # a second run uses the extracted copy: no new request
    n = len(server.requests)
    open_dataset("cifar10", None, "train", quiet=True)
    assert len(server.requests) == n == 1


def test_url_override_by_environment(tmp_path, server, monkeypatch):
    tar, exp = make_cifar10_tarball(tmp_path)
    _point(monkeypatch, server, "cifar10", tar)
    monkeypatch.setattr(download.ARCHIVES["cifar10"], "url", "http://127.0.0.1:9/unreachable")
    monkeypatch.setenv("PUREGEN_FAST_URL_CIFAR10", server.url("/cifar10/cifar-10-python.tar.gz"))
    ds = open_dataset("cifar10", None, "test", quiet=True)
    np.testing.assert_array_equal(ds.labels, exp["test"][1])
    assert (tmp_path / "cache" / "cifar10" / COMPLETE_MARKER).is_file()


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_bad_download_exit_2_and_nothing_complete(tmp_path, server, monkeypatch, capsys, fault):
    tar, _ = make_cifar10_tarball(tmp_path)
    _point(monkeypatch, server, "cifar10", tar, **{fault: True})
    out = tmp_path / "out"
    argv = ["purify", "--dataset", "cifar10", "--method", "none", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err
    _nothing_complete(tmp_path / "cache", "cifar10", "cifar-10-python.tar.gz")
    assert not (out / "manifest.json").exists()
    # the server is fixed: a later run fetches again and succeeds
    server.truncate.clear()
    _point(monkeypatch, server, "cifar10", tar)
    assert main(argv + ["--split", "test"]) == 0
    assert (out / "manifest.json").is_file()


def test_cinic_and_tiny_archives(tmp_path, server, monkeypatch):
    tar, exp = make_cinic10_tarball(tmp_path, n_cifar=1, n_imagenet=1)
    _point(monkeypatch, server, "cinic10", tar)
    ds = open_dataset("cinic10-imagenet", None, "valid", quiet=True)
    np.testing.assert_array_equal(np.asarray(ds.images), exp["valid-imagenet"][0])
    z, exp_t = make_tinyimagenet_zip(tmp_path)
    _point(monkeypatch, server, "tinyimagenet", z)
    ds = open_dataset("tinyimagenet", None, "val", quiet=True)
    np.testing.assert_array_equal(np.asarray(ds.images), exp_t["val"][0])
    np.testing.assert_array_equal(ds.labels, exp_t["val"][1])


def test_offline_names_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(download.ARCHIVES["cifar10"], "url", "http://127.0.0.1:9/cifar.tgz")
    with pytest.raises(UsageError) as ei:
        open_dataset("cifar10", None, "train", quiet=True)
    msg = str(ei.value)
    assert "http://127.0.0.1:9/cifar.tgz" in msg
    assert str(tmp_path / "cache" / "cifar-10-python.tar.gz") in msg
    assert "c58f30108f718f92721af3b95e74349a" in msg
    _nothing_complete(tmp_path / "cache", "cifar10", "cifar-10-python.tar.gz")


def test_hand_placed_bad_archive_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="md5"):
        open_dataset("cifar10", data, "train", download=False)
    assert not (data / "cifar10").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_escaping_tar_member_is_refused(tmp_path, kind):
    evil = make_evil_tar(tmp_path / "evil.tar.gz", kind)
    target = tmp_path / "x" / "cifar10"
    with pytest.raises(UsageError, match="refusing"):
        safe_extract(evil, target)
    assert not target.exists()
    assert not (tmp_path / "x" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/puregen-evil-absolute.txt").exists()
    assert not [p for p in (tmp_path / "x").iterdir()]  # no temporary folder left


def test_escaping_archive_from_server_fails_with_exit_2(tmp_path, server, monkeypatch, capsys):
    evil = make_evil_tar(tmp_path / "cifar-10-python.tar.gz", "dotdot")
    _point(monkeypatch, server, "cifar10", evil)
    argv = ["purify", "--dataset", "cifar10", "--method", "none", "--out", str(tmp_path / "o")]
    assert main(argv + ["--quiet"]) == 2
    assert "../evil.txt" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "cifar10").exists()
    assert not (tmp_path / "cache" / "evil.txt").exists()


def test_escaping_zip_member_is_refused(tmp_path):
    evil = make_evil_zip(tmp_path / "evil.zip")
    with pytest.raises(UsageError, match="escapes"):
        safe_extract(evil, tmp_path / "x" / "t")
    assert not (tmp_path / "x" / "evil.txt").exists()
    assert not (tmp_path / "x" / "t").exists()


def test_folder_without_marker_is_never_deleted(tmp_path, server, monkeypatch):
    # a folder named like the archive key that puregen-fast did not make: refused, kept
    tar, _ = make_cifar10_tarball(tmp_path)
    _point(monkeypatch, server, "cifar10", tar)
    cache = tmp_path / "cache"
    (cache / "cifar10" / "mine").mkdir(parents=True)
    (cache / "cifar10" / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(UsageError, match="move or rename it") as ei:
        open_dataset("cifar10", None, "test", quiet=True)
    assert str(cache / "cifar10") in str(ei.value)
    assert server.requests == []  # refused before downloading
    with pytest.raises(UsageError, match="move or rename it"):
        safe_extract(tar, cache / "cifar10")
    assert (cache / "cifar10" / "mine" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in cache.iterdir()) == ["cifar10"]
    # once moved away, the archive is fetched and extracted
    (cache / "cifar10").rename(tmp_path / "moved")
    assert len(open_dataset("cifar10", None, "test", quiet=True)) == 5
    assert (cache / "cifar10" / COMPLETE_MARKER).is_file()


def test_concurrent_fetch_and_extract_of_one_archive(tmp_path, server, monkeypatch):
    # two runs (threads here) download and extract the same archive at the same time: both
    # succeed, each with its own partial file and extraction folder, and nothing is left over
    tar, exp = make_cifar10_tarball(tmp_path)
    _point(monkeypatch, server, "cifar10", tar)
    server.barrier = threading.Barrier(2)
    server.pause = 0.3
    results: list = [None, None]

    def work(i: int) -> None:
        try:
            results[i] = download.ensure_extracted("cifar10", None, quiet=True)
        except BaseException as e:  # noqa: BLE001 (reported below)
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    cache = tmp_path / "cache"
    assert results == [cache / "cifar10"] * 2, results
    assert len(server.requests) == 2
    download.verify_file(cache / "cifar-10-python.tar.gz", download.ARCHIVES["cifar10"])
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-python.tar.gz", "cifar10"]
    ds = open_dataset("cifar10", None, "test", quiet=True)
    np.testing.assert_array_equal(ds.images, exp["test"][0])
    # the loser of the rename race uses the winner's copy
    assert safe_extract(tar, cache / "cifar10") == cache / "cifar10"
    real_replace = download.os.replace

    def late(src, dst):  # another process renames its copy into place just before us
        if Path(src).name.startswith(".cifar10b.extract-"):
            real_replace(cache / "cifar10", dst)
        return real_replace(src, dst)

    monkeypatch.setattr(download.os, "replace", late)
    assert safe_extract(tar, cache / "cifar10b") == cache / "cifar10b"
    assert (cache / "cifar10b" / COMPLETE_MARKER).is_file()
    assert not [p for p in cache.iterdir() if ".extract-" in p.name]


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("PUREGEN_FAST_CACHE", str(tmp_path / "a"))
    assert download.cache_root() == tmp_path / "a"
    assert download.resolve_data_dir(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("PUREGEN_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_root() == tmp_path / "xdg" / "puregen-fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert download.cache_root() == Path.home() / ".cache" / "puregen-fast"


def test_published_checksums_are_pinned():
    assert download.ARCHIVES["cifar10"].digest == "c58f30108f718f92721af3b95e74349a"
    assert download.ARCHIVES["tinyimagenet"].digest == "90528d7ca1a48142e341f4ef8d21d0de"
    assert download.ARCHIVES["cinic10"].digest is not None
    assert download.ARCHIVES["cifar10"].url.startswith("https://www.cs.toronto.edu/")
    assert (
        download.ARCHIVES["tinyimagenet"].url == "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    )


# ----------------------------------------------------------------------------- hostile archives




def _box(tmp_path: Path) -> tuple[Path, Path]:
    """A sentinel tree ``box/`` with victims next to and two levels above the target
    ``box/a/b/t``; returns (box, target)."""
    box = tmp_path / "box"
    (box / "a" / "b").mkdir(parents=True)
    for p in (box / "victim.txt", box / "a" / "victim.txt", box / "a" / "b" / "victim.txt"):
        p.write_text("sentinel")
    return box, box / "a" / "b" / "t"


def _tar(path: Path, members: list[tuple]) -> Path:
    """A tar.gz of ``(name, kind, arg)``: file (bytes), dir, sym/hard (link target), fifo, chr
    and blk (device numbers)."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, arg in members:
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755 if kind == "dir" else 0o644
            data = None
            if kind == "file":
                data = io.BytesIO(arg)
                ti.size = len(arg)
            else:
                ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                           "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE,
                           "blk": tarfile.BLKTYPE}[kind]  # fmt: skip
                if kind in ("sym", "hard"):
                    ti.linkname = arg
                if kind in ("chr", "blk"):
                    ti.devmajor, ti.devminor = arg
            tf.addfile(ti, data)
    return path


def _zip(path: Path, members: list[tuple]) -> Path:
    """A zip of ``(name, file mode, data)`` with the Unix mode in the external attributes."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, mode, data in members:
            zi = zipfile.ZipInfo(name)
            zi.create_system = 3
            zi.external_attr = mode << 16
            zf.writestr(zi, data)
    return path


def _cve_2025_4517(dest: Path, up: int) -> list[tuple]:
    """The symlink chain of CVE-2025-4517 (as in CPython's own regression test): links whose
    expansion overflows PATH_MAX, so a non-strict ``os.path.realpath`` stops resolving and
    link checks (the tarfile ``data`` filter of Python 3.11.7 among them) take ``escape`` for a
    folder inside ``dest``; the kernel resolves it ``up`` levels above ``dest``."""
    steps = "abcdefghijklmnop"
    path_max = os.pathconf(dest.parent, "PC_PATH_MAX")
    comp = "d" * ((path_max - len(str(dest)) - 1) // (len(steps) + 1))
    members: list[tuple] = []
    prefix = ""
    for ch in steps:
        members += [(prefix + comp, "dir", None), (prefix + ch, "sym", comp)]
        prefix += comp + "/"
    longlink = "/".join(steps) + "/" + "l" * 254
    members.append((longlink, "sym", "/".join([".."] * len(steps))))
    members.append(("escape", "sym", longlink + "/.." * up))
    return members


def _hostile(kind: str, box: Path, target: Path) -> tuple[Path, str]:
    """Archive ``kind`` written next to the box (not inside it), and the member named in the
    refusal. Every escaping member aims at a victim file in the box."""
    tmp = box.parent
    good = ("t/readme.txt", "file", b"fine")
    victim = str(box / "a" / "victim.txt")
    pwned = b"pwned"
    # the extraction folder is a sibling of the target: .t.extract-XXXXXXXX (8 random letters)
    dest = target.parent / f".{target.name}.extract-xxxxxxxx"
    tars = {
        # the chain that plain text checks pass: l = ".", l2 = "l/.." is really the target's
        # parent, l3 = "l2/.." two levels above; a file is then written through l3
        "symlink-chain": (
            [
                good,
                ("l", "sym", "."),
                ("l2", "sym", "l/.."),
                ("l3", "sym", "l2/.."),
                ("l3/victim.txt", "file", pwned),
            ],
            "l",
        ),
        "cve-2025-4517": (
            [good, *_cve_2025_4517(dest, 2), ("escape/victim.txt", "file", pwned)],
            "d",
        ),
        "hardlink-absolute": ([good, ("h", "hard", victim), ("h", "file", pwned)], "h"),
        "hardlink-dotdot": ([good, ("h", "hard", "../../victim.txt"), ("h", "file", pwned)], "h"),
        "hardlink-inside": ([good, ("h", "hard", "t/readme.txt")], "h"),
        "symlink-inside": ([good, ("s", "sym", "t")], "s"),
        "absolute": ([good, (victim, "file", pwned)], victim),
        "dotdot": ([good, ("../../victim.txt", "file", pwned)], "../../victim.txt"),
        "dotdot-inside": ([good, ("t/../x", "file", pwned)], "t/../x"),
        "backslash": ([good, ("..\\..\\victim.txt", "file", pwned)], "..\\\\..\\\\victim.txt"),
        "fifo": ([good, ("p", "fifo", None)], "p"),
        "chardev": ([good, ("c", "chr", (1, 3))], "c"),
        "blockdev": ([good, ("k", "blk", (7, 0))], "k"),
        "file-over-folder": ([("d", "dir", None), ("d/x", "file", b"1"), ("d", "file", b"2")], "d"),
        "file-as-folder": ([("f", "file", b"1"), ("f/x", "file", b"2")], "f/x"),
        "marker-name": ([good, (COMPLETE_MARKER, "dir", None)], COMPLETE_MARKER),
        # found by the fuzz test: a folder of the marker's name blocked the marker's write
        "marker-folder": ([good, (f"./{COMPLETE_MARKER}/a", "file", b"1")], COMPLETE_MARKER),
    }
    zips = {
        "zip-dotdot": (
            [("t/a.txt", 0o100644, b"a"), ("../../victim.txt", 0o100644, pwned)],
            "../../victim.txt",
        ),
        "zip-absolute": ([(victim, 0o100644, pwned)], victim.lstrip("/")),
        "zip-symlink": ([("s", stat.S_IFLNK | 0o777, b"../../victim.txt")], "s"),
        "zip-fifo": ([("p", stat.S_IFIFO | 0o644, b"")], "p"),
        "zip-chardev": ([("c", stat.S_IFCHR | 0o644, b"")], "c"),
        "zip-file-over-folder": ([("d/", stat.S_IFDIR | 0o755, b""), ("d", 0o100644, b"x")], "d"),
        "zip-dotdot-inside": ([("t/../x", 0o100644, b"x")], "t/../x"),
    }
    if kind in tars:
        members, member = tars[kind]
        return _tar(tmp / f"{kind}.tar.gz", members), member
    members, member = zips[kind]
    return _zip(tmp / f"{kind}.zip", members), member


HOSTILE = [
    "symlink-chain", "cve-2025-4517", "hardlink-absolute", "hardlink-dotdot", "hardlink-inside",
    "symlink-inside", "absolute", "dotdot", "dotdot-inside", "backslash", "fifo", "chardev",
    "blockdev", "file-over-folder", "file-as-folder", "marker-name", "marker-folder",
    "zip-dotdot", "zip-absolute", "zip-symlink", "zip-fifo", "zip-chardev",
    "zip-file-over-folder", "zip-dotdot-inside",
]  # fmt: skip


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_archive_is_refused_and_nothing_outside_changes(tmp_path, kind):
    box, target = _box(tmp_path)
    archive, member = _hostile(kind, box, target)
    before = tree_snapshot(box, target)
    with pytest.raises(UsageError) as ei:
        safe_extract(archive, target)
    msg = str(ei.value)
    assert str(archive) in msg and "refusing" in msg and member in msg, msg
    if "link" in kind or "cve" in kind:
        assert "links are never extracted" in msg
    assert not target.exists()
    assert sorted(os.listdir(target.parent)) == ["victim.txt"]  # no temporary folder left
    assert tree_snapshot(box, target) == before  # the sentinels are untouched
    assert (box / "a" / "victim.txt").read_text() == "sentinel"


@pytest.mark.parametrize("kind", ["cve-2025-4517", "symlink-chain", "hardlink-absolute", "fifo",
                                  "file-over-folder", "zip-symlink"])  # fmt: skip
def test_hostile_archive_exits_2_from_the_command_line(tmp_path, monkeypatch, capsys, kind):
    # placed by hand as the CIFAR-10 archive, with its checksum pinned: the checksum matches,
    # extraction refuses, the command exits 2 naming the archive and the member
    data = tmp_path / "data"
    data.mkdir()
    box, target = _box(tmp_path)
    archive, member = _hostile(kind, box, data / "cifar10")
    placed = data / "cifar-10-python.tar.gz"
    placed.write_bytes(archive.read_bytes())
    monkeypatch.setattr(download.ARCHIVES["cifar10"], "digest", file_digest(placed, "md5"))
    monkeypatch.setattr(download.ARCHIVES["cifar10"], "algo", "md5")
    before = tree_snapshot(tmp_path, data / "cifar10")
    argv = ["purify", "--dataset", "cifar10", "--data-dir", str(data), "--method", "none",
            "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(placed) in err and member in err, err
    assert not (data / "cifar10").exists()
    assert tree_snapshot(tmp_path, data / "cifar10") == before


def test_good_archives_still_extract(tmp_path):
    # "./" entries, folders listed before and after their files, an empty folder, an
    # executable bit: all fine; files come out as plain files with the archive's bytes
    members = [
        ("./", "dir", None),
        ("./d/", "dir", None),
        ("./d/x.bin", "file", b"\0" * 3000),
        ("./d/e/", "dir", None),
        ("./y.txt", "file", b"y"),
        ("d", "dir", None),
    ]
    out = safe_extract(_tar(tmp_path / "good.tar.gz", members), tmp_path / "t")
    assert (out / "d" / "x.bin").read_bytes() == b"\0" * 3000
    assert (out / "y.txt").read_bytes() == b"y" and (out / "d" / "e").is_dir()
    assert sorted(p.name for p in out.iterdir()) == [COMPLETE_MARKER, "d", "y.txt"]
    z = _zip(
        tmp_path / "good.zip",
        [("top/", stat.S_IFDIR | 0o755, b""), ("top/a.txt", 0o100644, b"a"), ("b.txt", 0, b"b")],
    )
    out = safe_extract(z, tmp_path / "z")
    assert (out / "top" / "a.txt").read_bytes() == b"a" and (out / "b.txt").read_bytes() == b"b"
    for p in [*(tmp_path / "t").rglob("*"), *(tmp_path / "z").rglob("*")]:
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID)


# ----------------------------------------------------------------------------- download targets


def test_mistyped_data_dir_is_exit_2_and_not_created(tmp_path, server, monkeypatch, capsys):
    # only the cache is a download target: a --data-dir holding no data set is never created or
    # downloaded into, and the message names it and says what to place where
    tar, _ = make_cifar10_tarball(tmp_path)
    _point(monkeypatch, server, "cifar10", tar)
    typo = tmp_path / "dtaa"
    argv = ["purify", "--dataset", "cifar10", "--data-dir", str(typo), "--method", "none",
            "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(typo) in err and "no CIFAR-10 data set" in err, err
    assert "cifar-10-batches-py" in err and str(typo / "cifar-10-python.tar.gz") in err
    assert "--data-dir" in err and str(tmp_path / "cache") in err
    assert not typo.exists()
    assert server.requests == []
    # an existing folder without the data set: the same, and it stays empty
    typo.mkdir()
    with pytest.raises(UsageError, match="no CIFAR-10 data set found"):
        open_dataset("cifar10", typo, "test", quiet=True)
    assert list(typo.iterdir()) == [] and server.requests == []


def test_download_into_a_data_dir_only_when_asked(tmp_path, server, monkeypatch):
    tar, _ = make_cifar10_tarball(tmp_path)
    _point(monkeypatch, server, "cifar10", tar)
    dd = tmp_path / "dd"
    with pytest.raises(UsageError, match="no CIFAR-10 data set found"):
        download.ensure_extracted("cifar10", dd, quiet=True)
    assert not dd.exists()
    got = download.ensure_extracted("cifar10", dd, download_into_data_dir=True, quiet=True)
    assert got == dd / "cifar10" and (got / COMPLETE_MARKER).is_file()
    assert len(server.requests) == 1


def test_offline_message_lists_every_missing_file(tmp_path, monkeypatch):
    for name in ("cifar10", "cinic10", "tinyimagenet"):
        monkeypatch.setattr(download.ARCHIVES[name], "url", f"http://127.0.0.1:9/{name}")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-imagenet-200.zip").write_bytes(b"placed by hand")  # present: not listed
    msg = download.offline_message(["cifar10", "cinic10", "tinyimagenet"])
    for name, arc in download.ARCHIVES.items():
        listed = str(cache / arc.filename) in msg
        assert listed == (name != "tinyimagenet"), msg
        assert (f"http://127.0.0.1:9/{name}" in msg) == listed
    assert "c58f30108f718f92721af3b95e74349a" in msg
    # offline: one message, each missing file once with where it goes
    with pytest.raises(UsageError) as ei:
        download.ensure_extracted("cifar10", None, quiet=True)
    msg = str(ei.value)
    assert msg.count(str(cache / "cifar-10-python.tar.gz")) == 1, msg
    assert "cannot download" in msg and "Connection refused" in msg
    assert "http://127.0.0.1:9/cifar10 (md5 c58f30108f718f92721af3b95e74349a)" in msg


def test_full_disk_blames_the_disk_not_the_archive(tmp_path, monkeypatch):
    tar = _tar(tmp_path / "ok.tar.gz", [("f", "file", b"x")])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_write", full)
    with pytest.raises(UsageError, match="No space left") as ei:
        safe_extract(tar, tmp_path / "t")
    assert "delete it" not in str(ei.value) and str(tmp_path) in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.tar.gz"]
