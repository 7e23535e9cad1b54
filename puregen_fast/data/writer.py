"""Purified output on disk (DESIGN 5): shards, manifest and resume checks.

Layout of ``--out DIR`` with ``--format npy`` (the default)::

    manifest.json                  written last, by rank 0: configuration, model hashes, seed,
                                   class names, counts, per-shard sha256, timings, device, backend
    images-00000.npy, ...          uint8 (n, H, W, 3), shard k = images [k*S, min((k+1)*S, N))
    labels-00000.npy, ...          int64 (n,)
    .puregen-run.json              the configuration this folder is being written with
    .puregen-shard-00000.json      a shard's completion record (its files' sha256), written
                                   after the shard's files were renamed into place
    preview.png                    with ``preview=N`` (``--preview N``): N originals above their
                                   purified versions (`puregen_fast.data.preview`), written
                                   when every shard is, just before the manifest; removed when
                                   a run starts, so it is only ever of a finished run

With ``--format webdataset`` shard k is ``shard-00000.tar`` (`puregen_fast.data.webdataset`):
its images in index order as ``<key>.png`` and ``<key>.cls``, the keys those of WebDataset input
(else the zero-padded index); its record holds the tar's sha256 and the sha256 of its labels and
keys.

With ``--format png`` the shards are ImageFolder trees instead: ``DIR/<class>/<index>.png``
(index zero-padded to one width, so name order is index order), a drop-in for torchvision's
``ImageFolder``. Class folders are the class names when those already sort in label order
(CIFAR-10, CINIC-10, Tiny-ImageNet, ImageFolder input), else ``<label>-<name>`` with the label
zero-padded, so ``ImageFolder`` assigns the same label numbers. Every class folder is created,
also for classes a ``--limit`` leaves empty (pass ``allow_empty=True`` to ``ImageFolder`` then).

Every file is written through `puregen_fast.data.io` (a temporary name, renamed when whole), and
a shard counts as finished only through its completion record, so a killed run never leaves a
shard or a manifest that looks complete. Nothing is written through a link: `io` never opens a
file through one, and every class folder, created or reused, must be a real folder directly in
``--out`` (checked when the folders are made and again before each shard is written); a link
there is a UsageError naming it, since writing through it would change files outside ``--out``.

A folder is purify output only when it holds this tool's run record or manifest; a non-empty
folder with neither is refused whatever the flags. ``--overwrite`` deletes only what this tool
writes: its own files at the top level and the numbered PNGs in the class folders the record
names; anything else in the folder stays.

Reading it back: `puregen_fast.data.reader` (``load_purified``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from puregen_fast.data.io import (
    atomic_path,
    atomic_write,
    atomic_write_json,
    file_digest,
    fsync_dir,
    read_json,
)
from puregen_fast.data.lock import LOCK
from puregen_fast.data.manifest import FORMAT_ID, MANIFEST
from puregen_fast.data.webdataset import read_tar, write_tar
from puregen_fast.errors import UsageError

__all__ = [
    "MANIFEST",
    "RUN_STATE",
    "PREVIEW",
    "FORMAT_ID",
    "ShardWriter",
    "shard_ranges",
    "rank_shards",
    "png_class_dirs",
    "png_digest_line",
    "real_dir",
    "check_out_dir",
    "prepare_out_dir",
    "clear_out_dir",
    "mark_diverged",
]

RUN_STATE = ".puregen-run.json"
PREVIEW = "preview.png"  # the before/after picture (`puregen_fast.data.preview`)


def _ours_or_tmp(final: str, ext: str) -> re.Pattern[str]:
    """Names matching the regex ``final``, and their temporary names: `io.tmp_name`'s
    ``.<name>.tmp-<pid><ext>``, or ``.<name>.tmp-<pid>`` as earlier versions named them."""
    return re.compile(rf"^(?:{final}|\.{final}\.tmp-\d+(?:{re.escape(ext)})?)$")


_OUR_FILE = _ours_or_tmp(r"(?:images|labels)-\d{5,}\.npy", ".npy")
_PNG_FILE = _ours_or_tmp(r"\d+\.png", ".png")
_TAR_FILE = _ours_or_tmp(r"shard-\d{5,}\.tar", ".tar")
_PREVIEW_FILE = _ours_or_tmp(re.escape(PREVIEW), ".png")


# ----------------------------------------------------------------------------- small helpers


class _HashingFile:
    """A write-only file object that hashes what passes through it (one pass for npy shards)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h = f, hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.h.update(b)
        return self.f.write(b)


