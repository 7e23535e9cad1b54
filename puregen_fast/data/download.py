"""Fetch, verify and safely extract the data sets' official archives (DESIGN 5).

* Cache directory: ``--data-dir`` if given, else ``$PUREGEN_FAST_CACHE``, else
  ``$XDG_CACHE_HOME/puregen-fast`` (``~/.cache/puregen-fast``).
* Every archive has a published checksum (``ARCHIVES``); the download streams into a file of
  its own (``<file>.part-<pid>-<token>``, so concurrent downloads never share one) and is renamed
  to its final name only after the checksum matched, so a truncated or corrupted download never
  looks like a finished one.
* Extraction refuses members that would land outside the target (``../``, absolute paths, links
  pointing out, device files); it extracts into a temporary sibling directory, writes the marker
  file ``.puregen-complete`` last, then renames the directory into place. A directory without the
  marker is never taken as complete, and never deleted either (it is not ours): extraction
  refuses to run until it is moved. When concurrent runs extract the same archive, the first
  rename wins and the others use its result.
* The URL of each archive can be overridden, for mirrors and tests, by assigning
  ``ARCHIVES[name].url`` or with the environment variable ``PUREGEN_FAST_URL_<NAME>`` (``NAME`` is
  the key upper-cased with ``-`` as ``_``, e.g. ``PUREGEN_FAST_URL_CIFAR10``).
* Offline, or on a failed checksum, a :class:`~puregen_fast.errors.UsageError` (exit 2) says what
  to download and where to put it.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from puregen_fast.data.io import atomic_path, file_digest, fsync_dir
from puregen_fast.errors import UsageError

__all__ = [
    "ARCHIVES",
    "Archive",
    "COMPLETE_MARKER",
    "cache_root",
    "resolve_data_dir",
    "archive_url",
    "fetch",
    "verify_file",
    "safe_extract",
    "ensure_extracted",
]

COMPLETE_MARKER = ".puregen-complete"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass
class Archive:
    """One official archive. ``algo``/``digest`` is the published checksum; ``size`` (bytes) is
    informational (a progress total when the server sends no length)."""

    name: str
    url: str
    filename: str
    algo: str | None
    digest: str | None
    size: int | None
    note: str = ""


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "md5",
        "c58f30108f718f92721af3b95e74349a",  # published on the CIFAR page and in torchvision
        170_498_071,
    ),
    "cinic10": Archive(
        "cinic10",
        "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz",
        "CINIC-10.tar.gz",
        "md5",
        # The Edinburgh DataShare record (doi:10.7488/ds/2448) lists no checksum on the page; this
        # md5 is the one many independent loaders pin for this exact file.
        "6ee4d0c996905fe93221de577967a372",
        687_544_992,
        note="the tarball holds train/, valid/ and test/ at its top level",
    ),
    "tinyimagenet": Archive(
        "tinyimagenet",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "tiny-imagenet-200.zip",
        "md5",
        "90528d7ca1a48142e341f4ef8d21d0de",
        None,
    ),
}


def cache_root() -> Path:
    """The user cache folder: ``$PUREGEN_FAST_CACHE``, else ``$XDG_CACHE_HOME/puregen-fast``,
    else ``~/.cache/puregen-fast``."""
    env = os.environ.get("PUREGEN_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "puregen-fast"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """Where archives are downloaded and extracted: ``--data-dir`` if given, else the cache."""
    return Path(data_dir).expanduser() if data_dir else cache_root()


def archive_url(name: str) -> str:
    """The archive's URL, after the ``PUREGEN_FAST_URL_<NAME>`` override."""
    env = os.environ.get("PUREGEN_FAST_URL_" + name.upper().replace("-", "_"))
    return env or ARCHIVES[name].url


def _instructions(arc: Archive, dest_dir: Path) -> str:
    check = f" ({arc.algo} {arc.digest})" if arc.digest else ""
    return (
        f"download {archive_url(arc.name)}{check} and place it at {dest_dir / arc.filename}, "
        f"or extract it yourself and pass its folder with --data-dir"
    )


def verify_file(path: Path, arc: Archive) -> None:
    """Raise UsageError unless ``path`` has the archive's published checksum."""
    if arc.digest is None or arc.algo is None:
        return
    got = file_digest(path, arc.algo)
    if got != arc.digest:
        raise UsageError(
            f"{path}: {arc.algo} is {got}, expected {arc.digest} (corrupted or truncated "
            f"download). Delete it and run again, or {_instructions(arc, path.parent)}"
        )


