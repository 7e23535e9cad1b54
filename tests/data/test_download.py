"""Downloads (issue 3, acceptance 2) against a local HTTP server on 127.0.0.1: a good archive is
fetched, verified and extracted; a corrupted or truncated one fails with exit 2 and leaves
nothing a later run would take as complete; archives with escaping members are refused."""

from __future__ import annotations

import http.server
import threading
import time
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
    ds = open_dataset("cifar10", tmp_path / "dd", "test", quiet=True)  # --data-dir: downloads there
    np.testing.assert_array_equal(ds.labels, exp["test"][1])
    assert (tmp_path / "dd" / "cifar10" / COMPLETE_MARKER).is_file()


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
    data = tmp_path / "data"
    (data / "cifar10" / "mine").mkdir(parents=True)
    (data / "cifar10" / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(UsageError, match="move or rename it") as ei:
        open_dataset("cifar10", data, "test", quiet=True)
    assert str(data / "cifar10") in str(ei.value)
    assert server.requests == []  # refused before downloading
    with pytest.raises(UsageError, match="move or rename it"):
        safe_extract(tar, data / "cifar10")
    assert (data / "cifar10" / "mine" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in data.iterdir()) == ["cifar10"]
    # once moved away, the archive is fetched and extracted
    (data / "cifar10").rename(tmp_path / "moved")
    assert len(open_dataset("cifar10", data, "test", quiet=True)) == 5
    assert (data / "cifar10" / COMPLETE_MARKER).is_file()


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
