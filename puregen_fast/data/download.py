"""Fetch, verify and safely extract the data sets' official archives (DESIGN 5).

* Download target: only the cache, ``$PUREGEN_FAST_CACHE``, else ``$XDG_CACHE_HOME/puregen-fast``
  (``~/.cache/puregen-fast``). A ``--data-dir`` is where the user placed the data set (extracted,
  or its official archive, which is then verified and extracted next to it); one that holds
  neither is a UsageError naming the folder, and is not created or downloaded into, so a
  mistyped path never starts a download (``ensure_extracted(download_into_data_dir=True)`` is
  the explicit opt-in).
* Every archive has a published checksum (``ARCHIVES``); the download streams into a file of
  its own (``<file>.part-<pid>-<token>``, so concurrent downloads never share one) and is renamed
  to its final name only after the checksum matched, so a truncated or corrupted download never
  looks like a finished one.
* Extraction accepts regular files and folders only. The data sets' archives contain no links,
  so symbolic and hard links are refused outright, whatever they point at: a link checked by its
  text can still lead outside through other links (CVE-2025-4517), and the tarfile ``data``
  filter of some Python versions has the same flaw, so it is not relied on. Also refused: device
  files, FIFOs, absolute paths, ``..`` components, backslashes, NUL characters, a file and a
  folder at one path, and the marker's name. Every member is checked before anything is
  written, then the files are written by this module (no links, fixed permissions) into a
  temporary sibling directory; the marker file ``.puregen-complete`` is written last and the
  directory renamed into place. A directory without the marker is never taken as complete, and
  never deleted either (it is not ours): extraction refuses to run until it is moved. When
  concurrent runs extract the same archive, the first rename wins and the others use its result.
* Extraction is bounded before anything is written, from the members' declared sizes (sparse
  members are refused): at most `MAX_MEMBER_BYTES` (64 MiB) a file, `MAX_MEMBERS` (500,000)
  members, and in all `MAX_EXTRACT_BYTES` (2 GiB) and no more than `MAX_EXPANSION` (4) times
  the archive's own size (or 64 MiB, whichever is more). The official archives are far below:
  the largest file is a CIFAR-10 batch (31 MB), CINIC-10 has 270,000 images of about 2.5 KB
  (under 1 GB in all), and each extracts to about its own compressed size (PNG and JPEG do not
  compress). A member that yields more bytes than it declared is refused as it is written; a
  member name may be at most 4096 characters long (the data sets' are under 100).
* The URL of each archive can be overridden, for mirrors and tests, by assigning
  ``ARCHIVES[name].url`` or with the environment variable ``PUREGEN_FAST_URL_<NAME>`` (``NAME`` is
  the key upper-cased with ``-`` as ``_``, e.g. ``PUREGEN_FAST_URL_CIFAR10``).
* Offline, or on a failed checksum, a :class:`~puregen_fast.errors.UsageError` (exit 2) lists, in
  one message, every missing file with its URL, checksum and where to put it
  (``offline_message``).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import lzma
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from puregen_fast.data.io import atomic_path, file_digest, fsync_dir
from puregen_fast.errors import UsageError
from puregen_fast.runtime import cache_dir

__all__ = [
    "ARCHIVES",
    "Archive",
    "COMPLETE_MARKER",
    "cache_root",
    "resolve_data_dir",
    "archive_url",
    "missing_archives",
    "offline_message",
    "fetch",
    "verify_file",
    "safe_extract",
    "ensure_extracted",
    "MAX_EXTRACT_BYTES",
    "MAX_EXPANSION",
    "MAX_MEMBER_BYTES",
    "MAX_MEMBERS",
]

COMPLETE_MARKER = ".puregen-complete"
_CHUNK = 1 << 20
# Extraction caps (see the module doc): twice the largest real file, about twice CINIC-10
MAX_MEMBER_BYTES = 64 << 20
MAX_EXTRACT_BYTES = 2 << 30
MAX_MEMBERS = 500_000
MAX_EXPANSION = 4  # extracted bytes per archive byte (the real archives: about 1)
_TIMEOUT_S = 60.0


@dataclass
class Archive:
    """One official archive. ``algo``/``digest`` is the published checksum; ``size`` (bytes) is
    informational (a progress total when the server sends no length). ``title`` names the data
    set in messages; ``layout`` says what its extracted folder holds (what to place by hand)."""

    name: str
    url: str
    filename: str
    algo: str | None
    digest: str | None
    size: int | None
    note: str = ""
    title: str = ""
    layout: str = ""


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "md5",
        "c58f30108f718f92721af3b95e74349a",  # published on the CIFAR page and in torchvision
        170_498_071,
        title="CIFAR-10",
        layout="cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta",
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
        title="CINIC-10",
        layout="train/, valid/ and test/, each with one <class>/ folder of .png images",
    ),
    "tinyimagenet": Archive(
        "tinyimagenet",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "tiny-imagenet-200.zip",
        "md5",
        "90528d7ca1a48142e341f4ef8d21d0de",
        None,
        title="Tiny-ImageNet",
        layout="tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, val/images/ "
        "and val/val_annotations.txt",
    ),
}


def cache_root() -> Path:
    """The user cache folder (`runtime.cache_dir`: ``$PUREGEN_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/puregen-fast``, else ``~/.cache/puregen-fast``)."""
    return cache_dir()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """Where archives are downloaded and extracted: ``--data-dir`` if given, else the cache."""
    return Path(data_dir).expanduser() if data_dir else cache_root()


def archive_url(name: str) -> str:
    """The archive's URL, after the ``PUREGEN_FAST_URL_<NAME>`` override."""
    env = os.environ.get("PUREGEN_FAST_URL_" + name.upper().replace("-", "_"))
    return env or ARCHIVES[name].url


