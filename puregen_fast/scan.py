"""``puregen-fast scan``: the EBM energy of every image of a data set, ranked (DESIGN 9).

PureGen's ``filt`` rests on poisoned images sitting at higher EBM energy than clean ones; this
hands that signal to the user as a table. The images go through `Purifier.energy` (keyed sample
ids, the engine's non-finite check) in the pipeline's padded batches, shard by shard, with the
pipeline's selection, configuration record, torchrun split, output lock and ``--resume``
(`puregen_fast.pipeline`): each finished shard's energies are kept in a completion record
(``.puregen-energy-00000.json``: the energies and their sha256), so a killed run rerun with
``--resume`` computes only the missing shards and writes the same table bytes.

With a ``chain`` (``--chain-steps K``: K Langevin steps of the EBM's own chain, the noise keyed
by sample id as in purify) each image is also scored after the chain, and the score ranked is
the drop, the energy before minus the energy after: how far the chain moves it downhill.

``--out DIR`` holds, once finished (``scan.json`` is written last):

    scan.csv     one row per image, sorted by rank; columns `COLUMNS`, or `CHAIN_COLUMNS` with
                 a chain (see `write_table`)
    scan.json    the summary: counts, the energy's mean and spread overall and per class, the
                 cut filt would take at ``filter_frac`` and how many images lie at or above it,
                 the highest-ranked rows, the EBM's source and sha256, the run's settings
    pictures     drawn by the caller's ``pictures`` hook (the command draws
                 `puregen_fast.eval.scan_charts`: the histogram per class with the cut, the
                 highest-energy images per class), listed in scan.json
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from puregen_fast.config import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE
from puregen_fast.data.datasets import Dataset
from puregen_fast.data.io import atomic_write, atomic_write_json, read_json
from puregen_fast.data.lock import out_lock
from puregen_fast.data.writer import RUN_STATE, check_out_dir, mark_diverged, prepare_out_dir
from puregen_fast.dist import Dist
from puregen_fast.errors import DivergenceError, UsageError
from puregen_fast.pipeline import _check_options, _plan, _Run, _Steps, _write_out, filter_cut
from puregen_fast.purifier import Purifier
from puregen_fast.runtime import describe_device
from puregen_fast.version import __version__

__all__ = [
    "CHAIN_COLUMNS",
    "COLUMNS",
    "SCAN_JSON",
    "SCAN_TABLE",
    "EnergyTable",
    "Pictures",
    "batch_energies",
    "check_out",
    "ScanResult",
    "energy_purifier",
    "energy_table",
    "scan_dataset",
    "write_table",
]

SCAN_TABLE = "scan.csv"
SCAN_JSON = "scan.json"
SCAN_FORMAT = "puregen-fast scan 1"
# the table's columns, in order (README "Scanning a data set" documents each)
COLUMNS = ("rank", "id", "label", "class", "energy", "z_class", "z_all", "above_cut", "source")
# with a chain: the score ranked (drop) first, then the energies it is the difference of
CHAIN_COLUMNS = ("rank", "id", "label", "class", "drop", "energy", "energy_after", "z_class",
                 "z_all", "above_cut", "source")  # fmt: skip
TOP_ROWS = 20  # the highest-ranked rows repeated in scan.json
_SHARD = ".puregen-energy-{:05d}.json"  # a private name: prepare_out_dir clears it on a new run


def energy_purifier(ebm: Any, device: Any = "auto", **engine: Any) -> Purifier:
    """The engine ``scan`` and Ray's `EnergyBatches` compute energies with: the EBM alone, on
    the reference backend (an energy is one forward pass of the model, the same eager call on
    either backend, so nothing is compiled for it). ``engine``: further `EngineConfig` fields."""
    return Purifier(method="ebm", ebm=ebm, device=device, **{"backend": "reference", **engine})


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class EnergyTable:
    """Every image's score with its rank and z-scores, in id order (index i is image i).

    ``energies``: the score ranked, named by ``score``: "energy", or "drop" for the energy drop
    along a chain, whose two energies are ``before`` and ``after`` (None without a chain).
    ``rank``: 1 for the highest score, ties broken by the lower id. ``z_class``: (energy - the
    class's mean) / the class's standard deviation, ``z_all`` the same over every image; the
    standard deviation is the population one (ddof 0), and a z-score is 0 where it is 0 (one
    image, or equal energies). ``cut``: filt's threshold at ``filter_frac``
    (`pipeline.filter_cut`); ``above_cut``: the images filt would purify (energy >= cut)."""

    energies: np.ndarray
    labels: np.ndarray
    rank: np.ndarray
    z_class: np.ndarray
    z_all: np.ndarray
    cut: float
    above_cut: np.ndarray
    filter_frac: float
    score: str = "energy"
    before: np.ndarray | None = None
    after: np.ndarray | None = None

    @property
    def cut_name(self) -> str:
        """How the log and pictures name the cut: filt's own for the energy, not for the drop."""
        return "filt's cut" if self.score == "energy" else "the cut"

    @property
    def order(self) -> np.ndarray:
        """Image ids from rank 1 down."""
        return np.argsort(self.rank, kind="stable")


def _z(e: np.ndarray) -> np.ndarray:
    sd = float(e.std()) if e.size else 0.0
    return np.zeros_like(e) if sd == 0.0 else (e - e.mean()) / sd


def energy_table(
    energies: np.ndarray, labels: np.ndarray, filter_frac: float,
    after: np.ndarray | None = None,
) -> EnergyTable:  # fmt: skip
    """Rank, per-class and overall z-scores and filt's cut of ``energies`` (see `EnergyTable`);
    with ``after`` (each image's energy after a chain) they are of the drop, energies - after."""
    if after is not None:
        before = np.asarray(energies, dtype=np.float64)
        after = np.asarray(after, dtype=np.float64)
        if before.shape != after.shape or not (np.isfinite(before).all()
                                               and np.isfinite(after).all()):  # fmt: skip
            raise ValueError(f"energies {before.shape} and after {after.shape}: need one finite "
                             "pair per image")  # fmt: skip
        t = energy_table(before - after, labels, filter_frac)
        return dataclasses.replace(t, score="drop", before=before, after=after)
    e = np.asarray(energies, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if e.shape != y.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"energies {e.shape} and labels {y.shape}: need one of each per image")
    if not np.isfinite(e).all():
        raise ValueError("energies must be finite")
    order = np.lexsort((np.arange(e.size), -e))  # energy descending, then id ascending
    rank = np.empty(e.size, np.int64)
    rank[order] = np.arange(1, e.size + 1)
    z_class = np.zeros_like(e)
    for c in np.unique(y):
        m = y == c
        z_class[m] = _z(e[m])
    cut = filter_cut(e, filter_frac)
    return EnergyTable(e, y, rank, z_class, _z(e), cut, e >= cut, float(filter_frac))


def _num(v: float) -> str:
    return repr(float(v))  # the shortest text that reads back as the same float: same bytes


def write_table(
    path: str | os.PathLike[str], table: EnergyTable, class_names: Sequence[str],
    sources: Sequence[str] | None = None,
) -> str:  # fmt: skip
    """``scan.csv``, atomically, one row per image in rank order; returns its sha256. Columns
    (`COLUMNS`): rank (1 = highest score), id (the image's index in the data set, the sample id
    that keys its noise), label, class (its name), energy, z_class, z_all (of the score),
    above_cut (1 at or above the cut at the filter fraction: where filt would purify it),
    source (the image's file or WebDataset key where the reader has one, else empty). With a
    chain (`CHAIN_COLUMNS`) the score, drop, comes first, then energy (before the chain) and
    energy_after. Floats are written as Python's shortest round-trip text, so equal energies
    give equal bytes."""
    chained = table.before is not None and table.after is not None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CHAIN_COLUMNS if chained else COLUMNS)
    for i in table.order:
        scores = [_num(table.energies[i])]
        if chained:
            scores += [_num(table.before[i]), _num(table.after[i])]  # type: ignore[index]
        w.writerow([
            int(table.rank[i]), int(i), int(table.labels[i]), class_names[table.labels[i]],
            *scores, _num(table.z_class[i]), _num(table.z_all[i]),
            int(table.above_cut[i]), "" if sources is None else sources[i],
        ])  # fmt: skip
    data = buf.getvalue().encode("utf-8", "backslashreplace")
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def _stats(e: np.ndarray) -> dict[str, Any]:
    return {"count": int(e.size), "mean": float(e.mean()), "std": float(e.std()),
            "min": float(e.min()), "max": float(e.max())}  # fmt: skip


