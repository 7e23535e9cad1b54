"""``puregen-fast purify``: a data set through the `Purifier` into ``--out DIR`` (DESIGN 4, 5).

The selected images are indices ``[0, N)`` of the data set (``N = min(len, --limit)``), cut into
shards of ``--shard-size`` images (WebDataset input: one output shard per input shard, so each
rank streams whole input shards; the images' sha256 is the one the pass over the shards took,
and the per-shard counts are part of the recorded configuration). Each shard is processed in
order in batches of ``--batch-size``, the last partial batch padded (by repeating its last
image, with the padding's results thrown away), so every batch has one shape. The noise is
keyed by the global index, so an image's result depends on the seed, the batch size and its
position in its batch only: two runs with the same flags write identical bytes, also when one
was killed and resumed, or split over ``torchrun`` ranks (each rank takes a contiguous run of
whole shards, so it forms the same batches a single process would). The configuration recorded
in the output folder (and compared by ``--resume``) holds the data set's source and a sha256 of
the selected images besides the flags and the models' sha256s, so a resume against changed data
is refused.

``--method filt`` first computes the EBM energy of every selected image (in the same padded
batches), takes the ``1 - --filter-frac`` quantile as the threshold, and then purifies the
images whose energy is at least that threshold; the threshold is a global number, so results
do not depend on batching or on the number of ranks. It is saved in the output folder, so a
resumed run does not repeat the energy pass. A non-finite energy is a divergence (DESIGN 2.4):
no image could be ranked, so every rank stops and nothing is written, not even the threshold.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the ranks talk through
``torch.distributed`` (gloo on CPU, nccl on CUDA): rank 0 downloads and decodes the data set and
loads the models first, the others then read them from the caches; rank 0 prepares the output
folder; every rank writes its own shards; rank 0 writes ``manifest.json`` once all are done.
All ranks must see one shared ``--out`` folder (and cache) on a shared file system, and every
rank checks that its configuration (data, flags, model sha256s) is rank 0's before anything is
written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from tqdm.auto import tqdm

from puregen_fast import methods
from puregen_fast.config import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, FORMATS, EngineConfig
from puregen_fast.data.datasets import Dataset
from puregen_fast.data.io import atomic_write_json, read_json
from puregen_fast.data.lock import out_lock
from puregen_fast.data.manifest import MANIFEST, Manifest
from puregen_fast.data.preview import MAX_PREVIEW, PREVIEW, Preview, preview_ids, read_rows
from puregen_fast.data.writer import ShardWriter, mark_diverged, prepare_out_dir, rank_shards
from puregen_fast.dist import Dist
from puregen_fast.errors import DivergenceError, UsageError
from puregen_fast.runtime import describe_device
from puregen_fast.version import __version__

if TYPE_CHECKING:
    import torch

__all__ = ["Engine", "purify_dataset", "filter_cut", "FILTER_STATE"]

FILTER_STATE = ".puregen-filter.json"
_T = TypeVar("_T")


class Engine(Protocol):
    """What the pipeline (and `puregen_fast.scan` on its runs) uses of the engine it is given:
    `puregen_fast.purifier.Purifier` is one; so is a wrapper that keeps these (a test's spy)."""

    config: EngineConfig  # the method, seed and filter_frac recorded and used here
    device: torch.device
    backend: str  # the backend that runs ("fast" compiles on its first batch)
    chain_steps: int  # the chain steps one call runs, what ``progress`` counts to

    def __call__(self, images: np.ndarray, sample_ids: np.ndarray, *,
                 filter_threshold: float | None = None,
                 progress: Callable[[int], None] | None = None) -> Any: ...  # fmt: skip

    def energy(self, images: np.ndarray, sample_ids: np.ndarray | None = None) -> np.ndarray: ...

    def plan(self, images: int) -> None: ...

    def check_image_size(self, h: int, w: int) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def identity(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------- helpers


def _batches(start: int, stop: int, bs: int) -> Iterator[tuple[int, int]]:
    for s in range(start, stop, bs):
        yield s, min(s + bs, stop)


def _padded(images, s: int, e: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [s, e) padded to ``bs`` by repeating the last one, and their sample ids (the
    padding takes the next ids; its results are discarded)."""
    x = np.array(images[s:e])  # a writable copy (torch warns on read-only memmaps)
    if e - s < bs:
        x = np.concatenate([x, np.repeat(x[-1:], bs - (e - s), axis=0)])
    return x, np.arange(s, s + bs, dtype=np.int64)



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


def _check_options(batch_size: int, shard_size: int, limit: int | None, fmt: str) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")


def _check_preview(preview: int) -> None:
    ok = isinstance(preview, int) and not isinstance(preview, bool)
    if not (ok and 1 <= preview <= MAX_PREVIEW):
        raise UsageError(f"--preview must be an integer in [1, {MAX_PREVIEW}], got {preview!r}")


# ----------------------------------------------------------------------------- the steps


@dataclass
class _Run:
    """What one purify run is: the selection, its recorded configuration, the writer, this
    rank's shards. Built once by `_plan`; the steps below read it and never write it."""

    dataset: Dataset
    purifier: Engine
    out: Path
    n: int
    labels: np.ndarray
    shape: list[int]
    config: dict
    writer: ShardWriter
    mine: range
    batch_size: int
    dist: Dist
    show: bool

    def size(self, shards) -> int:
        return sum(self.writer.ranges[k][1] - self.writer.ranges[k][0] for k in shards)

    def batches(self, k: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Shard ``k``'s padded batches: (start, stop, images, ids)."""
        for s, e in _batches(*self.writer.ranges[k], self.batch_size):
            yield (s, e, *_padded(self.dataset.images, s, e, self.batch_size))

    def bar(self, total: int, desc: str, initial: int = 0, per_image: int = 1) -> tqdm:
        """A bar of ``total`` images. ``per_image`` > 1: it counts image-steps (an image times
        the engine's chain steps) and shows images to a tenth, so it moves within a batch and
        its rate and ETA are right from the first steps; redrawn at most 4 times a second."""
        kw: dict[str, Any] = {}
        if per_image > 1:
            kw = {"unit_scale": 1 / per_image, "bar_format": _STEP_BAR}
        return tqdm(total=total * per_image, initial=initial * per_image, unit="img", desc=desc,
                    disable=not self.show, dynamic_ncols=True, mininterval=0.25,
                    **kw)  # fmt: skip


# images to a tenth (tqdm's own format would print the scaled count's every float digit)
_STEP_BAR = ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} [{elapsed}<{remaining}, "
             "{rate_fmt}{postfix}]")  # fmt: skip


class _Steps:
    """``progress`` for one batch of ``images`` real images: each chain step the engine reports
    moves the bar by ``images`` image-steps (host-side counting: the device is never read);
    `finish` completes the batch exactly, whatever was reported (filt may run no step)."""

    def __init__(self, bar: tqdm, images: int, per_image: int) -> None:
        self.bar, self.images, self.left = bar, images, per_image

    def __call__(self, k: int) -> None:
        k = min(int(k), self.left)
        if k > 0:
            self.left -= k
            self.bar.update(k * self.images)

    def finish(self) -> None:
        self(self.left)


def _plan(
    dataset: Dataset, purifier: Engine, out: Path, dist: Dist, *, batch_size: int,
    shard_size: int, fmt: str, limit: int | None, quiet: bool,
) -> _Run:  # fmt: skip
    """The run's configuration (what `--resume` compares), checked on every rank."""
    n = len(dataset) if limit is None else min(len(dataset), limit)
    if n == 0:
        raise UsageError(f"data set {dataset.name}/{dataset.split} has no images")
    batch_size = min(batch_size, n)  # never pad past the data set (the bytes depend on it)
    purifier.plan(n)  # backend auto on a CPU weighs the work (before the identity)
    labels = np.asarray(dataset.labels[:n], dtype=np.int64)
    shape = [int(v) for v in dataset.images.shape[1:]]
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
        "images_sha256": dataset.images_sha256(n),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "method": purifier.config.method,
        "seed": purifier.config.seed,
        "purifier": purifier.identity(),  # what decides the bytes, for the resume check
    }
    if (input_shards := dataset.shard_records()) is not None:
        config["input_shards"] = input_shards
    _check_same_config(dist, config)
    # image sizes the models cannot take are refused before anything is written: the engine's
    # own check (`puregen_fast.purifier.check_image_size`), the one Ray's `PurifyBatches` meets
    purifier.check_image_size(shape[0], shape[1])
    writer = ShardWriter(out, fmt, n, shard_size, dataset.class_names,
                         ranges=dataset.shard_ranges(n), keys=dataset.keys)  # fmt: skip
    return _Run(dataset, purifier, out, n, labels, shape, config, writer,
                rank_shards(writer.num_shards, dist.rank, dist.world), batch_size, dist,
                show=not quiet and dist.is_main)  # fmt: skip


def _prepare(run: _Run, resume: bool, overwrite: bool) -> tuple[bool, dict[int, dict]]:
    """Rank 0 readies ``--out``; every rank keeps the finished shards of an earlier run of the
    same configuration that verify (sha256). Returns whether the folder is reused, and the kept
    shards' records by shard index."""

    def prepare() -> bool:
        reuse = prepare_out_dir(run.out, run.config, resume=resume, overwrite=overwrite)
        _write_out(run.out, run.writer.make_class_dirs)
        return reuse

    reuse = bool(run.dist.broadcast(run.dist.on_rank0(prepare)))
    records: dict[int, dict] = {}
    for k in run.mine if reuse else ():
        s, e = run.writer.ranges[k]
        rec = run.writer.verify_shard(k, run.labels[s:e])
        if rec is not None:
            records[k] = rec
    return reuse, records


def _saved_filter(run: _Run) -> dict | None:
    saved = read_json(run.out / FILTER_STATE)
    if saved is None or saved.get("num_images") != run.n:
        return None
    thr = saved.get("threshold")
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not math.isfinite(thr):
        return None  # e.g. a NaN an earlier version wrote: compute it again
    return saved if saved.get("images_sha256") == run.config["images_sha256"] else None


def filter_cut(energies: np.ndarray, frac: float) -> float:
    """filt's global threshold: the ``1 - frac`` quantile of the data set's energies (numpy's
    linear interpolation); the images at or above it are purified. One definition, so ``scan``
    draws the cut that ``purify --method filt`` takes."""
    return float(np.quantile(np.asarray(energies, np.float64), 1.0 - frac))


def _filter_threshold(run: _Run, reuse: bool) -> dict:
    """filt: one global threshold, the ``1 - filter_frac`` quantile of the energies of every
    selected image (over all ranks), saved so a resumed run does not repeat the pass."""
    filt = run.dist.broadcast(_saved_filter(run) if reuse else None)
    if filt is not None:
        return filt
    energies = []
    diverged: tuple[str, list[int]] | None = None
    try:
        with run.bar(run.size(run.mine), "energy") as bar:
            for k in run.mine:
                for s, e, x, ids in run.batches(k):
                    energies.append(np.asarray(run.purifier.energy(x, ids))[: e - s])
                    bar.update(e - s)
    except DivergenceError as err:  # non-finite energies: every rank raises it (after gather)
        diverged = (str(err), list(err.sample_ids))
    mine = np.concatenate(energies) if energies else np.zeros(0)
    gathered = run.dist.gather((mine, diverged))
    for _, d in gathered:
        if d is not None:
            raise DivergenceError(d[0], d[1])
    all_e = np.concatenate([np.asarray(a, np.float64) for a, _ in gathered])
    if not np.isfinite(all_e).all():  # a purifier without the engine's own check
        bad = [i for i, v in enumerate(all_e) if not math.isfinite(v)]
        raise DivergenceError(
            f"the EBM's energy is non-finite for {len(bad)} image(s) (first sample ids "
            f"{bad[:8]}): filt cannot rank them, so nothing was purified or written. Likely "
            f"cause: the EBM (--ebm): check that it is the trained checkpoint you meant",
            bad,
        )
    frac = run.purifier.config.filter_frac
    thr = filter_cut(all_e, frac)
    filt = {
        "num_images": run.n,
        "images_sha256": run.config["images_sha256"],
        "threshold": thr,
        "filter_frac": frac,
        "num_purified": int((all_e >= thr).sum()),
        "energies_sha256": hashlib.sha256(all_e.tobytes()).hexdigest(),
    }
    run.dist.on_rank0(lambda: _write_out(run.out, atomic_write_json, run.out / FILTER_STATE, filt))
    return filt


COMPILING = "compiling the fast path (first run; cached after)"


def _purify_shards(
    run: _Run, records: dict[int, dict], threshold: float | None
) -> tuple[int, float | None, int]:
    """Purify and write this rank's unfinished shards, batch by batch; returns the images
    purified, the first batch's seconds (the warm-up: compiling or loading the fast path) and
    its images. Each shard is written whole (files, then its completion record) before the
    next."""
    kw = {} if threshold is None else {"filter_threshold": threshold}
    todo = [k for k in run.mine if k not in records]
    desc = "purify" if run.dist.world == 1 else f"purify (rank 0 of {run.dist.world})"
    purified, first_s, first_n = 0, None, 0
    fast = run.purifier.backend == "fast"
    # the bar counts image-steps, so a long batch moves it (quiet: no callback at all)
    per = max(1, run.purifier.chain_steps) if run.show else 1
    with run.bar(run.size(run.mine), desc, initial=run.size(records), per_image=per) as bar:
        for k in todo:
            s0, e0 = run.writer.ranges[k]
            res = np.empty((e0 - s0, *run.shape), dtype=np.uint8)
            for s, e, x, ids in run.batches(k):
                if first_s is None and fast:  # not a silent 0/N while inductor compiles
                    bar.set_postfix_str(COMPILING)
                steps = _Steps(bar, e - s, per)
                t = time.perf_counter()
                pkw = {"progress": steps} if per > 1 else {}
                res[s - s0 : e - s0] = np.asarray(run.purifier(x, ids, **kw, **pkw))[: e - s]
                if first_s is None:
                    first_s, first_n = time.perf_counter() - t, e - s
                    if fast:
                        bar.set_postfix_str("", refresh=False)
                steps.finish()
                purified += e - s
            records[k] = _write_out(run.out, run.writer.write_shard, k, res, run.labels[s0:e0])
    return purified, first_s, first_n


def _write_manifest(
    run: _Run, records: list[dict], ranks: list[dict], filt: dict | None, total_s: float,
    extra: dict,
) -> Manifest:  # fmt: skip
    """Rank 0, once every rank is done: the manifest, written last."""
    purifier = run.purifier
    counts = np.bincount(run.labels, minlength=len(run.dataset.class_names))
    n_purified = sum(t["images_purified"] for t in ranks)
    slowest = max(t["purify_s"] for t in ranks)
    description = purifier.describe()
    if filt is not None:
        description["filter_threshold"] = filt["threshold"]
    device = describe_device(purifier.device)
    manifest = Manifest(
        config=run.config,
        purifier=description,
        dataset={
            **run.dataset.describe(),
            "num_images_selected": run.n,
            "label_counts": [int(c) for c in counts],
        },
        count=run.n,
        shards=records,
        filter=filt,
        device=device,
        backend=purifier.backend,
        world_size=run.dist.world,
        timings={
            "total_s": round(total_s, 4),
            "purify_s": round(slowest, 4),
            "images_purified": n_purified,
            "images_per_s": round(n_purified / slowest, 3) if slowest > 0 else None,
            # the first batch of each rank, apart (compiling the fast path, or loading it from
            # the compile cache); ranks[i] has each rank's rate after it
            "warmup_s": max((t["warmup_s"] for t in ranks if t.get("warmup_s") is not None),
                            default=None),  # fmt: skip
            "ranks": ranks,
        },
        versions={
            "puregen_fast": __version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "torch": device["torch"],
        },
        command=extra.get("command"),
        setup_timings=extra.get("setup_timings"),
    )
    _write_out(run.out, manifest.write, run.out / MANIFEST)
    if run.show:
        rate = manifest.timings["images_per_s"]
        print(
            f"purify: {run.n} images in {len(records)} shard(s) -> {run.out} "
            f"({n_purified} {'through filt' if filt else 'purified'} now in {slowest:.1f}s"
            + (f", {rate:.1f} img/s" if rate else "")
            # filt changes only the images at or above the threshold: say how many, of all
            + (f"; {filt['num_purified']} of {run.n} at or above the energy threshold "
               f"{filt['threshold']:.6g}, the others unchanged" if filt else "")
            + ")",
            file=sys.stderr,
        )
    return manifest


# ----------------------------------------------------------------------------- the pipeline


def purify_dataset(
    dataset: Dataset,
    purifier: Engine,
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
    preview: int | None = None,
) -> Path:
    """Purify images ``[0, min(len(dataset), limit))`` of ``dataset`` with ``purifier`` into
    ``out_dir`` (see the module docstring for layout and guarantees). Under torchrun each rank
    calls it with its own purifier; returns the output folder. ``extra_manifest`` may carry the
    ``command`` and ``setup_timings`` records of the command line. ``preview=N`` writes
    ``preview.png`` (`puregen_fast.data.preview`) once every shard is written: N images evenly
    spaced over the selection, before and after."""
    _check_options(batch_size, shard_size, limit, fmt)
    if preview is not None:
        _check_preview(preview)
    own_dist = dist is None
    if dist is None:
        dist = Dist.from_env(purifier.device)
    try:
        return _run(dataset, purifier, Path(out_dir), dist, batch_size=batch_size,
                    shard_size=shard_size, fmt=fmt, resume=resume, overwrite=overwrite,
                    quiet=quiet, limit=limit, extra=extra_manifest or {},
                    preview=preview)  # fmt: skip
    finally:
        if own_dist:
            dist.close()


def _run(
    dataset: Dataset, purifier: Engine, out: Path, dist: Dist, *, batch_size: int,
    shard_size: int, fmt: str, resume: bool, overwrite: bool, quiet: bool, limit: int | None,
    extra: dict,
    preview: int | None = None,
) -> Path:  # fmt: skip
    t0 = time.perf_counter()
    run = _plan(dataset, purifier, out, dist, batch_size=batch_size, shard_size=shard_size,
                fmt=fmt, limit=limit, quiet=quiet)  # fmt: skip
    with contextlib.ExitStack() as held:
        # one writer per folder for the rest of the run; rank 0 holds it for all ranks
        dist.on_rank0(lambda: held.enter_context(out_lock(out)))
        return _write(run, t0, resume=resume, overwrite=overwrite, extra=extra,
                      preview=preview)  # fmt: skip


def _filters(method: str) -> bool:
    """Whether ``method`` ranks the whole data set first (its row of `puregen_fast.methods`),
    so the run takes one global energy threshold before any shard."""
    return method in methods.METHOD_NAMES and methods.get(method).filters


def _write(
    run: _Run, t0: float, *, resume: bool, overwrite: bool, extra: dict, preview: int | None
) -> Path:
    """Prepare ``--out``, the filt threshold, the shards, and (rank 0) the preview and the
    manifest."""
    out, dist = run.out, run.dist
    reuse, records = _prepare(run, resume, overwrite)
    reused = len(records)
    err: BaseException | None = None
    purified, first_s, first_n = 0, None, 0
    filt, t_energy = None, 0.0
    t2 = time.perf_counter()
    try:
        if _filters(run.config["method"]):  # non-finite energies diverge here (DESIGN 2.4)
            filt = _filter_threshold(run, reuse)
            t_energy, t2 = time.perf_counter() - t2, time.perf_counter()
        purified, first_s, first_n = _purify_shards(
            run, records, filt["threshold"] if filt else None
        )
    except DivergenceError as e:  # the diverged batch is not written; say so in the run record
        _write_out(out, mark_diverged, out, {"sample_ids": e.sample_ids[:100], "error": str(e)})
        err = e
    except Exception as e:
        err = e
    t_purify = time.perf_counter() - t2
    dist.check(err)  # any rank's failure stops every rank (none waits at the next collective)
    timing = {
        "rank": dist.rank,
        "shards_written": len(run.mine) - reused,
        "shards_reused": reused,
        "images_purified": purified,
        "energy_s": round(t_energy, 4),
        "purify_s": round(t_purify, 4),
        "images_per_s": round(purified / t_purify, 3) if t_purify > 0 and purified else None,
        # the first batch apart: it compiles (or loads from the compile cache) the fast path
        "warmup_s": None if first_s is None else round(first_s, 4),
        "after_warmup_images_per_s": (
            round((purified - first_n) / (t_purify - first_s), 3)
            if first_s is not None and purified > first_n and t_purify > first_s else None
        ),
    }
    # every rank's records and timings to rank 0, which writes the manifest
    gathered = dist.gather((records, timing))

    def finish() -> None:
        every: dict[int, dict] = {}
        for recs, _ in gathered:
            every.update(recs)
        shards = [every[k] for k in range(run.writer.num_shards)]
        ranks = [t for _, t in gathered]
        if preview:  # every shard is whole (a failed run stopped above); the manifest is last
            _write_preview(run, preview)
        _write_manifest(run, shards, ranks, filt, time.perf_counter() - t0, extra)

    dist.on_rank0(finish)  # nobody returns before the manifest exists; a failure stops all
    return out


def preview_title(run_method: str, seed: Any, k: int, n: int) -> str:
    """The preview's title: what purified the images and which were drawn (nothing that
    differs between a run and its resumption, so the bytes do not)."""
    return (f"{run_method} (seed {seed}): {k} of {n} images, evenly spaced; "
            "under each, its change in levels RMS (0-255)")  # fmt: skip


def _write_preview(run: _Run, count: int) -> None:
    """``preview.png``: the originals and what this folder now holds for them, read from the
    written shards (so a resumed run draws what an uninterrupted one would)."""
    ids = preview_ids(run.n, count)
    pv = Preview.of(ids, read_rows(run.dataset.images, ids),
                    run.writer.read_rows(ids, run.labels, run.shape))  # fmt: skip
    title = preview_title(run.config["method"], run.config["seed"], len(pv), run.n)
    _write_out(run.out, pv.save, run.out / PREVIEW, title)
    if run.show:
        print(f"purify: {len(pv)} images before and after (change {pv.rms.min():.2f} to "
              f"{pv.rms.max():.2f} levels RMS) -> {run.out / PREVIEW}", file=sys.stderr)