def _file_lines(items: Iterable[tuple[Archive, Path]]) -> str:
    lines = []
    for arc, dest in items:
        check = f" ({arc.algo} {arc.digest})" if arc.digest else ""
        lines.append(f"  {archive_url(arc.name)}{check}\n    -> {dest}")
    return "\n".join(lines)


def _by_hand(items: list[tuple[Archive, Path]], reason: str = "") -> str:
    """One message: ``reason``, then every missing archive with its URL, checksum and place."""
    n = len(items)
    what = "this file" if n == 1 else f"these {n} files"
    return (
        (f"{reason.rstrip('.')}. " if reason else "")
        + f"To set up by hand (e.g. offline), download {what}, check the checksum and place "
        + ("it" if n == 1 else "each")
        + " where shown, then run again:\n"
        + _file_lines(items)
        + "\nor extract an archive yourself and pass its folder with --data-dir"
    )


def missing_archives(
    names: Iterable[str], data_dir: str | os.PathLike[str] | None = None
) -> list[tuple[Archive, Path]]:
    """The archives among ``names`` (keys of ``ARCHIVES``) neither extracted nor placed under the
    data directory (the cache by default), each with the path it belongs at; no repeats."""
    root = resolve_data_dir(data_dir)
    out: list[tuple[Archive, Path]] = []
    for name in dict.fromkeys(names):
        arc = ARCHIVES[name]
        if not ((root / name / COMPLETE_MARKER).is_file() or (root / arc.filename).is_file()):
            out.append((arc, root / arc.filename))
    return out


def offline_message(
    names: Iterable[str], data_dir: str | os.PathLike[str] | None = None, *, reason: str = ""
) -> str:
    """One message listing every archive of ``names`` still missing, with its URL, checksum and
    where to put it, so an offline user fetches them all in one go (not one per failed run)."""
    items = missing_archives(names, data_dir)
    if not items:
        return reason or "every archive is in place"
    return _by_hand(items, reason)


def _no_dataset_here(arc: Archive, root: Path) -> str:
    state = "does not exist" if not root.exists() else "holds neither it nor its archive"
    check = f", {arc.algo} {arc.digest}" if arc.digest else ""
    return (
        f"--data-dir {root}: no {arc.title or arc.name} data set found there (the folder "
        f"{state}). Place the extracted data set in it ({arc.layout}), or the archive at "
        f"{root / arc.filename} (from {archive_url(arc.name)}{check}); or leave out --data-dir to "
        f"use the cache {cache_root()}, where it is downloaded once. A --data-dir is never "
        f"downloaded into, so a mistyped one cannot start a download"
    )


def verify_file(path: Path, arc: Archive) -> None:
    """Raise UsageError unless ``path`` has the archive's published checksum."""
    if arc.digest is None or arc.algo is None:
        return
    got = file_digest(path, arc.algo)
    if got != arc.digest:
        raise UsageError(
            f"{path}: {arc.algo} is {got}, expected {arc.digest} (corrupted or truncated "
            f"download). Delete it and run again. " + _by_hand([(arc, path)])
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


_FILE_MODE = 0o644
_EXEC_MODE = 0o755
# Bad input surfaces from the archive modules and decompressors as any of these.
_BAD_ARCHIVE = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # a zip compression method this Python lacks
    UnicodeError,
)
_DISK_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EACCES, errno.EROFS}
_NO_LINKS = (
    "links are never extracted (the data sets' archives contain none, and a link can send "
    "later members outside the target folder whatever its text says)"
)