def _npy_bytes_atomic(path: Path, arr: np.ndarray) -> str:
    """np.save ``arr`` to ``path`` atomically; returns the file's sha256, hashed as written."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        hf = _HashingFile(f)
        np.lib.format.write_array(hf, np.ascontiguousarray(arr), allow_pickle=False)
    return hf.h.hexdigest()


def _keys_sha256(keys: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(keys).encode("utf-8", "surrogateescape")).hexdigest()


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of ``n`` images."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def rank_shards(num_shards: int, rank: int, world: int) -> range:
    """The contiguous run of shards rank ``rank`` of ``world`` writes (so slice boundaries are
    shard boundaries, and every rank forms the same batches as one process would)."""
    return range(num_shards * rank // world, num_shards * (rank + 1) // world)


def png_class_dirs(class_names: Sequence[str]) -> list[str]:
    """Folder names for the classes, in label order, whose sorted order is label order (what
    ``ImageFolder`` needs to give the same label numbers)."""
    safe = []
    for i, n in enumerate(class_names):
        s = re.sub(r"[/\\\x00]", "_", str(n)).strip()
        safe.append(s if s not in ("", ".", "..") else str(i))
    if sorted(safe) == safe and len(set(safe)) == len(safe):
        return safe
    w = len(str(max(len(safe) - 1, 0)))
    return [f"{i:0{w}d}-{s}" for i, s in enumerate(safe)]


def png_digest_line(name: str, sha256: str) -> bytes:
    """One PNG's line in its shard's ``sha256``: the hash of these lines in index order (so the
    record covers every file's name and bytes)."""
    return f"{name}\0{sha256}\n".encode()


def real_dir(out: Path, name: str) -> Path:
    """``out/name`` as a real folder directly in ``out`` (created when missing); UsageError when
    a link, a file or anything else stands there: what is written into it must stay in ``out``."""
    path = out / name
    try:
        path.mkdir()
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return path
    what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
    raise UsageError(
        f"--out {out}: the class folder {name!r} is {what}; output is never written through "
        f"links or into anything but real folders in --out (it could change files elsewhere): "
        f"remove or rename {path} and run again"
    )


# ----------------------------------------------------------------------------- the writer


class ShardWriter:
    """Writes and verifies the shards of one output folder."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        fmt: str,
        num_images: int,
        shard_size: int,
        class_names: Sequence[str],
        *,
        ranges: Sequence[tuple[int, int]] | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        """``ranges``: the shards' [start, stop) when they are not ``shard_size`` images each
        (WebDataset input: one per input shard); ``keys``: the images' WebDataset keys."""
        if fmt not in ("npy", "png", "webdataset"):
            raise UsageError(f"--format {fmt!r}: choose npy, png or webdataset")
        self.out = Path(out_dir)
        self.fmt = fmt
        self.n = num_images
        self.shard_size = shard_size
        self.ranges = shard_ranges(num_images, shard_size) if ranges is None else list(ranges)
        self.class_dirs = png_class_dirs(class_names)
        self._width = len(str(max(num_images - 1, 0)))
        self.keys = keys

    @property
    def num_shards(self) -> int:
        return len(self.ranges)

    def record_path(self, k: int) -> Path:
        return self.out / f".puregen-shard-{k:05d}.json"

    def npy_names(self, k: int) -> tuple[str, str]:
        return f"images-{k:05d}.npy", f"labels-{k:05d}.npy"

    def tar_name(self, k: int) -> str:
        return f"shard-{k:05d}.tar"

    def shard_keys(self, k: int) -> list[str]:
        """The WebDataset keys of shard ``k``'s images."""
        start, stop = self.ranges[k]
        if self.keys is not None:
            return list(self.keys[start:stop])
        return [f"{i:0{self._width}d}" for i in range(start, stop)]

    def png_name(self, index: int, label: int) -> str:
        return f"{self.class_dirs[label]}/{index:0{self._width}d}.png"

    def make_class_dirs(self) -> None:
        if self.fmt == "png":
            for d in self.class_dirs:
                real_dir(self.out, d)

    # -- write --------------------------------------------------------------------------------
    def write_shard(self, k: int, images: np.ndarray, labels: np.ndarray) -> dict:
        """Write shard ``k`` (its files, then its completion record); returns the record."""
        start, stop = self.ranges[k]
        if images.shape[0] != stop - start or labels.shape != (stop - start,):
            raise ValueError(f"shard {k}: expected {stop - start} images and labels")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"shard {k}: images must be uint8 (n, H, W, 3)")
        rec: dict[str, Any] = {"index": k, "start": start, "stop": stop, "format": self.fmt}
        if self.fmt == "npy":
            iname, lname = self.npy_names(k)
            rec["images"], rec["labels"] = iname, lname
            rec["images_sha256"] = _npy_bytes_atomic(self.out / iname, images)
            rec["labels_sha256"] = _npy_bytes_atomic(self.out / lname, labels.astype(np.int64))
            rec["shape"] = list(images.shape)
        elif self.fmt == "webdataset":
            keys = self.shard_keys(k)
            rec["tar"] = self.tar_name(k)
            rec["sha256"] = write_tar(self.out / rec["tar"], keys, images, labels)
            rec["labels_sha256"] = hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()
            rec["keys_sha256"] = _keys_sha256(keys)
            rec["count"] = stop - start
            rec["shape"] = list(images.shape)
        else:
            from PIL import Image

            h = hashlib.sha256()
            dirs = set()
            for label in sorted({int(v) for v in labels}):  # again: it may have been replaced
                real_dir(self.out, self.class_dirs[label])
            for j in range(stop - start):
                name = self.png_name(start + j, int(labels[j]))
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(images[j])).save(buf, format="PNG")
                data = buf.getvalue()
                # each class folder is flushed once per shard, before the record says it is done
                atomic_write(self.out / name, data, sync_dir=False)
                dirs.add((self.out / name).parent)
                h.update(png_digest_line(name, hashlib.sha256(data).hexdigest()))
            for d in sorted(dirs):
                fsync_dir(d)
            rec["count"] = stop - start
            rec["sha256"] = h.hexdigest()
            rec["shape"] = list(images.shape)
        atomic_write_json(self.record_path(k), rec)
        return rec

    # -- verify -------------------------------------------------------------------------------
    def verify_shard(self, k: int, labels: np.ndarray | None = None) -> dict | None:
        """The completion record of shard ``k`` if the shard on disk is whole and matches it
        (sha256 of every file, shapes, labels when given); None when it must be written again."""
        start, stop = self.ranges[k]
        rec = read_json(self.record_path(k))
        if (
            rec is None
            or rec.get("start") != start
            or rec.get("stop") != stop
            or rec.get("format") != self.fmt
        ):
            return None
        try:
            if self.fmt == "npy":
                ipath, lpath = self.out / rec["images"], self.out / rec["labels"]
                if (rec["images"], rec["labels"]) != self.npy_names(k):
                    return None
                if file_digest(ipath) != rec["images_sha256"]:
                    return None
                if file_digest(lpath) != rec["labels_sha256"]:
                    return None
                im = np.load(ipath, mmap_mode="r")
                lb = np.load(lpath, mmap_mode="r")
                if im.dtype != np.uint8 or im.ndim != 4 or im.shape[0] != stop - start:
                    return None
                if lb.dtype != np.int64 or lb.shape != (stop - start,):
                    return None
                if labels is not None and not np.array_equal(lb, labels):
                    return None
            elif self.fmt == "webdataset":
                if rec.get("tar") != self.tar_name(k) or rec.get("count") != stop - start:
                    return None
                if rec.get("keys_sha256") != _keys_sha256(self.shard_keys(k)):
                    return None
                if labels is not None and rec.get("labels_sha256") != hashlib.sha256(
                    np.asarray(labels, np.int64).tobytes()
                ).hexdigest():
                    return None
                if file_digest(self.out / rec["tar"]) != rec["sha256"]:
                    return None
            else:
                if labels is None or rec.get("count") != stop - start:
                    return None
                h = hashlib.sha256()
                for j in range(stop - start):
                    name = self.png_name(start + j, int(labels[j]))
                    h.update(png_digest_line(name, file_digest(self.out / name)))
                if h.hexdigest() != rec["sha256"]:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return rec

    # -- read back ----------------------------------------------------------------------------
    def read_rows(
        self, ids: Sequence[int], labels: np.ndarray, shape: Sequence[int]
    ) -> np.ndarray:
        """The written images ``ids`` (global indices, increasing), read from the shards that
        hold them only (the preview's purified images); ``labels``: every image's (png output's
        class folders), ``shape``: an image's (H, W, 3)."""
        starts = np.asarray([s for s, _ in self.ranges], np.int64)
        out: list[np.ndarray] = []
        for k in dict.fromkeys(int(np.searchsorted(starts, i, side="right") - 1) for i in ids):
            start, stop = self.ranges[k]
            mine = [int(i) for i in ids if start <= int(i) < stop]
            if self.fmt == "npy":
                im = np.load(self.out / self.npy_names(k)[0], mmap_mode="r")
                out += [np.asarray(im[i - start]) for i in mine]
            elif self.fmt == "webdataset":
                _, im, _ = read_tar(self.out / self.tar_name(k), tuple(shape))
                out += [im[i - start] for i in mine]
            else:
                from PIL import Image

                for i in mine:
                    with Image.open(self.out / self.png_name(i, int(labels[i]))) as f:
                        out.append(np.asarray(f.convert("RGB")))
        return np.stack(out)


