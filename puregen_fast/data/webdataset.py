"""WebDataset tar shards in and out (DESIGN 5), through the ``webdataset`` library.

Input: ``--dataset webdataset --data-dir 'shards/train-{000..099}.tar'``: local, uncompressed tar
shards, brace-expanded (and ``::``-joined) as ``webdataset`` expands them, or a folder, whose
``*.tar`` files are taken in name order. A sample is the members sharing a ``__key__``
(``webdataset``'s key rule: the member name up to the first dot of its base name): the image
under exactly one of ``jpg|jpeg|png|webp``, the label under ``cls`` (a non-negative integer as
text). Other members are ignored. Class names are ``0 .. K-1`` with ``K`` the largest label + 1.

Global ids (which key the noise) are the running index over the shards in order. The shards are
read once up front without decoding images (`index_webdataset`): every sample is counted, its key
and label kept, its image header checked (size, pixel limit) and its bytes hashed, and the end of
each tar checked, so a truncated shard or a broken member stops the run before anything is
purified, naming the shard and the key. Images are then decoded while they stream in, shard by
shard (`WebDataset.images`), with no decoded cache. The per-shard counts are part of the run's
recorded configuration and of the manifest, so ranks and resumed runs agree on the ids.

Bounds (hostile shards): a brace pattern is counted before it is expanded and may name at most
`MAX_SHARDS` shards (a folder holds at most as many); two names of one file (a link to a listed
shard) are refused. Members other than images and labels are skipped without being read; an
image member may hold at most `member_cap` bytes (8 per allowed pixel, 16-bit RGBA stored raw,
plus 1 MiB), a ``cls`` member `MAX_CLS_BYTES`; both are checked from the member's header before
a byte of it is read. A member name must be UTF-8 and at most 4096 characters long, and an
image member must hold PNG, JPEG or WebP (a ``.png`` holding TIFF or GIF is refused: only
those three decoders ever see shard bytes).

Output (``--format webdataset``, `write_tar`): one tar per output shard, the samples in id order
under their keys (the input keys, or the zero-padded global index for other inputs), the image
losslessly as ``png``, the label as ``cls``. Member headers carry a fixed time and owner, so the
bytes of a shard depend on its images only (a resumed or a multi-rank run writes the same bytes).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import stat
import string
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import numpy as np

from puregen_fast.data.datasets import MAX_CLASSES, MAX_PIXELS, Dataset, open_pil
from puregen_fast.data.io import atomic_path, file_digest
from puregen_fast.errors import UsageError

__all__ = [
    "IMAGE_EXTS",
    "MAX_CLS_BYTES",
    "MAX_SHARDS",
    "count_expansions",
    "member_cap",
    "WebDataset",
    "WebDatasetIndex",
    "expand_shards",
    "index_webdataset",
    "open_webdataset",
    "read_tar",
    "write_tar",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Shards one --data-dir may name: LAION-400M's 41,408 fit; a pattern naming more (a typo such as
# {0..9999999}, or eight {0..9} groups) is refused from its count, before it is expanded.
MAX_SHARDS = 100_000
MAX_CLS_BYTES = 4096  # a label is a short integer as text
_MAX_NAME = 4096  # characters in a member's name (PATH_MAX): keys and messages stay short
_MAX_BRACE_DEPTH = 32  # nested braces in one pattern
# the only decoders shard bytes reach (PIL format ids), whatever the image extension
_DECODERS = ["PNG", "JPEG", "WEBP"]
_MAGIC = (
    (b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"RIFF", "WEBP"),
)  # fmt: skip


def member_cap(max_pixels: int) -> int:
    """The most bytes an image member may hold: 8 per allowed pixel (16-bit RGBA stored without
    compression, the largest an image of that many pixels can honestly be) plus 1 MiB of
    headers and metadata: 129 MiB at the default 4096 x 4096 pixels."""
    return 8 * max_pixels + (1 << 20)
_BLOCK = 512  # tar block; an archive ends with zero blocks
_MTIME = 0  # fixed member time: reproducible shard bytes


def _wds() -> ModuleType:
    try:
        import webdataset
    except ImportError as e:
        raise UsageError(
            "WebDataset shards need the webdataset package: pip install 'puregen-fast[webdataset]'"
        ) from e
    return webdataset


def _show(path: str | os.PathLike[str]) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def expand_shards(spec: str | os.PathLike[str]) -> list[Path]:
    """The shard files of ``spec``: a brace pattern (``a/{000..009}.tar``, ``::`` joins lists) or
    a folder (its ``*.tar`` in name order). Local paths only; every shard must be a regular
    file."""
    s = os.fspath(spec)
    if "://" in s or s.startswith("pipe:"):
        raise UsageError(f"--data-dir {s}: only local shard paths are read; copy the shards here")
    p = Path(s).expanduser()
    try:
        folder = p.is_dir()
    except OSError:  # e.g. a pattern longer than a file name may be: not a folder
        folder = False
    paths: Iterable[Path]
    if folder:
        found: list[Path] = []
        for q in p.iterdir():
            if q.name.endswith(".tar"):
                found.append(q)
                if len(found) > MAX_SHARDS:
                    raise UsageError(_too_many(s, f"more than {MAX_SHARDS}"))
        paths = sorted(found)
        if not paths:
            raise UsageError(f"--data-dir {_show(p)}: a folder without .tar shards")
    else:
        wds = _wds()
        n = count_expansions(s)
        if n > MAX_SHARDS:
            shown = str(n) if n < 10**15 else f"about 10^{int(math.log10(n))}"
            raise UsageError(_too_many(s, shown))
        # checked one by one as they are made: a missing first shard is named at once
        paths = (Path(u).expanduser() for u in wds.shardlists.expand_urls(s))
    out: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}
    for q in paths:
        try:
            st = os.stat(q)
        except OSError as e:
            raise UsageError(
                f"--data-dir {s}: shard {_show(q)} cannot be read ({e.strerror}); check the "
                "pattern (brace ranges like {000..099} are expanded)"
            ) from e
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"--data-dir {s}: shard {_show(q)} is not a regular file")
        # the file itself, not its name: a link to a listed shard would be read twice
        first = seen.setdefault((st.st_dev, st.st_ino), q)
        if first is not q:
            raise UsageError(
                f"--data-dir {s}: names one shard more than once ({_show(first)} and "
                f"{_show(q)} are the same file); list each shard once"
            )
        out.append(Path(os.path.abspath(q)))
    return out


def _too_many(spec: str, shown: str) -> str:
    spec = spec if len(spec) <= 200 else spec[:200] + "..."
    return (
        f"--data-dir {spec}: names {shown} shards, more than the {MAX_SHARDS} allowed (check "
        f"the brace ranges); split the data set into several runs"
    )


_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_ALPHABET = string.ascii_uppercase + string.ascii_lowercase


def count_expansions(spec: str) -> int:
    """How many names ``webdataset`` would expand ``spec`` into (``::`` parts, ``${var}``
    environment substitution, brace expansion), counted without expanding: arithmetic on the
    ranges, the grammar of ``braceexpand`` (which builds every group in full before the first
    name). UsageError for unbalanced or too deeply nested braces."""
    envsubst = _wds().shardlists.envsubst
    total = 0
    for url in spec.split("::"):
        for _ in range(10):  # as webdataset's expand_urls substitutes
            try:
                last, url = url, envsubst(url)
            except AssertionError:  # webdataset asserts that the variable is set
                names = ", ".join(sorted({f"WDS_{v}" for v in re.findall(r"\$\{(\w+)\}", url)}))
                raise UsageError(
                    f"--data-dir {spec}: ${{name}} is replaced by the environment variable "
                    f"WDS_name, and {names} is not set everywhere it is needed; set it or "
                    "write the path out"
                ) from None
            if url == last:
                break
        total += _count_pattern(url, 0, spec)
    return total


def _count_pattern(p: str, depth: int, spec: str) -> int:
    if depth > _MAX_BRACE_DEPTH:
        raise UsageError(
            f"--data-dir {spec}: braces nested more than {_MAX_BRACE_DEPTH} deep; simplify it"
        )
    n, start, pos, level = 1, 0, 0, 0
    while pos < len(p):
        c = p[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if level == 0 and pos > start:
                start = pos
            level += 1
        elif c == "}":
            level -= 1
            if level == 0:
                expr = p[start + 1 : pos]
                m = _count_expression(expr, depth + 1, spec)
                n *= _count_pattern(expr, depth + 1, spec) if m is None else m
                start = pos + 1
        pos += 1
    if level != 0:
        raise UsageError(f"--data-dir {spec}: unbalanced braces; check the pattern")
    return n


def _count_expression(expr: str, depth: int, spec: str) -> int | None:
    """Names of one ``{...}``: a range's length, a list's sum; None when it is neither (then
    the braces are literal and the inside a pattern of its own)."""
    if m := _INT_RANGE.match(expr):
        a, b, step = int(m[1]), int(m[2]), (int(m[3]) or 1) if m[3] else 1
        return abs(b - a) // step + 1
    if m := _CHAR_RANGE.match(expr):
        a, b = _ALPHABET.index(m[1]), _ALPHABET.index(m[2])
        step = min((int(m[3]) or 1) if m[3] else 1, len(_ALPHABET))
        return len(_ALPHABET[a : b + 1 : step] if a < b else _ALPHABET[a : (b or -52) - 1 : -step])
    parts, start, pos, level = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            level += 1
        elif c == "}":
            level -= 1
        elif c == "," and level == 0:
            parts.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if level != 0 or not parts:
        return None
    parts.append(expr[start:])
    return sum(_count_pattern(q, depth, spec) for q in parts)


# ----------------------------------------------------------------------------- reading samples


def _key(name: str) -> str:
    key, _ = _wds().tariterators.base_plus_ext(name)
    return key if key is not None else name


def _wanted(name: str) -> str | None:
    """The member's extension when the reader uses it (an image or the label), else None."""
    _, ext = _wds().tariterators.base_plus_ext(name)
    ext = ext.lower() if ext is not None else None
    return ext if ext in IMAGE_EXTS or ext == "cls" else None