def summary(table: EnergyTable, class_names: Sequence[str]) -> dict[str, Any]:
    """The numbers of scan.json: overall and per class, the cut, the top rows."""
    classes = []
    for c, name in enumerate(class_names):
        m = table.labels == c
        if m.any():
            classes.append({"label": c, "name": name, **_stats(table.energies[m]),
                            "at_or_above_cut": int(table.above_cut[m].sum())})  # fmt: skip
    chained = table.before is not None and table.after is not None
    top = []
    for i in table.order[:TOP_ROWS]:
        row = {"rank": int(table.rank[i]), "id": int(i), "label": int(table.labels[i]),
               table.score: float(table.energies[i])}  # fmt: skip
        if chained:
            row.update(energy=float(table.before[i]), energy_after=float(table.after[i]))  # type: ignore[index]
        top.append({**row, "z_class": float(table.z_class[i]), "z_all": float(table.z_all[i])})
    both = {"energy": _stats(table.before), "energy_after": _stats(table.after)} if chained else {}  # type: ignore[arg-type]
    return {
        "num_images": int(table.energies.size),
        "score": table.score,
        table.score: _stats(table.energies),
        **both,
        "filter_frac": table.filter_frac,
        "cut": table.cut,
        "at_or_above_cut": int(table.above_cut.sum()),
        "classes": classes,
        "top": top,
    }


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class ScanResult:
    """What a finished scan holds (rank 0; the other ranks get None)."""

    out: Path
    table: EnergyTable
    class_names: list[str]
    summary: dict[str, Any]