_MAX_NAME = 4096  # characters in a member's name (PATH_MAX); the data sets' are under 100


def _refuse(archive: Path, name: str, why: str) -> UsageError:
    shown = repr(name) if len(name) <= 200 else f"{name[:200]!r}... ({len(name)} characters)"
    return UsageError(
        f"{archive}: refusing member {shown}: {why}. Nothing was extracted; this is not an "
        f"official data set archive: delete it and run again"
    )


class _Plan:
    """Every member's path checked before anything is written: normalised to its parts under
    the target, and no file where a folder is (or the other way round); and the sizes the
    members declare, against the caps."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.files: set[tuple[str, ...]] = set()
        self.dirs: set[tuple[str, ...]] = set()
        self.members = 0
        self.total = 0
        self.max_total = min(
            MAX_EXTRACT_BYTES, max(MAX_MEMBER_BYTES, MAX_EXPANSION * archive.stat().st_size)
        )

    def size(self, name: str, size: int) -> None:
        """Count one member of ``size`` declared bytes; UsageError past a cap."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise UsageError(
                f"{self.archive}: more than {MAX_MEMBERS} members (MAX_MEMBERS; the data sets' "
                "archives hold at most 270,000). Nothing was extracted; this is not an official "
                "data set archive: delete it and run again"
            )
        if size > MAX_MEMBER_BYTES:
            raise _refuse(self.archive, name, f"it declares {size} bytes, more than the "
                          f"{MAX_MEMBER_BYTES} a file may hold (MAX_MEMBER_BYTES; the data sets' "
                          "largest file is 31 MB)")  # fmt: skip
        self.total += size
        if self.total > self.max_total:
            raise UsageError(
                f"{self.archive}: its members declare more than {self.max_total} bytes in all "
                f"(MAX_EXTRACT_BYTES {MAX_EXTRACT_BYTES}, at most MAX_EXPANSION {MAX_EXPANSION} "
                "times the archive's size; the data sets' archives extract to about their own "
                "size). Nothing was extracted; this is not an official data set archive: delete "
                "it and run again"
            )

    def add(self, name: str, is_dir: bool) -> tuple[str, ...]:
        """The member's path parts (empty for the archive's own root folder ``./``)."""
        refuse = lambda why: _refuse(self.archive, name, why)  # noqa: E731
        if len(name) > _MAX_NAME:
            raise refuse(f"its name is longer than {_MAX_NAME} characters")
        if "\x00" in name:
            raise refuse("its name holds a NUL character")
        if "\\" in name:
            raise refuse("its name holds a backslash (a Windows path separator)")
        raw = name.split("/")
        if name.startswith("/") or ":" in raw[0]:
            raise refuse("an absolute path escapes the target folder")
        if ".." in raw:
            raise refuse("a '..' component escapes the target folder")
        try:
            os.fsencode(name)
        except UnicodeError:
            raise refuse("its name cannot be a file name here") from None
        parts = tuple(p for p in raw if p not in ("", "."))
        if not parts:
            if is_dir:
                return parts
            raise refuse("a file without a name")
        if parts[0] == COMPLETE_MARKER:  # a file, or a folder that would block the marker
            raise refuse(f"{COMPLETE_MARKER} is the name of the completion marker")
        for i in range(1, len(parts)):
            if parts[:i] in self.files:
                raise refuse(f"{'/'.join(parts[:i])!r} is a file in this archive, not a folder")
            self.dirs.add(parts[:i])
        if is_dir:
            if parts in self.files:
                raise refuse("a folder would replace a file of the same name")
            self.dirs.add(parts)
        else:
            if parts in self.dirs:
                raise refuse("a file would overwrite a folder of the same name")
            self.files.add(parts)  # a repeated file: the later copy wins, as in tar
        return parts