def _members(path: Path, max_member: int) -> Iterator[dict[str, Any]]:
    """The regular members of the tar ``path`` as ``webdataset``'s file samples, then a check
    that the archive ends with its end-of-archive block (Python's tarfile stops quietly at a
    file cut on a member boundary). Only images and labels are read (others pass with empty
    data, so the grouping by key is unchanged), each after its declared size was checked
    against ``max_member`` (``MAX_CLS_BYTES`` for a label)."""
    last = None
    try:
        with open(path, "rb") as f:
            try:
                tf = tarfile.open(fileobj=f, mode="r|")
            except tarfile.TarError as e:
                raise UsageError(
                    f"shard {_show(path)}: not an uncompressed tar archive ({e}); rewrite it as "
                    "a plain .tar"
                ) from e
            for ti in tf:
                tf.members = []  # streamed: keep no member list
                if not ti.isreg():
                    continue
                try:
                    ti.name.encode("utf-8")
                except UnicodeEncodeError:
                    raise UsageError(
                        f"shard {_show(path)}: member name '{_show(os.fsencode(ti.name))}' is "
                        "not UTF-8; rename it (WebDataset keys are text)"
                    ) from None
                if len(ti.name) > _MAX_NAME:
                    raise UsageError(
                        f"shard {_show(path)}: a member name of {len(ti.name)} characters "
                        f"(starting {ti.name[:80]!r}), more than {_MAX_NAME}; rename it"
                    )
                ext = _wanted(ti.name)
                data = b""
                if ext is not None:  # an ignored member is skipped unread, however large
                    cap = MAX_CLS_BYTES if ext == "cls" else max_member
                    if ti.size > cap:
                        raise UsageError(
                            f"shard {_show(path)}, member {ti.name!r}: {ti.size} bytes, more "
                            f"than the {cap} a{' label' if ext == 'cls' else 'n image'} member "
                            "may hold; "
                            + ("raise --max-image-pixels if the images are meant to be that "
                               "big" if ext != "cls" else "rewrite the label")
                        )  # fmt: skip
                    reader = tf.extractfile(ti)
                    data = reader.read(cap + 1) if reader is not None else b""
                last = ti.name
                yield {"fname": ti.name, "data": data, "__url__": str(path)}
            f.seek(tf.offset)
            end = f.read(_BLOCK)
    except (tarfile.TarError, EOFError) as e:
        after = f" at key {_key(last)!r}" if last else ""
        raise UsageError(
            f"shard {_show(path)}: truncated or corrupt tar{after} ({e}); rewrite the shard"
        ) from e
    except OSError as e:
        raise UsageError(f"shard {_show(path)}: cannot read ({e.strerror or e})") from e
    if len(end) < _BLOCK or end.count(0) != _BLOCK:
        after = f"after key {_key(last)!r}" if last else "before its first member"
        raise UsageError(
            f"shard {_show(path)}: truncated tar (it ends {after} without the end-of-archive "
            "block); rewrite the shard"
        )