# ----------------------------------------------------------------------------- out dir state


def _recorded_configs(out: Path) -> list[dict]:
    """The configurations this tool recorded in ``out`` (run record, manifest); empty when
    ``out`` is not a purify output folder."""
    found = []
    for name in (RUN_STATE, MANIFEST):
        rec = read_json(out / name)
        if (
            rec is not None
            and rec.get("format") == FORMAT_ID
            and isinstance(rec.get("config"), dict)
        ):
            found.append(rec["config"])
    return found


def _ours(out: Path) -> list[Path]:
    """Files in ``out`` that this writer created (so --overwrite deletes nothing else): our
    private ``.puregen-*`` files (and their temporary names) always; shards, the manifest and,
    for png output, the numbered files in the class folders only when a run record or manifest
    of this tool says ``out`` is a run (the class folders are the ones it names)."""
    found: list[Path] = []
    if not out.is_dir():
        return found
    configs = _recorded_configs(out)
    for e in out.iterdir():
        n = e.name
        if not e.is_file() or e.is_symlink():
            continue
        if n == LOCK:
            continue  # the live run's lock (data/lock.py): never ours to delete
        private = n.startswith((".puregen-", "..puregen-"))  # also their temporary names
        if private or (
            configs
            and (
                n in (MANIFEST, RUN_STATE)
                or _PREVIEW_FILE.match(n)
                or _OUR_FILE.match(n)
                or _TAR_FILE.match(n)
                or n.startswith(f".{MANIFEST}.tmp-")
            )
        ):
            found.append(e)
    dirs: set[str] = set()
    for cfg in configs:
        names = cfg.get("class_names")
        if cfg.get("format") == "png" and isinstance(names, list):
            dirs.update(png_class_dirs([str(c) for c in names]))
    for d in sorted(dirs):
        p = out / d
        if p.is_dir() and not p.is_symlink():
            found.extend(f for f in p.iterdir() if f.is_file() and _PNG_FILE.match(f.name))
    return found


