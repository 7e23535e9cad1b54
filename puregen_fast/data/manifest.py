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
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
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

    # -- the mapping view ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None or k == "filter"}

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

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
        def bad(what: str) -> UsageError:
            return UsageError(f"{where}: {what}; rerun purify with the same flags and --resume")

        names = {f.name for f in fields(cls)}
        for key, typ in (("config", dict), ("purifier", dict), ("dataset", dict),
                         ("shards", list)):  # fmt: skip
            if not isinstance(raw.get(key), typ):
                raise bad(f"field {key!r} is missing or not a {typ.__name__}")
        count = raw.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise bad("field 'count' is not a non-negative integer")
        if raw["config"].get("format") not in ("npy", "png"):
            raise bad(f"unknown output format {raw['config'].get('format')!r}")
        ds = raw["dataset"]
        shape = ds.get("image_shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        ):
            raise bad("dataset.image_shape is not three positive integers")
        cn = ds.get("class_names")
        if not isinstance(cn, list) or not all(isinstance(c, str) for c in cn):
            raise bad("dataset.class_names is not a list of names")
        for i, s in enumerate(raw["shards"]):
            _check_shard(s, i, raw["config"]["format"], bad)
        if sum(s["stop"] - s["start"] for s in raw["shards"]) != count:
            raise bad(f"shard ranges do not add up to {count} images")
        return cls(**{k: v for k, v in raw.items() if k in names})


def _check_shard(s: Any, i: int, fmt: str, bad: Any) -> None:
    if not isinstance(s, dict):
        raise bad(f"shards[{i}] is not an object")
    ints = ("index", "start", "stop")
    if not all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) for k in ints):
        raise bad(f"shards[{i}] needs integer index, start and stop")
    if not 0 <= s["start"] <= s["stop"]:
        raise bad(f"shards[{i}] has the range [{s['start']}, {s['stop']})")
    keys = ("images", "labels", "images_sha256", "labels_sha256") if fmt == "npy" else ("sha256",)
    for k in keys:
        if not isinstance(s.get(k), str):
            raise bad(f"shards[{i}].{k} is missing")
    for k in ("images", "labels") if fmt == "npy" else ():
        name = s[k]
        if Path(name).name != name or name in ("", ".", ".."):
            raise bad(f"shards[{i}].{k} {name!r} is not a file name inside the folder")