@dataclass
class _Sample:
    key: str
    ext: str
    image: bytes
    label: int


def _samples(path: Path, max_member: int) -> Iterator[_Sample]:
    """The samples of shard ``path`` in order (``webdataset``'s grouping by key), checked: a
    relative key, one image, an integer ``cls``; a member over ``max_member`` bytes is refused
    before it is read."""
    wds = _wds()
    shard = _show(path)
    members = (m for m in _members(path, max_member) if not _meta(m["fname"]))
    try:
        for s in wds.tariterators.group_by_keys(members):
            key = s["__key__"]
            where = f"shard {shard}, key {key!r}"
            kp = PurePosixPath(key)
            if kp.is_absolute() or ".." in kp.parts or "\0" in key:
                raise UsageError(f"{where}: not a relative name; rename the sample")
            exts = [e for e in IMAGE_EXTS if e in s]
            if len(exts) != 1:
                what = "no image" if not exts else f"{len(exts)} images ({', '.join(exts)})"
                raise UsageError(
                    f"{where}: {what}; a sample needs one image under {'|'.join(IMAGE_EXTS)}"
                )
            if "cls" not in s:
                raise UsageError(f"{where}: no label (cls); every sample needs one")
            try:
                label = int(bytes(s["cls"]).decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                label = -1
            if not 0 <= label < MAX_CLASSES:
                raise UsageError(
                    f"{where}: label (cls) {bytes(s['cls'])[:20]!r} is not an integer in "
                    f"[0, {MAX_CLASSES})"
                )
            yield _Sample(key, exts[0], bytes(s[exts[0]]), label)
    except ValueError as e:  # webdataset: a file name twice within one sample
        raise UsageError(f"shard {shard}: {e}; rewrite the shard") from e


def _meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.endswith("__")  # webdataset skips these


def _open(data: bytes, ext: str, where: str) -> Any:
    """The image, opened by the PNG, JPEG or WebP decoder only (PIL would otherwise try every
    format it knows: TIFF, GIF, ... behind a ``.png``); a file of one of the three under
    another's extension is read as before. UsageError naming ``where``."""
    try:
        return open_pil(data, formats=_DECODERS)  # the cap is checked by the caller (_header)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        kind = next((k for magic, k in _MAGIC if data.startswith(magic)), None)
        if kind is not None and kind not in _DECODERS:
            raise UsageError(
                f"{where}: the .{ext} member holds {kind} data; only PNG, JPEG and WebP images "
                "are read: re-encode the image"
            ) from None
        raise UsageError(
            f"{where}: cannot read the image ({type(e).__name__}: {e}); replace the sample"
        ) from e


def _header(data: bytes, ext: str, where: str, max_pixels: int) -> tuple[int, int]:
    """(H, W) from the image header (nothing decoded); UsageError naming ``where``."""
    with _open(data, ext, where) as im:
        w, h = im.size
    if w * h > max_pixels:
        raise UsageError(
            f"{where}: the image is {w}x{h} = {w * h} pixels, more than the {max_pixels} "
            "allowed; raise the limit (--max-image-pixels) if it is meant to be that big"
        )
    if w < 1 or h < 1:
        raise UsageError(f"{where}: the image is {w}x{h}: empty; replace the sample")
    return h, w


def _decode(
    data: bytes, ext: str, where: str, shape: tuple[int, ...], max_pixels: int
) -> np.ndarray:
    """uint8 (H, W, 3), converted to RGB as torchvision's loader does (and the ImageFolder reader,
    so the same file gives the same bytes)."""
    h, w = _header(data, ext, where, max_pixels)
    if (h, w) != tuple(shape[:2]):
        raise UsageError(
            f"{where}: the image is {w}x{h}, the data set's first is {shape[1]}x{shape[0]}: all "
            "images must have one size"
        )
    try:
        with _open(data, ext, where) as im:
            im.load()
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(
            f"{where}: cannot read the image ({type(e).__name__}: {e}); replace the sample"
        ) from e
    if a.shape != (h, w, 3):
        raise UsageError(f"{where}: decoded {a.shape}, header {w}x{h}; replace the sample")
    return a


# ----------------------------------------------------------------------------- the index


@dataclass
class WebDatasetIndex:
    """What the one pass over the shards found: per shard its path and sample count, every
    sample's key and label, the image shape, and a sha256 over keys, labels and image bytes."""

    source: str
    shards: list[str]
    counts: list[int]
    keys: list[str]
    labels: np.ndarray
    shape: tuple[int, int, int]
    sha256: str

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])