def clear_out_dir(out: Path) -> None:
    """Delete what an earlier run wrote in ``out`` (and class folders left empty by that)."""
    dirs = set()
    for f in _ours(out):
        if f.parent != out:
            dirs.add(f.parent)
        f.unlink(missing_ok=True)
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass  # holds other files: keep it


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(f"{prefix}{k} ({va!r} before, {vb!r} now)")
    return out


def _diverged(out: Path) -> bool:
    rec = read_json(out / RUN_STATE)
    return rec is not None and isinstance(rec.get("diverged"), dict)


def mark_diverged(out: Path, info: dict) -> None:
    """Record in the run record that the run stopped on a divergence (DESIGN 2.4): ``--resume``
    with changed flags then starts over instead of refusing the other configuration."""
    rec = read_json(out / RUN_STATE)
    if rec is not None:
        atomic_write_json(out / RUN_STATE, {**rec, "diverged": info})


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The early, cheap refusal (before models or data are loaded): ``--out`` must be a folder;
    one holding earlier output needs --resume or --overwrite; a non-empty folder that holds no
    purify output (no run record, no manifest) is refused whatever the flags."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if not out.is_dir():
        return
    if not _recorded_configs(out):
        ours = set(_ours(out))
        foreign = sorted(e.name for e in out.iterdir() if e not in ours and e.name != LOCK)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UsageError(
                f"--out {out} is not empty ({shown}) and holds no puregen-fast purify output "
                f"(no {MANIFEST} or {RUN_STATE}); choose a new or empty folder"
            )
        return
    if resume or overwrite:
        return
    what = (
        "finished output (manifest.json)"
        if read_json(out / MANIFEST) is not None
        else "an unfinished run"
    )
    raise UsageError(
        f"--out {out} already holds {what}; pass --resume to verify and continue it, "
        f"--overwrite to replace it, or choose another --out"
    )


