"""``puregen-fast purify``: a data set through the `Purifier` into ``--out DIR`` (DESIGN 4, 5).

The selected images are indices ``[0, N)`` of the data set (``N = min(len, --limit)``), cut into
shards of ``--shard-size`` images. Each shard is processed in order in batches of
``--batch-size``, the last partial batch padded (by repeating its last image, with the padding's
results thrown away), so every batch has one shape. The noise is keyed by the global index, so an
image's result depends on the seed, the batch size and its position in its batch only: two runs
with the same flags write identical bytes, also when one was killed and resumed, or split over
``torchrun`` ranks (each rank takes a contiguous run of whole shards, so it forms the same
batches a single process would). The configuration recorded in the output folder (and compared
by ``--resume``) holds the data set's source and a sha256 of the selected images besides the
flags and the models' sha256s, so a resume against changed data is refused.

``--method filt`` first computes the EBM energy of every selected image (in the same padded
batches), takes the ``1 - --filter-frac`` quantile as the threshold, and then purifies the
images whose energy is at least that threshold; the threshold is a global number, so results
do not depend on batching or on the number of ranks. It is saved in the output folder, so a
resumed run does not repeat the energy pass.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the ranks talk through
``torch.distributed`` (gloo on CPU, nccl on CUDA): rank 0 downloads and decodes the data set and
loads the models first, the others then read them from the caches; rank 0 prepares the output
folder; every rank writes its own shards; rank 0 writes ``manifest.json`` once all are done.
All ranks must see one shared ``--out`` folder (and cache) on a shared file system, and every
rank checks that its configuration (data, flags, model sha256s) is rank 0's before anything is
written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from puregen_fast.argtypes import fraction as _fraction
from puregen_fast.argtypes import int_at_least as _int_at_least
from puregen_fast.argtypes import positive_float as _positive_float
from puregen_fast.datasets import DATASETS, SPLITS, Dataset, open_dataset
from puregen_fast.errors import UsageError
from puregen_fast.purifier import METHODS
from puregen_fast.writer import (
    FORMAT_ID,
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    check_out_dir,
    prepare_out_dir,
    rank_shards,
    read_json,
    write_json_atomic,
)

__all__ = ["add_arguments", "run", "purify_dataset", "DEFAULT_BATCH_SIZE", "DEFAULT_SHARD_SIZE"]

DEFAULT_BATCH_SIZE = 256
DEFAULT_SHARD_SIZE = 10_000
FILTER_STATE = ".puregen-filter.json"
_T = TypeVar("_T")


# ----------------------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``purify`` flags: DESIGN section 4 plus --quiet, --overwrite, --shard-size."""
    from puregen_fast.checkpoints import DEFAULT_DDPM, DEFAULT_EBM

    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=DATASETS)
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="where the data set is or is downloaded to (default: the cache, "
        "$PUREGEN_FAST_CACHE or ~/.cache/puregen-fast); imagefolder: the root "
        "folder; npz: the .npz file",
    )
    g.add_argument(
        "--split",
        default="train",
        help="cifar10: train|test; cinic10(-imagenet): train|valid|test; "
        "tinyimagenet: train|val; imagefolder: ROOT/<split> when it exists",
    )
    g.add_argument(
        "--limit",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="purify only the first N images",
    )
    m = p.add_argument_group("method")
    m.add_argument("--method", required=True, choices=METHODS)
    m.add_argument(
        "--ebm", metavar="SRC", default=None, help=f"EBM checkpoint (default {DEFAULT_EBM})"
    )
    m.add_argument(
        "--ddpm",
        metavar="SRC",
        default=None,
        help=f"DDPM checkpoint (default {DEFAULT_DDPM}; for filt only when given)",
    )
    m.add_argument(
        "--ebm-steps",
        type=_int_at_least(1),
        default=150,
        help="Langevin steps (default %(default)s)",
    )
    m.add_argument(
        "--ebm-eps",
        type=_positive_float,
        default=1.25e-2,
        help="Langevin step size (default %(default)s)",
    )
    m.add_argument(
        "--ebm-temp",
        type=_positive_float,
        default=1e-4,
        help="Langevin temperature (default %(default)s)",
    )
    m.add_argument(
        "--ddpm-steps",
        type=_int_at_least(1, 999),
        default=75,
        help="DDPM noising timestep, in [1, 999] (default %(default)s)",
    )
    m.add_argument(
        "--reps",
        type=_int_at_least(1),
        default=1,
        help="reps: rounds of EBM then DDPM (default %(default)s)",
    )
    m.add_argument(
        "--filter-frac",
        type=_fraction,
        default=0.5,
        help="filt: the fraction of highest-energy images purified, in (0, 1]",
    )
    m.add_argument(
        "--jpeg-quality",
        type=_int_at_least(1, 95),
        default=75,
        help="jpeg: quality in [1, 95] (default %(default)s)",
    )
    m.add_argument(
        "--seed",
        type=_int_at_least(0, (1 << 63) - 1),
        default=0,
        help="keys the noise (default %(default)s)",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=DEFAULT_BATCH_SIZE,
        help=f"images per batch (default {DEFAULT_BATCH_SIZE}); results are "
        "bit-identical only for the same batch size",
    )
    r.add_argument(
        "--shard-size",
        type=_int_at_least(1),
        default=DEFAULT_SHARD_SIZE,
        help=f"images per output shard (default {DEFAULT_SHARD_SIZE})",
    )
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--backend", choices=("auto", "reference", "fast"), default="auto")
    r.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    r.add_argument("--format", choices=("npy", "png"), default="npy")
    r.add_argument("--out", metavar="DIR", required=True)
    r.add_argument(
        "--resume",
        action="store_true",
        help="verify finished shards (sha256), redo missing or damaged ones",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier output in --out (with --resume: only if its configuration differs)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def _validate(args: argparse.Namespace) -> None:
    """Checks argparse cannot do alone; before anything is loaded or written."""
    if args.dataset in SPLITS and args.split not in SPLITS[args.dataset]:
        raise UsageError(
            f"--split {args.split!r} is not a split of {args.dataset}; choose one of "
            f"{', '.join(SPLITS[args.dataset])}"
        )
    if args.dataset in ("imagefolder", "npz") and not args.data_dir:
        raise UsageError(f"--dataset {args.dataset} needs --data-dir")
    if args.reps > 1 and args.method != "reps":
        raise UsageError(f"--reps {args.reps} applies only to --method reps")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if args.precision == "bf16" and args.device == "cpu" and args.backend == "fast":
        raise UsageError("--precision bf16 with --backend fast needs --device cuda")


# ----------------------------------------------------------------------------- distribution


class Dist:
    """The process group under torchrun (RANK, WORLD_SIZE, LOCAL_RANK); a no-op when alone."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self._owned = False

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import datetime

        import torch
        import torch.distributed as tdist

        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        d = cls(rank, world, local)
        if not tdist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(local)
            tdist.init_process_group(
                "nccl" if device_type == "cuda" else "gloo",
                timeout=datetime.timedelta(minutes=60),
            )
            d._owned = True
        return d

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        return self.gather(obj if self.rank == 0 else None)[0]

    def check(self, err: BaseException | None) -> None:
        """Collective: raise on every rank when any rank failed (so none waits forever)."""
        msg = None if err is None else (isinstance(err, UsageError), str(err))
        msgs = self.gather(msg)
        if err is not None:
            raise err
        for r, m in enumerate(msgs):
            if m is not None:
                cls = UsageError if m[0] else RuntimeError
                raise cls(f"rank {r}: {m[1]}")

    def staged(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on rank 0 first (downloads, cache fills), then on the other ranks."""
        res: Any = None
        for turn in (True, False):
            err = None
            if (self.rank == 0) == turn:
                try:
                    res = fn()
                except Exception as e:
                    err = e
            self.check(err)
        return res

    def on_rank0(self, fn: Callable[[], _T]) -> _T | None:
        err, res = None, None
        if self.rank == 0:
            try:
                res = fn()
            except Exception as e:
                err = e
        self.check(err)
        return res

    def close(self) -> None:
        if self._owned:
            import torch.distributed as tdist

            tdist.destroy_process_group()
            self._owned = False


# ----------------------------------------------------------------------------- the pipeline


def _batches(start: int, stop: int, bs: int):
    for s in range(start, stop, bs):
        yield s, min(s + bs, stop)


def _padded(images, s: int, e: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [s, e) padded to ``bs`` by repeating the last one, and their sample ids (the
    padding takes the next ids; its results are discarded)."""
    x = np.array(images[s:e])  # a writable copy (torch warns on read-only memmaps)
    if e - s < bs:
        x = np.concatenate([x, np.repeat(x[-1:], bs - (e - s), axis=0)])
    return x, np.arange(s, s + bs, dtype=np.int64)


def _identity(purifier) -> dict:
    """The purifier settings that decide the output bytes (for the resume check): describe()
    without paths, reasons, the threshold (derived) and the device index."""
    d = dict(purifier.describe())
    for k in ("backend_reason", "backend_requested", "filter_threshold"):
        d.pop(k, None)
    d["device"] = str(d.get("device", "")).split(":")[0]
    for k in ("ebm", "ddpm"):
        if isinstance(d.get(k), dict):
            d[k] = {kk: vv for kk, vv in d[k].items() if kk != "source"}
    return d


def _images_sha256(images, n: int, chunk_bytes: int = 64 << 20) -> str:
    """sha256 of the bytes of ``images[:n]`` (C order), read in chunks of about ``chunk_bytes``
    so a memory-mapped data set is never loaded whole."""
    h = hashlib.sha256()
    row = max(1, int(np.prod(images.shape[1:], dtype=np.int64)) * np.dtype(images.dtype).itemsize)
    step = max(1, chunk_bytes // row)
    for s in range(0, n, step):
        h.update(np.ascontiguousarray(images[s : min(s + step, n)]).tobytes())
    return h.hexdigest()


def _check_model_sizes(purifier, shape: list[int]) -> None:
    """Refuse image sizes the models cannot take, before anything is written: the EBM needs H
    and W divisible by 4 * patch_size, the UNet by 2 ** (len(block_out_channels) - 1)."""
    h, w = shape[0], shape[1]
    ebm = getattr(purifier, "ebm", None)
    if ebm is not None:
        m = 4 * int(getattr(ebm, "patch_size", 1))
        if h % m or w % m:
            raise UsageError(
                f"--ebm: this EBM (patch_size {m // 4}) needs image height and width divisible "
                f"by {m}, but the images are {h}x{w} (H x W); use another data set or an EBM "
                "made for this size"
            )
    ddpm = getattr(purifier, "ddpm", None)
    cfg = getattr(ddpm, "config", None)
    if ddpm is not None and isinstance(cfg, dict) and cfg.get("block_out_channels"):
        m = 2 ** (len(cfg["block_out_channels"]) - 1)
        if h % m or w % m:
            raise UsageError(
                f"--ddpm: this UNet ({len(cfg['block_out_channels'])} levels) needs image height "
                f"and width divisible by {m}, but the images are {h}x{w} (H x W); use another "
                "data set or a UNet made for this size"
            )


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _check_same_config(dist: Dist, config: dict) -> None:
    """Collective: every rank must purify with the same recorded configuration (data set and
    its contents, flags, model sha256s); ranks that differ from rank 0 are named on every rank."""
    if dist.world == 1:
        return
    hashes = dist.gather(_config_hash(config))
    bad = [r for r, v in enumerate(hashes) if v != hashes[0]]
    if bad:
        raise UsageError(
            f"rank(s) {', '.join(map(str, bad))} of {dist.world} purify with another "
            "configuration than rank 0 (data set, flags or checkpoints differ); give every rank "
            "the same flags, --data-dir and model files"
        )


def _write_out(out: Path, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)``, with a failed write into ``--out`` (read-only, full disk) as UsageError."""
    try:
        return fn(*args)
    except OSError as e:
        raise UsageError(
            f"--out {out}: cannot write ({e}); choose a writable folder with enough free space"
        ) from e


def _device_info(purifier) -> dict:
    import torch

    dev = getattr(purifier, "device", None)
    info: dict[str, Any] = {"device": str(dev), "torch": torch.__version__}
    if dev is not None and getattr(dev, "type", "") == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def purify_dataset(
    dataset: Dataset,
    purifier,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    fmt: str = "npy",
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    limit: int | None = None,
    dist: Dist | None = None,
    extra_manifest: dict | None = None,
) -> Path:
    """Purify images ``[0, min(len(dataset), limit))`` of ``dataset`` with ``purifier`` into
    ``out_dir`` (see the module docstring for layout and guarantees). Under torchrun each rank
    calls it with its own purifier; returns the output folder."""
    from tqdm.auto import tqdm

    from puregen_fast import __version__

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if fmt not in ("npy", "png"):
        raise UsageError(f"--format {fmt!r}: choose npy or png")
    own_dist = dist is None
    if dist is None:
        dist = Dist.from_env(getattr(getattr(purifier, "device", None), "type", "cpu"))
    t0 = time.perf_counter()
    try:
        out = Path(out_dir)
        n = len(dataset) if limit is None else min(len(dataset), limit)
        if n == 0:
            raise UsageError(f"data set {dataset.name}/{dataset.split} has no images")
        labels = np.asarray(dataset.labels[:n], dtype=np.int64)
        shape = [int(v) for v in dataset.images.shape[1:]]
        method = getattr(purifier, "method", "?")
        config = {
            "format": fmt,
            "dataset": dataset.name,
            "split": dataset.split,
            "source": dataset.source,
            "num_images": n,
            "limit": limit,
            "image_shape": shape,
            "class_names": list(dataset.class_names),
            "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
            "images_sha256": _images_sha256(dataset.images, n),
            "batch_size": batch_size,
            "shard_size": shard_size,
            "method": method,
            "seed": getattr(purifier, "seed", None),
            "purifier": _identity(purifier),
        }
        _check_same_config(dist, config)
        _check_model_sizes(purifier, shape)
        writer = ShardWriter(out, fmt, n, shard_size, dataset.class_names)

        def prepare() -> bool:
            reuse = prepare_out_dir(out, config, resume=resume, overwrite=overwrite)
            _write_out(out, writer.make_class_dirs)
            return reuse

        reuse = bool(dist.broadcast(dist.on_rank0(prepare)))
        mine = rank_shards(writer.num_shards, dist.rank, dist.world)
        show = not quiet and dist.rank == 0

        # finished shards of an earlier run: verify, keep the good ones
        records: dict[int, dict] = {}
        if reuse:
            for k in mine:
                s, e = writer.ranges[k]
                rec = writer.verify_shard(k, labels[s:e])
                if rec is not None:
                    records[k] = rec
        todo = [k for k in mine if k not in records]

        # filt: one global threshold from the energies of all selected images
        t_energy = 0.0
        filt: dict | None = None
        if method == "filt":
            t1 = time.perf_counter()
            saved = read_json(out / FILTER_STATE) if reuse else None
            if saved is not None and (
                saved.get("num_images") != n
                or saved.get("images_sha256") != config["images_sha256"]
            ):
                saved = None
            filt = dist.broadcast(saved)
            if filt is None:
                energies = []
                my_n = sum(writer.ranges[k][1] - writer.ranges[k][0] for k in mine)
                with tqdm(
                    total=my_n, unit="img", desc="energy", disable=not show, dynamic_ncols=True
                ) as bar:
                    for k in mine:
                        for s, e in _batches(*writer.ranges[k], batch_size):
                            x, ids = _padded(dataset.images, s, e, batch_size)
                            energies.append(np.asarray(purifier.energy(x, ids))[: e - s])
                            bar.update(e - s)
                mine_e = np.concatenate(energies) if energies else np.zeros(0)
                all_e = np.concatenate([np.asarray(a, np.float64) for a in dist.gather(mine_e)])
                thr = float(np.quantile(all_e, 1.0 - purifier.filter_frac))
                filt = {
                    "num_images": n,
                    "images_sha256": config["images_sha256"],
                    "threshold": thr,
                    "filter_frac": purifier.filter_frac,
                    "num_purified": int((all_e >= thr).sum()),
                    "energies_sha256": hashlib.sha256(all_e.tobytes()).hexdigest(),
                }
                dist.on_rank0(lambda: _write_out(out, write_json_atomic, out / FILTER_STATE, filt))
            purifier.filter_threshold = float(filt["threshold"])
            t_energy = time.perf_counter() - t1

        # purify, shard by shard, batch by batch
        t2 = time.perf_counter()
        my_total = sum(writer.ranges[k][1] - writer.ranges[k][0] for k in mine)
        done = sum(writer.ranges[k][1] - writer.ranges[k][0] for k in records)
        desc = "purify" if dist.world == 1 else f"purify (rank 0 of {dist.world})"
        err: BaseException | None = None
        purified = 0
        try:
            with tqdm(
                total=my_total,
                initial=done,
                unit="img",
                desc=desc,
                disable=not show,
                dynamic_ncols=True,
            ) as bar:
                for k in todo:
                    s0, e0 = writer.ranges[k]
                    res = np.empty((e0 - s0, *shape), dtype=np.uint8)
                    for s, e in _batches(s0, e0, batch_size):
                        x, ids = _padded(dataset.images, s, e, batch_size)
                        y = purifier(x, ids)
                        res[s - s0 : e - s0] = np.asarray(y)[: e - s]
                        bar.update(e - s)
                        purified += e - s
                    records[k] = _write_out(out, writer.write_shard, k, res, labels[s0:e0])
        except Exception as e:  # tell the other ranks, so none waits at the barrier
            err = e
        t_purify = time.perf_counter() - t2
        dist.check(err)

        # barrier: every rank's records and timings to rank 0, which writes the manifest
        timing = {
            "rank": dist.rank,
            "shards_written": len(todo),
            "shards_reused": len(mine) - len(todo),
            "images_purified": purified,
            "energy_s": round(t_energy, 4),
            "purify_s": round(t_purify, 4),
            "images_per_s": round(purified / t_purify, 3) if t_purify > 0 and purified else None,
        }
        gathered = dist.gather((records, timing))
        if dist.rank == 0:
            all_records: dict[int, dict] = {}
            for recs, _ in gathered:
                all_records.update(recs)
            shards = [all_records[k] for k in range(writer.num_shards)]
            counts = np.bincount(labels, minlength=len(dataset.class_names))
            total = time.perf_counter() - t0
            ranks = [t for _, t in gathered]
            n_purified = sum(t["images_purified"] for t in ranks)
            slowest = max(t["purify_s"] for t in ranks)
            manifest = {
                "format": FORMAT_ID,
                "format_version": FORMAT_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "config": config,
                "purifier": purifier.describe(),
                "dataset": {
                    **dataset.describe(),
                    "num_images_selected": n,
                    "label_counts": [int(c) for c in counts],
                },
                "count": n,
                "shards": shards,
                "filter": filt,
                "device": _device_info(purifier),
                "backend": getattr(purifier, "backend", None),
                "world_size": dist.world,
                "timings": {
                    "total_s": round(total, 4),
                    "purify_s": round(slowest, 4),
                    "images_purified": n_purified,
                    "images_per_s": round(n_purified / slowest, 3) if slowest > 0 else None,
                    "ranks": ranks,
                },
                "versions": {
                    "puregen_fast": __version__,
                    "numpy": np.__version__,
                    "python": platform.python_version(),
                    **({"torch": _device_info(purifier)["torch"]}),
                },
                **(extra_manifest or {}),
            }
            _write_out(out, write_json_atomic, out / MANIFEST, manifest)
            if show:
                rate = manifest["timings"]["images_per_s"]
                print(
                    f"purify: {n} images in {len(shards)} shard(s) -> {out} "
                    f"({n_purified} purified now in {slowest:.1f}s"
                    + (f", {rate:.1f} img/s" if rate else "")
                    + ")",
                    file=sys.stderr,
                )
        dist.check(None)  # nobody returns before the manifest exists
        return out
    finally:
        if own_dist:
            dist.close()


# ----------------------------------------------------------------------------- the command


def _build_purifier(args: argparse.Namespace, device: str):
    import puregen_fast as pg
    from puregen_fast.checkpoints import DEFAULT_DDPM, DEFAULT_EBM

    needs_ebm = args.method in ("ebm", "ebm+ddpm", "reps", "filt")
    needs_ddpm = args.method in ("ddpm", "ebm+ddpm", "reps") or (
        args.method == "filt" and args.ddpm is not None
    )
    ebm = pg.load_ebm(args.ebm or DEFAULT_EBM) if needs_ebm else None
    ddpm = pg.load_ddpm(args.ddpm or DEFAULT_DDPM) if needs_ddpm else None
    try:
        return pg.Purifier(
            method=args.method,
            ebm=ebm,
            ddpm=ddpm,
            ebm_steps=args.ebm_steps,
            ddpm_steps=args.ddpm_steps,
            reps=args.reps,
            seed=args.seed,
            device=device,
            backend=args.backend,
            precision=args.precision,
            ebm_eps=args.ebm_eps,
            ebm_temp=args.ebm_temp,
            filter_frac=args.filter_frac,
            jpeg_quality=args.jpeg_quality,
        )
    except ValueError as e:
        flag = "--backend" if "backend" in str(e) else "--device" if "device" in str(e) else None
        raise UsageError(f"{flag + ': ' if flag else ''}{e}") from e


def run(args: argparse.Namespace) -> int:
    """The ``purify`` subcommand."""
    import torch

    _validate(args)
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    dist = Dist.from_env("cuda" if cuda else "cpu")
    try:
        device = args.device
        if cuda and dist.world > 1:
            device = f"cuda:{dist.local_rank}"
        out = Path(args.out).expanduser()
        dist.on_rank0(lambda: check_out_dir(out, resume=args.resume, overwrite=args.overwrite))
        t0 = time.perf_counter()
        purifier = dist.staged(lambda: _build_purifier(args, device))
        t_models = time.perf_counter() - t0
        dataset = dist.staged(
            lambda: open_dataset(args.dataset, args.data_dir, args.split, quiet=args.quiet)
        )
        t_data = time.perf_counter() - t0 - t_models
        cli = {
            k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and k != "command"
        }
        cli["out"] = str(out.absolute())
        purify_dataset(
            dataset,
            purifier,
            out,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            fmt=args.format,
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
            limit=args.limit,
            dist=dist,
            extra_manifest={
                "command": cli,
                "setup_timings": {"models_s": round(t_models, 4), "data_s": round(t_data, 4)},
            },
        )
    finally:
        dist.close()
    return 0
