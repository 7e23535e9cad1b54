"""The manifest of a purified output folder (``manifest.json``): one typed record, written by the
pipeline, read by `load_purified` and by the evaluation.

It holds the exact configuration (``config``: flags, data set source and content hashes), the
engine's description (``purifier``: method, models' sha256, backend), the data set (class names,
image shape, label counts), ``count`` images in ``shards`` (each with its index range and
sha256s), the filt threshold record, the device, timings and versions. `Manifest.read` checks
the structure the readers rely on and names the file and the field when it is wrong.
"""

from __future__ import annotations

import datetime as _dt
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from puregen_fast.data.io import atomic_write_json, read_json
from puregen_fast.errors import UsageError

__all__ = ["MANIFEST", "FORMAT_ID", "FORMAT_VERSION", "Manifest"]

MANIFEST = "manifest.json"
FORMAT_ID = "puregen-fast/purified"
FORMAT_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest(Mapping):
    """The manifest; also a read-only mapping of its JSON form (``m["timings"]``)."""

    config: dict[str, Any]
    purifier: dict[str, Any]
    dataset: dict[str, Any]
    count: int
    shards: list[dict[str, Any]]
    filter: dict[str, Any] | None = None
    device: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    world_size: int = 1
    timings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    command: dict[str, Any] | None = None
    setup_timings: dict[str, Any] | None = None
    created: str = field(default_factory=_now)
    format: str = FORMAT_ID
    format_version: int = FORMAT_VERSION

    # -- the mapping view: the keys of `to_json`, without copying the values -----------------
    def _keys(self) -> list[str]:
        return [f.name for f in fields(self) if _written(f.name, getattr(self, f.name))]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if _written(k, v)}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    # -- what readers use ---------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.dataset["class_names"]]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.dataset["image_shape"])

    @property
    def out_format(self) -> str:
        return str(self.config["format"])

    @property
    def method(self) -> str:
        return str(self.purifier.get("method") or self.config.get("method", "?"))

    # -- files --------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """The manifest in ``path``; UsageError naming the file (and field) when it is missing,
        unreadable, another tool's or malformed."""
        p = Path(path)
        raw = read_json(p)
        if raw is None:
            raise UsageError(
                f"{p}: missing or unreadable; the output is not finished "
                "(rerun purify with --resume)"
            )
        if raw.get("format") != FORMAT_ID:
            raise UsageError(f"{p}: not a puregen-fast purify manifest")
        return cls.from_json(raw, p)

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path | str = MANIFEST) -> Manifest:
        """The manifest of its JSON form; UsageError naming ``where`` and the field when a field
        is missing, of another type than the class declares, or inconsistent."""

        def bad(what: str) -> UsageError:
            return UsageError(f"{where}: {what}; rerun purify with the same flags and --resume")

        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in raw:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise bad(f"field {f.name!r} is missing")
                continue
            allowed = _classes(hints[f.name])
            v = raw[f.name]
            if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
                want = " or ".join(_JSON_KIND.get(t, t.__name__) for t in allowed)
                got = _JSON_KIND.get(type(v), type(v).__name__)
                raise bad(f"field {f.name!r} is {got}, expected {want}")
        count = raw["count"]
        if count < 0:
            raise bad("field 'count' is negative")
        if raw.get("world_size", 1) < 1:
            raise bad("field 'world_size' is below 1")
        fmt = raw["config"].get("format")
        if fmt not in ("npy", "png", "webdataset"):
            raise bad(f"unknown output format {fmt!r}")
        ds = raw["dataset"]
        shape = ds.get("image_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_positive(v) for v in shape)):
            raise bad("dataset.image_shape is not three positive integers")
        cn = ds.get("class_names")
        if not isinstance(cn, list) or not all(isinstance(c, str) for c in cn):
            raise bad("dataset.class_names is not a list of names")
        stop = 0  # shards cover [0, count) in order, as the writer lays them out
        for i, s in enumerate(raw["shards"]):
            _check_shard(s, i, fmt, bad)
            if s["start"] != stop:
                raise bad(f"shards[{i}] starts at {s['start']}, expected {stop}")
            stop = s["stop"]
        if stop != count:
            raise bad(f"shard ranges do not add up to {count} images")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


_JSON_KIND = {dict: "an object", list: "an array", str: "a string", int: "an integer",
              float: "a number", bool: "true/false", type(None): "null"}  # fmt: skip


def _written(key: str, value: Any) -> bool:
    """Whether ``key`` is in the JSON form: unset optional fields are left out, except the filt
    record, whose null says that no filter ran."""
    return value is not None or key == "filter"


def _classes(annotation: Any) -> tuple[type, ...]:
    """The runtime classes an annotation allows: ``dict[str, Any] | None`` -> (dict, NoneType)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    parts = typing.get_args(annotation) if union else (annotation,)
    return tuple(typing.get_origin(a) or a for a in parts)


def _positive(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_shard(s: Any, i: int, fmt: str, bad: Callable[[str], UsageError]) -> None:
    if not isinstance(s, dict):
        raise bad(f"shards[{i}] is not an object")
    ints = ("index", "start", "stop")
    if not all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) for k in ints):
        raise bad(f"shards[{i}] needs integer index, start and stop")
    if not 0 <= s["start"] <= s["stop"]:
        raise bad(f"shards[{i}] has the range [{s['start']}, {s['stop']})")
    files = {"npy": ("images", "labels"), "webdataset": ("tar",)}.get(fmt, ())
    keys = ("images", "labels", "images_sha256", "labels_sha256") if fmt == "npy" else ("sha256",)
    for k in (*keys, *files):
        if not isinstance(s.get(k), str):
            raise bad(f"shards[{i}].{k} is missing")
    for k in files:
        name = s[k]  # joined to the output folder: a bare file name, nothing that leads out
        if Path(name).name != name or name in ("", ".", "..") or "\0" in name:
            raise bad(f"shards[{i}].{k} {name!r} is not a file name inside the folder")