def prepare_out_dir(out: Path, config: dict, *, resume: bool, overwrite: bool) -> bool:
    """Make ``out`` ready for writing with ``config``; returns True when earlier shards may be
    reused (a resume of the same configuration). A finished manifest is removed first, so the
    folder does not look complete while shards are checked and rewritten."""
    check_out_dir(out, resume=resume, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder ({e})") from e
    configs = _recorded_configs(out)
    before = configs[0] if configs else None
    reuse = False
    if resume and before is not None:
        if before == config:
            reuse = True
        elif not overwrite and not _diverged(out):  # a diverged run is redone with new flags
            diffs = "; ".join(_diff(before, config)[:6])
            raise UsageError(
                f"--out {out} was written with a different configuration: {diffs}. "
                f"Use the same flags, pass --overwrite to replace it, or choose another --out"
            )
    try:
        if not reuse:
            clear_out_dir(out)
        else:  # temporary files of a killed run: never complete, remove them
            for f in _ours(out):
                if ".tmp-" in f.name:
                    f.unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        # a picture is of a finished run only: the new run writes its own when it finishes
        (out / PREVIEW).unlink(missing_ok=True)
        atomic_write_json(out / RUN_STATE, {"format": FORMAT_ID, "config": config})
    except OSError as e:
        raise UsageError(
            f"--out {out}: cannot write ({e}); choose a writable folder with enough free space"
        ) from e
    return reuse