def fetch(
    url: str,
    dest: Path,
    *,
    algo: str | None = None,
    digest: str | None = None,
    size_hint: int | None = None,
    quiet: bool = False,
    timeout: float = _TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; checksum and length are verified before
    the file gets its final name (it is streamed to a private ``dest.part-<pid>-<token>`` first,
    so concurrent downloads of one file do not write into each other)."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    # unique per call (not only per process): threads of one process may fetch the same file
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}-{secrets.token_hex(4)}")
    h = hashlib.new(algo) if algo else None
    received = 0
    try:
        with atomic_path(dest, part):  # a failed or refused download removes the part file
            req = urllib.request.Request(url, headers={"User-Agent": "puregen-fast"})
            with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, "wb") as f:
                length = resp.headers.get("Content-Length")
                expected_len = int(length) if length and length.isdigit() else None
                with tqdm(
                    total=expected_len or size_hint,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=quiet,
                    leave=False,
                ) as bar:
                    while chunk := resp.read(_CHUNK):
                        f.write(chunk)
                        if h is not None:
                            h.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            if expected_len is not None and received != expected_len:
                raise UsageError(
                    f"download of {url} stopped after {received} of {expected_len} bytes; run again"
                )
            if h is not None and h.hexdigest() != digest:
                raise UsageError(
                    f"download of {url}: {algo} is {h.hexdigest()}, expected {digest} "
                    f"(corrupted or truncated). Nothing was extracted; run again"
                )
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise UsageError(f"cannot download {url}: {e}") from e
    return dest


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (p.parts and ":" in p.parts[0]):
        raise UsageError(f"{archive}: refusing member with an absolute path: {name!r}")
    if ".." in p.parts:
        raise UsageError(f"{archive}: refusing member that escapes the target: {name!r}")
    return p


def _inside(parent: PurePosixPath, link: str) -> bool:
    """Whether a link stored at ``parent`` pointing at ``link`` stays inside the archive root."""
    if link.startswith("/") or PurePosixPath(link).is_absolute():
        return False
    depth = 0
    for part in (parent / link).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            p = _check_member_name(m.name, archive)
            if m.issym() and not _inside(p.parent, m.linkname):
                raise UsageError(f"{archive}: refusing symlink {m.name!r} -> {m.linkname!r}")
            if m.islnk():
                _check_member_name(m.linkname, archive)
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UsageError(f"{archive}: refusing special file {m.name!r}")
        # The "data" filter repeats these checks in the standard library (defence in depth) and
        # drops set-uid bits and ownership.
        if hasattr(tarfile, "data_filter"):
            tf.extractall(target, members=members, filter="data")
        else:  # pragma: no cover - Python without PEP 706
            tf.extractall(target, members=members)


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_member_name(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):  # zipfile would write it as a file; refuse rather than guess
                raise UsageError(f"{archive}: refusing symlink member {info.filename!r}")
        zf.extractall(target, members=infos)


def _not_ours(target: Path, archive: Path) -> str:
    return (
        f"{target} exists but is not a complete extraction of {archive.name} by puregen-fast "
        f"(no {COMPLETE_MARKER} file in it); it is left alone: move or rename it (or delete it "
        f"if it is a damaged copy you no longer need) and run again"
    )


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract ``archive`` (tar, tar.gz or zip) into ``target`` atomically: into a temporary
    sibling, the marker written last, then renamed. Returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists() or target.is_symlink():  # not made by us (ours appear with the marker)
        raise UsageError(_not_ours(target, archive))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    try:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, tmp)
            else:
                _extract_tar(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise UsageError(f"{archive}: cannot extract ({e}); delete it and run again") from e
        (tmp / COMPLETE_MARKER).write_text(f"{archive.name}\n")
        try:
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError as e:
            # another process renamed its copy into place first: use that one
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (target / COMPLETE_MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            if target.exists():
                raise UsageError(_not_ours(target, archive)) from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_extracted(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    download: bool = True,
    quiet: bool = False,
) -> Path:
    """The extracted folder of archive ``name`` under the data directory, fetching and
    extracting it once. The archive is looked for first in the data directory (placed there by
    hand), then downloaded when ``download`` is true."""
    arc = ARCHIVES[name]
    root = resolve_data_dir(data_dir)
    target = root / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists() or target.is_symlink():  # refuse before a long download
        raise UsageError(_not_ours(target, root / arc.filename))
    archive = root / arc.filename
    if not archive.is_file():
        if not download:
            raise UsageError(
                f"data set '{name}' not found under {root}: {_instructions(arc, root)}"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the data directory {root}: {e}") from e
        try:
            fetch(
                archive_url(name),
                archive,
                algo=arc.algo,
                digest=arc.digest,
                size_hint=arc.size,
                quiet=quiet,
            )
        except UsageError as e:
            raise UsageError(
                f"{e}. If offline, or to fetch it by hand: {_instructions(arc, root)}"
            ) from e
    else:
        verify_file(archive, arc)
    return safe_extract(archive, target)