def index_webdataset(
    spec: str | os.PathLike[str], *, limit: int | None = None, max_pixels: int | None = None
) -> WebDatasetIndex:
    """Count and check the samples of the shards of ``spec`` (the first ``limit`` only), in one
    pass that decodes no image."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    paths = expand_shards(spec)
    h = hashlib.sha256()
    shards, counts, keys, labels = [], [], [], []
    shape: tuple[int, int, int] | None = None
    for p in paths:
        if limit is not None and len(keys) >= limit:
            break
        n, seen = 0, set()
        for s in _samples(p, member_cap(max_pixels)):
            where = f"shard {_show(p)}, key {s.key!r}"
            if s.key in seen:
                raise UsageError(f"{where}: the key occurs twice in the shard; rename one")
            seen.add(s.key)
            hw = _header(s.image, s.ext, where, max_pixels)
            if shape is None:
                shape = (hw[0], hw[1], 3)
            elif hw != shape[:2]:
                raise UsageError(
                    f"{where}: the image is {hw[1]}x{hw[0]}, the first is {shape[1]}x{shape[0]}: "
                    "all images of a data set must have one size"
                )
            for part in (s.key.encode(), s.ext.encode(), str(s.label).encode(), s.image):
                h.update(len(part).to_bytes(8, "little") + part)
            keys.append(s.key)
            labels.append(s.label)
            n += 1
            if limit is not None and len(keys) >= limit:
                break
        if n == 0:
            raise UsageError(f"shard {_show(p)}: holds no samples; remove it from --data-dir")
        shards.append(str(p))
        counts.append(n)
    if shape is None:
        raise UsageError(f"--data-dir {_show(spec)}: no samples")
    # the source as recorded (and compared on --resume): absolute, whatever the working folder
    source = "::".join(os.path.abspath(os.path.expanduser(u)) for u in os.fspath(spec).split("::"))
    return WebDatasetIndex(source, shards, counts, keys,
                           np.asarray(labels, dtype=np.int64), shape, h.hexdigest())  # fmt: skip


# ----------------------------------------------------------------------------- the data set


class _StreamedImages:
    """``images[s:e]`` of a `WebDataset`: decoded as the shards stream past. Reading on from
    where the last read stopped continues the open shard; another position reopens the shard
    and skips to it without decoding."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, index: WebDatasetIndex, max_pixels: int) -> None:
        self.index, self.max_pixels = index, max_pixels
        self.shape = (len(index.keys), *index.shape)
        self._starts = index.starts
        self._pos: tuple[int, int] | None = None  # (shard, next position in it) of _it
        self._it: Iterator[_Sample] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, k: int, i: int, j: int) -> Iterator[np.ndarray]:
        """Samples ``i..j-1`` (positions within shard ``k``), decoded."""
        path = Path(self.index.shards[k])
        if self._pos != (k, i) or self._it is None:
            self._it, self._pos = _samples(path, member_cap(self.max_pixels)), (k, 0)
            for _ in range(i):
                next(self._it)
        for pos in range(i, j):
            s = next(self._it, None)
            gid = int(self._starts[k]) + pos
            if s is None or s.key != self.index.keys[gid] or s.label != self.index.labels[gid]:
                self._it = self._pos = None
                raise UsageError(f"shard {_show(path)}: changed while it was read; run again")
            self._pos = (k, pos + 1)
            yield _decode(s.image, s.ext, f"shard {_show(path)}, key {s.key!r}",
                          self.index.shape, self.max_pixels)  # fmt: skip

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            return self[i : i + 1][0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("WebDataset images are read by contiguous slices")
        s, e, _ = key.indices(len(self))
        out = np.empty((max(e - s, 0), *self.index.shape), np.uint8)
        row = 0
        while s < e:
            k = int(np.searchsorted(self._starts, s, side="right") - 1)
            stop = min(e, int(self._starts[k + 1]))
            for a in self._read(k, s - int(self._starts[k]), stop - int(self._starts[k])):
                out[row] = a
                row += 1
            s = stop
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype, copy=False)