def _write(path: Path, src, executable: bool, size: int, archive: Path, name: str) -> None:
    """Copy ``size`` bytes (the member's declared size, already checked) from ``src``; a
    member that yields more is refused, not written on."""
    # O_NOFOLLOW: never write through a link (none can exist here; a second guard)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, _EXEC_MODE if executable else _FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        left = size
        while left > 0 and (chunk := src.read(min(_CHUNK, left))):
            f.write(chunk)
            left -= len(chunk)
        if src.read(1):
            raise _refuse(archive, name, f"it holds more than the {size} bytes it declares")


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        plan = _Plan(archive)
        todo = []
        for m in tf:  # not getmembers(): the count is checked as the members are listed
            if m.issym() or m.islnk():
                kind = "a symbolic" if m.issym() else "a hard"
                raise _refuse(archive, m.name, f"it is {kind} link to {m.linkname!r}; {_NO_LINKS}")
            if not (m.isfile() or m.isdir()):
                kind = (
                    "a character device" if m.ischr()
                    else "a block device" if m.isblk()
                    else "a FIFO" if m.isfifo()
                    else f"of tar type {m.type!r}"
                )  # fmt: skip
                raise _refuse(archive, m.name, f"it is {kind}; only files and folders are taken")
            if m.issparse():  # its declared size is not what it occupies in the archive
                raise _refuse(archive, m.name, "it is a sparse file; the data sets' archives "
                              "hold none")  # fmt: skip
            plan.size(m.name, m.size if m.isfile() else 0)
            todo.append((m, plan.add(m.name, m.isdir())))
        # written by hand, not by extractall: no links, owners or special modes can come through
        for m, parts in todo:
            dest = target.joinpath(*parts)
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:  # pragma: no cover - a regular member always has a stream
                raise _refuse(archive, m.name, "its data cannot be read")
            with src:
                _write(dest, src, bool(m.mode & 0o100), m.size, archive, m.name)


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        plan = _Plan(archive)
        todo = []
        for info in zf.infolist():
            plan.size(info.filename, info.file_size)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if stat.S_ISLNK(mode):
                raise _refuse(archive, info.filename, f"it is a symbolic link; {_NO_LINKS}")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                what = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"
                raise _refuse(archive, info.filename, f"it is {what} (mode {mode:o})")
            if info.flag_bits & 0x1:
                raise _refuse(archive, info.filename, "it is encrypted")
            # not info.is_dir(): it fails on an empty name
            is_dir = info.filename.endswith("/") or kind == stat.S_IFDIR
            todo.append((info, is_dir, plan.add(info.filename, is_dir)))
        for info, is_dir, parts in todo:
            dest = target.joinpath(*parts)
            if is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                _write(dest, src, bool((info.external_attr >> 16) & 0o100), info.file_size,
                       archive, info.filename)  # fmt: skip


def _not_ours(target: Path, archive: Path) -> str:
    return (
        f"{target} exists but is not a complete extraction of {archive.name} by puregen-fast "
        f"(no {COMPLETE_MARKER} file in it); it is left alone: move or rename it (or delete it "
        f"if it is a damaged copy you no longer need) and run again"
    )


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract ``archive`` (tar, tar.gz or zip) into ``target`` atomically: into a temporary
    sibling, the marker written last, then renamed. Returns ``target``. Only regular files and
    folders are accepted; any other member (a link above all) is a UsageError naming the archive
    and the member, raised before anything is written."""
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
        except _BAD_ARCHIVE as e:
            if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:  # the disk, not the archive
                raise UsageError(f"cannot extract {archive} into {target.parent}: {e}") from e
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
    download_into_data_dir: bool = False,
    quiet: bool = False,
) -> Path:
    """The extracted folder of archive ``name`` under the data directory, fetching and
    extracting it once.

    Without ``data_dir``: the cache, where a missing archive is downloaded when ``download``.
    With one: the archive placed there by hand is verified and extracted next to it; a missing
    one is a UsageError naming the folder (the folder is not created), because a given folder is
    where the user says the data is, and a typo must not start a download. Only
    ``download_into_data_dir`` (with ``download``) makes a given folder a download target."""
    arc = ARCHIVES[name]
    root = resolve_data_dir(data_dir)
    target = root / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists() or target.is_symlink():  # refuse before a long download
        raise UsageError(_not_ours(target, root / arc.filename))
    archive = root / arc.filename
    if not archive.is_file():
        given = bool(data_dir) and os.path.realpath(root) != os.path.realpath(cache_root())
        if given and not download_into_data_dir:
            raise UsageError(_no_dataset_here(arc, root))
        if not download:
            reason = f"{arc.title or name} is not in {root} and downloading is off"
            raise UsageError(_by_hand([(arc, archive)], reason))
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
            raise UsageError(_by_hand([(arc, archive)], str(e))) from e
    else:
        verify_file(archive, arc)
    return safe_extract(archive, target)
