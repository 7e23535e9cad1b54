"""The one atomic-write helper: a file appears whole or not at all, and a failed write leaves
neither a temporary file nor a changed old file."""

from __future__ import annotations

import hashlib
import os

import pytest

from puregen_fast.data import io
from puregen_fast.data.io import atomic_path, atomic_write, atomic_write_json, file_digest, tmp_name


def test_tmp_name_is_hidden_beside_the_file_and_keeps_the_extension(tmp_path):
    t = tmp_name(tmp_path / "images-00000.npy")
    assert t == tmp_path / f".images-00000.npy.tmp-{os.getpid()}.npy"
    assert tmp_name(tmp_path / "README") == tmp_path / f".README.tmp-{os.getpid()}"


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    p = tmp_path / "f.json"
    atomic_write(p, "old")
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert [q.name for q in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    p = tmp_path / "shard.npy"
    p.write_bytes(b"old")
    seen = []
    with pytest.raises(type(error)):
        with atomic_path(p) as tmp:
            seen.append(tmp)
            tmp.write_bytes(b"half of the new")
            raise error
    assert seen == [tmp_name(p)]
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["shard.npy"]


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path):
    p = tmp_path / "new.png"
    with pytest.raises(ValueError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("encoder failed")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_removes_the_temporary(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write(p, b"new")
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["f.bin"]


def test_an_explicit_temporary_name_is_used_and_removed_on_failure(tmp_path):
    p = tmp_path / "a.tar.gz"
    part = tmp_path / "a.tar.gz.part-1-ab"
    with atomic_path(p, part) as tmp:
        assert tmp == part
        tmp.write_bytes(b"whole")
    assert p.read_bytes() == b"whole" and not part.exists()
    with pytest.raises(RuntimeError):
        with atomic_path(p, part) as tmp:
            tmp.write_bytes(b"trunc")
            raise RuntimeError("connection reset")
    assert p.read_bytes() == b"whole" and not part.exists()


def test_read_json_and_file_digest(tmp_path):
    p = tmp_path / "x.json"
    assert io.read_json(p) is None  # missing
    p.write_text("{not json")
    assert io.read_json(p) is None
    p.write_text("[1, 2]")
    assert io.read_json(p) is None  # not an object
    atomic_write_json(p, {"k": "v"})
    assert io.read_json(p) == {"k": "v"}
    data = os.urandom(3 << 20)  # several read chunks
    (tmp_path / "b").write_bytes(data)
    assert file_digest(tmp_path / "b") == hashlib.sha256(data).hexdigest()
    assert file_digest(tmp_path / "b", "md5") == hashlib.md5(data).hexdigest()


def test_the_folder_is_flushed_unless_the_caller_does_it(tmp_path, monkeypatch):
    flushed = []
    monkeypatch.setattr(io, "fsync_dir", lambda d: flushed.append(d))
    atomic_write(tmp_path / "a", b"1")
    assert flushed == [tmp_path]
    atomic_write(tmp_path / "b", b"1", sync_dir=False)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "missing" / "c", b"1")
    assert flushed == [tmp_path]


@pytest.mark.parametrize("where", ["tmp", "final"])
def test_a_link_planted_at_the_temporary_or_final_name_is_not_written_through(tmp_path, where):
    """Issue 22: nothing the project writes follows a link. A link at the temporary name (its
    pid is guessable) or at the final name is replaced, the file it points at is unchanged."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    p = tmp_path / "out" / "images-00000.npy"
    p.parent.mkdir()
    (tmp_name(p) if where == "tmp" else p).symlink_to(victim)
    with atomic_path(p) as tmp, open(tmp, "wb") as f:
        f.write(b"new")
    assert victim.read_text() == "keep me"
    assert not p.is_symlink() and p.read_bytes() == b"new"
    assert sorted(q.name for q in p.parent.iterdir()) == [p.name]


def test_reads_refuse_a_fifo_instead_of_waiting_forever(tmp_path):
    """A FIFO where a run record or a shard should be (planted in --out): read_json says
    'unreadable' and file_digest raises OSError at once; before, both waited for a writer (an
    alarm stops the wait here, so the test fails instead of hanging)."""
    import signal

    class Hang(BaseException):
        pass

    def on_alarm(signum, frame):
        raise Hang

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        assert io.read_json(fifo) is None
        with pytest.raises(OSError, match="not a regular file"):
            file_digest(fifo)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