@dataclass
class WebDataset(Dataset):
    """A `Dataset` streamed from WebDataset shards: ``images`` decodes on reading, ``index``
    holds the counts, keys and labels of the pass over the shards."""

    index: WebDatasetIndex | None = field(default=None, repr=False)

    @property
    def keys(self) -> list[str]:
        return self.index.keys

    def shard_ranges(self, n: int) -> list[tuple[int, int]]:
        """The input shards' [start, stop) ranges among the first ``n`` images: the output
        shards, so each rank reads whole input shards."""
        st = [int(v) for v in self.index.starts]
        return [(a, min(b, n)) for a, b in zip(st[:-1], st[1:]) if a < n]

    def images_sha256(self, n: int, chunk_bytes: int = 64 << 20) -> str:
        """The index's content hash when it covers exactly the first ``n`` images (no second
        decoding pass), else the decoded images' hash."""
        if n == len(self):
            return self.index.sha256
        return super().images_sha256(n, chunk_bytes)

    def shard_records(self) -> list[dict]:
        return [{"path": p, "count": c} for p, c in zip(self.index.shards, self.index.counts)]

    def describe(self) -> dict:
        return {**super().describe(), "shards": self.shard_records()}


def open_webdataset(
    spec: str | os.PathLike[str] | None,
    split: str = "train",
    *,
    limit: int | None = None,
    max_pixels: int | None = None,
    index: WebDatasetIndex | None = None,
) -> WebDataset:
    """The shards of ``spec`` as a streamed `WebDataset` (``index``: one `index_webdataset`
    already made, e.g. by another rank)."""
    if spec is None:
        raise UsageError("--dataset webdataset needs --data-dir 'shards/{000..099}.tar'")
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if index is None:
        index = index_webdataset(spec, limit=limit, max_pixels=max_pixels)
    k = int(index.labels.max()) + 1
    return WebDataset("webdataset", split, _StreamedImages(index, max_pixels),  # type: ignore[arg-type]
                      index.labels, [str(i) for i in range(k)], index.source,
                      index=index)  # fmt: skip