def _shard_path(out: Path, k: int) -> Path:
    return out / _SHARD.format(k)


def _digest(e: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(e, np.float64).tobytes()).hexdigest()


_KEYS = ("energies", "after")  # a shard record's rows: the energies, and after a chain


def _read_shard(out: Path, k: int, start: int, stop: int, rows: int) -> np.ndarray | None:
    """Shard ``k``'s energies, (rows, n), from its completion record when it is whole, of this
    range and has ``rows`` rows (1; 2 with a chain)."""
    rec = read_json(_shard_path(out, k))
    if rec is None or rec.get("start") != start or rec.get("stop") != stop:
        return None
    vals = [rec.get(key) for key in _KEYS[:rows]]
    if rec.get(_KEYS[1]) is not None and rows == 1:
        return None
    if not all(isinstance(v, list) and len(v) == stop - start for v in vals):
        return None
    try:
        e = np.asarray(vals, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    ok = np.isfinite(e).all() and _digest(e) == rec.get("sha256")
    return e if ok else None


def _write_shard(out: Path, k: int, start: int, stop: int, e: np.ndarray) -> None:
    # JSON floats are repr()s, which read back as the same float64
    rec = {"start": start, "stop": stop, "sha256": _digest(e)}
    rec.update({key: [float(v) for v in row] for key, row in zip(_KEYS, e)})
    _write_out(out, atomic_write_json, _shard_path(out, k), rec)


def _config(run: _Run, chain: Purifier | None) -> dict[str, Any]:
    """What decides the energies (resume compares it): the pipeline's record of the selection
    (data set, its images' sha256, labels, batch and shard sizes) with the EBM and the device
    in place of the purification settings, and the chain's settings where there is one."""
    ident = run.purifier.identity()
    ebm = ident.get("ebm") or {}
    keep = {k: v for k, v in run.config.items() if k not in ("format", "method", "seed",
                                                             "purifier")}  # fmt: skip
    rec = {**keep, "kind": "scan", "energy": {
        "ebm": {"config": ebm.get("config"), "sha256": ebm.get("sha256")},
        "device": ident.get("device")}}  # fmt: skip
    if chain is not None:
        rec["chain"] = chain.identity()
    return rec


def check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The early, cheap refusal (before models or data are loaded): the pipeline's
    (`data.writer.check_out_dir`), and a finished scan needs --resume or --overwrite."""
    if (out / SCAN_JSON).is_file() and not (resume or overwrite):
        raise UsageError(
            f"--out {out} already holds a finished scan ({SCAN_JSON}); pass --resume to check "
            "and rewrite it, --overwrite to replace it, or choose another --out"
        )
    check_out_dir(out, resume=resume, overwrite=overwrite)


def _prepare(run: _Run, resume: bool, overwrite: bool) -> bool:
    """Rank 0 readies ``--out`` (the pipeline's run record and checks) and removes a finished
    scan's files, scan.json first, so the folder does not look finished while it is redone."""

    def prepare() -> bool:
        check_out(run.out, resume=resume, overwrite=overwrite)
        reuse = prepare_out_dir(run.out, run.config, resume=resume, overwrite=overwrite)
        listed = (read_json(run.out / SCAN_JSON) or {}).get("files", {})
        names = [SCAN_JSON, SCAN_TABLE, *(v for v in listed.values() if isinstance(v, str))]
        for name in names:
            p = run.out / name
            if p.parent == run.out and p.is_file() and not p.is_symlink():
                _write_out(run.out, p.unlink)
        return reuse

    return bool(run.dist.broadcast(run.dist.on_rank0(prepare)))


def _diverged(ids: list[int]) -> DivergenceError:
    shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
    return DivergenceError(
        f"the EBM's energy is non-finite for {len(ids)} image(s) (sample ids {shown}): they "
        "cannot be ranked, so no table was written (the finished pieces are kept). Likely "
        "cause: the EBM (--ebm): check that it is the trained checkpoint you meant (a wrongly "
        "scaled model overflows)",
        ids,
    )


def batch_energies(
    scorer: Purifier, chain: Purifier | None, x: np.ndarray, ids: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:  # fmt: skip
    """(rows, B) float64: the batch's energies under ``scorer``, and with a ``chain`` a second
    row, each image's energy after it (``progress`` told of the chain's steps). What scan
    writes and Ray's `EnergyBatches` returns."""
    e = [np.asarray(scorer.energy(x, ids))]
    if chain is not None:
        e.append(np.asarray(scorer.energy(chain(x, ids, progress=progress), ids)))
    return np.stack(e)


def _score(run: _Run, chain: Purifier | None, x: np.ndarray, ids: np.ndarray,
           steps: _Steps) -> np.ndarray:  # fmt: skip
    try:
        return batch_energies(run.purifier, chain, x, ids, steps)
    except DivergenceError as err:  # the engine's words are filt's: say scan's
        raise _diverged(err.sample_ids) from err


def _energies(run: _Run, reuse: bool, chain: Purifier | None) -> tuple[dict[int, np.ndarray], int]:
    """This rank's shards' energies, (rows, n) each: kept ones that verify, the others computed
    (each shard's record written when it is done); returns them and how many were computed."""
    ranges = run.writer.ranges
    rows = 1 if chain is None else 2
    done: dict[int, np.ndarray] = {}
    for k in run.mine if reuse else ():
        e = _read_shard(run.out, k, *ranges[k], rows)
        if e is not None:
            done[k] = e
    computed = 0
    desc = "scan" if run.dist.world == 1 else f"scan (rank 0 of {run.dist.world})"
    initial = sum(ranges[k][1] - ranges[k][0] for k in done)
    per = 1 if chain is None else max(1, chain.chain_steps)
    with run.bar(run.size(run.mine), desc, initial=initial, per_image=per) as bar:
        for k in run.mine:
            if k in done:
                continue
            s0, e0 = ranges[k]
            e = np.empty((rows, e0 - s0), np.float64)
            for s, stop, x, ids in run.batches(k):
                steps = _Steps(bar, stop - s, per)
                e[:, s - s0 : stop - s0] = _score(run, chain, x, ids, steps)[:, : stop - s]
                steps.finish()
            _write_shard(run.out, k, s0, e0, e)
            done[k] = e
            computed += e0 - s0
    return done, computed


def _sources(dataset: Dataset, n: int) -> list[str] | None:
    keys = dataset.keys
    if keys is not None:
        return [str(v) for v in keys[:n]]
    return None if dataset.files is None else [str(v) for v in dataset.files[:n]]


Pictures = Callable[[Path, EnergyTable, Dataset], dict[str, str]]


def scan_dataset(
    dataset: Dataset,
    purifier: Purifier,
    out_dir: str | os.PathLike[str],
    *,
    filter_frac: float = 0.5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    limit: int | None = None,
    dist: Dist | None = None,
    pictures: Pictures | None = None,
    extra: dict | None = None,
    chain: Purifier | None = None,
) -> ScanResult | None:
    """The energy of images ``[0, min(len(dataset), limit))`` through ``purifier`` (one with an
    EBM; `energy_purifier` makes one), ranked and written into ``out_dir`` (see the module
    doc). ``pictures(out, table, dataset)`` draws into ``out`` on rank 0 and returns the files
    by kind, recorded in scan.json; ``extra`` may carry the ``command`` record. Returns the
    result on rank 0, None on the others. ``chain``: a purifier of the same EBM running a
    short Langevin chain (``energy_purifier(ebm, ebm_steps=K)``); the score ranked is then the
    energy drop along it, each image's energy minus its energy after the chain."""
    _check_options(batch_size, shard_size, limit, "npy")
    if not (isinstance(filter_frac, (int, float)) and 0.0 < filter_frac <= 1.0):
        raise UsageError(f"--filter-frac must lie in (0, 1], got {filter_frac!r}")
    if purifier.ebm is None:
        raise UsageError("scan needs an EBM (--ebm)")
    if chain is not None and (chain.ebm is not purifier.ebm or chain.chain_steps < 1):
        raise UsageError("scan's chain must run at least one Langevin step of the scan's EBM")
    own = dist is None
    dist = dist or Dist.from_env(purifier.device)
    out = Path(out_dir)
    try:
        dist.on_rank0(lambda: check_out(out, resume=resume, overwrite=overwrite))
        t0 = time.perf_counter()
        run = _plan(dataset, purifier, out, dist, batch_size=batch_size, shard_size=shard_size,
                    fmt="npy", limit=limit, quiet=quiet)  # fmt: skip
        run = dataclasses.replace(run, config=_config(run, chain))
        with contextlib.ExitStack() as held:
            dist.on_rank0(lambda: held.enter_context(out_lock(out)))
            return _scan(run, chain, t0, resume, overwrite, float(filter_frac), pictures,
                         extra or {})  # fmt: skip
    finally:
        if own:
            dist.close()


def _scan(run: _Run, chain: Purifier | None, t0: float, resume: bool, overwrite: bool,
          frac: float, pictures: Pictures | None, extra: dict) -> ScanResult | None:  # fmt: skip
    dist, out = run.dist, run.out
    reuse = _prepare(run, resume, overwrite)
    err: BaseException | None = None
    shards: dict[int, np.ndarray] = {}
    computed = 0
    t1 = time.perf_counter()
    try:
        shards, computed = _energies(run, reuse, chain)
    except DivergenceError as e:  # a non-finite energy: the finished shards stay, resumable
        _write_out(out, mark_diverged, out, {"sample_ids": e.sample_ids[:100], "error": str(e)})
        err = e
    except Exception as e:
        err = e
    t_energy = time.perf_counter() - t1
    dist.check(err)
    gathered = dist.gather((shards, computed, round(t_energy, 4)))
    result = None
    if dist.is_main:
        every: dict[int, np.ndarray] = {}
        for s, _, _ in gathered:
            every.update(s)
        energies = np.concatenate([every[k] for k in range(run.writer.num_shards)], axis=1)
        result = _finish(run, chain, energies, frac, pictures, extra, gathered, t0)
    dist.check(None)  # nobody returns before scan.json exists
    return result


def _finish(
    run: _Run, chain: Purifier | None, energies: np.ndarray, frac: float,
    pictures: Pictures | None, extra: dict, ranks: list, t0: float,
) -> ScanResult:  # fmt: skip
    """Rank 0: the table, the pictures, then scan.json (last: it marks the scan finished)."""
    out, names = run.out, list(run.dataset.class_names)
    table = energy_table(energies[0], run.labels, frac, energies[1] if chain else None)
    sha = _write_out(out, write_table, out / SCAN_TABLE, table, names,
                     _sources(run.dataset, run.n))  # fmt: skip
    files = {"table": SCAN_TABLE}
    if pictures is not None:
        files.update(pictures(out, table, run.dataset))
    summ = summary(table, names)
    ident = run.purifier.identity()
    computed = sum(c for _, c, _ in ranks)
    slowest = max(t for _, _, t in ranks)
    record = {
        "format": SCAN_FORMAT,
        **summ,
        "table_sha256": sha,
        "files": files,
        "model": {"source": (run.purifier.describe().get("ebm") or {}).get("source"),
                  "sha256": (ident.get("ebm") or {}).get("sha256"),
                  "config": (ident.get("ebm") or {}).get("config")},  # fmt: skip
        "settings": run.config,
        "dataset": run.dataset.describe(),
        "device": describe_device(run.purifier.device),
        "world_size": run.dist.world,
        "timings": {
            "total_s": round(time.perf_counter() - t0, 4),
            "energy_s": slowest,
            "images_computed": computed,
            "images_reused": run.n - computed,
            "images_per_s": round(computed / slowest, 3) if slowest > 0 and computed else None,
        },
        "versions": {"puregen_fast": __version__, "numpy": np.__version__,
                     "python": platform.python_version()},  # fmt: skip
        "chain": None if chain is None else chain.describe(),
        "command": extra.get("command"),
        "run_record": RUN_STATE,
    }
    _write_out(out, atomic_write_json, out / SCAN_JSON, record)
    if run.show:
        top, what = summ["top"][0], table.score
        name = "energy" if chain is None else f"energy drop along {chain.chain_steps} steps"
        print(
            f"scan: {run.n} images -> {out / SCAN_TABLE} ({computed} computed now"
            + (f", {record['timings']['images_per_s']:.1f} img/s" if computed and slowest else "")
            + f"); {name} mean {summ[what]['mean']:.6g}, std {summ[what]['std']:.6g}; "
            f"highest: id {top['id']} ({names[top['label']]}), {what} {top[what]:.6g}, "
            f"z {top['z_all']:.2f} overall, {top['z_class']:.2f} in its class; {table.cut_name} at "
            f"--filter-frac {frac:g}: {table.cut:.6g}, {summ['at_or_above_cut']} image(s) at or "
            "above it",
            file=sys.stderr,
        )
    return ScanResult(out, table, names, summ)