# ----------------------------------------------------------------------------- writing, reading


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(
    path: str | os.PathLike[str], keys: Sequence[str], images: np.ndarray, labels: np.ndarray
) -> str:
    """One output shard: sample ``i`` is ``keys[i]`` with ``png`` and ``cls``, written atomically
    with `webdataset.TarWriter`; returns the file's sha256."""
    wds = _wds()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=_MTIME, user="", group="") as w:
            for key, im, y in zip(keys, images, labels):
                w.write({"__key__": key, "png": png_bytes(im), "cls": str(int(y)).encode()})
    return file_digest(path)


def read_tar(path: str | os.PathLike[str], shape: tuple[int, ...]) -> tuple[list[str], np.ndarray,
                                                                            np.ndarray]:
    """keys, images (n, H, W, 3) uint8 and labels (n,) int64 of a shard `write_tar` wrote."""
    keys, images, labels = [], [], []
    p = Path(path)
    pixels = int(np.prod(shape[:2]))  # the shard's own image size bounds its members
    for s in _samples(p, member_cap(pixels)):
        keys.append(s.key)
        images.append(_decode(s.image, s.ext, f"shard {_show(p)}, key {s.key!r}", shape, pixels))
        labels.append(s.label)
    x = np.stack(images) if images else np.zeros((0, *shape), np.uint8)
    return keys, x, np.asarray(labels, dtype=np.int64)
