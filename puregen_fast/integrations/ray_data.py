"""Ray Data: `PurifyBatches`, a callable class for ``Dataset.map_batches`` (DESIGN 3, 5).

::

    ds.map_batches(PurifyBatches, batch_size=256, num_gpus=1,
                   compute=ray.data.ActorPoolStrategy(size=4),
                   fn_constructor_kwargs=dict(method="ebm", ebm="runs/ebm", seed=0,
                                              batch_size=256))

Each actor builds the `Purifier` once, from the same options as ``puregen-fast purify`` (the
fields of `PurifyConfig`: method, ``ebm``/``ddpm`` sources, step counts, seed, precision, device,
backend, and ``batch_size``). A batch is a dict of numpy arrays: ``"image"`` uint8
(B, H, W, 3) and ``"id"`` the images' int64 global indices, which key the noise (DESIGN 2.2);
every other column passes through unchanged. The batch is purified in pieces of ``batch_size``
images, a short piece padded to ``batch_size`` as the command pads its last batch, so every
model call has the command's shape and an image's bytes equal ``puregen-fast purify`` with the
same seed and ``--batch-size``, however Ray cuts the data set into blocks and batches. (The
command caps the batch size at the number of images: for a data set smaller than the batch
size, pass that number.)

`EnergyBatches` is the same for ``puregen-fast scan``: it adds an ``"energy"`` column (float64,
the EBM's energy of each image, `Purifier.energy`), so a pipeline can flag images before it
decides what to do with them. It takes ``ebm``, ``device`` and ``batch_size`` and pads as the
command does, so with the same ``batch_size`` (and device type) each energy equals the
``energy`` column of ``scan.csv`` bit for bit; ranks and z-scores need the whole data set, so
they are the command's (or `puregen_fast.scan.energy_table` over the gathered column).

``method="filt"`` needs the data set's energy threshold (``filter_threshold``, from the
``filter`` record of a ``puregen-fast purify`` manifest): a threshold taken per batch would
depend on how Ray cuts batches. It must be a finite number, checked by the constructor (a NaN
would select no image and return every batch unchanged). Images are checked against the models
by the command's own check (`puregen_fast.purifier.check_image_size`), so a size the command
refuses raises here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from puregen_fast import methods
from puregen_fast.config import DEFAULT_BATCH_SIZE, MAX_LANGEVIN_STEPS, EngineConfig, PurifyConfig
from puregen_fast.purifier import Purifier, check_filter_threshold, load_models
from puregen_fast.scan import batch_energies, energy_purifier

__all__ = ["PurifyBatches", "EnergyBatches", "OPTIONS", "ENERGY_OPTIONS"]

# the PurifyConfig fields that decide the purified bytes; the data and output options of the
# command (data set, --out, --format, ...) are Ray's to handle
OPTIONS = (*(f.name for f in dataclasses.fields(EngineConfig)), "ebm", "ddpm", "batch_size")
# what decides an energy's bytes: the model, where it runs, and the batch shape
ENERGY_OPTIONS = ("ebm", "device", "batch_size")

# a model missing: the messages name the Python keywords the classes take, not a flag
_KEYWORDS = ("ebm=", "ddpm=")


def _images_and_ids(batch: Any, who: str) -> tuple[np.ndarray, np.ndarray]:
    """A dict-of-numpy batch's images and sample ids, checked; ``who`` names the class."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{who} takes dict-of-numpy batches, got {type(batch).__name__}; "
                        "pass batch_format='numpy' to map_batches")  # fmt: skip
    images = _image_column(batch)
    return images, _id_column(batch, len(images))


class PurifyBatches:
    """``PurifyBatches(**options)(batch) -> batch`` with ``batch["image"]`` purified."""

    def __init__(self, *, filter_threshold: float | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"PurifyBatches: unknown option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(OPTIONS)} and filter_threshold"
            )
        self.config = PurifyConfig(**options)  # checked here: a bad value names its field
        cfg = self.config
        if methods.get(cfg.method).filters and filter_threshold is None:
            raise ValueError(
                f"method {cfg.method!r} needs filter_threshold (the 'threshold' of the filter "
                "record in a puregen-fast purify manifest): a per-batch threshold would depend on "
                "Ray's batches"
            )
        if filter_threshold is not None:  # here, not at the first batch on some actor
            filter_threshold = check_filter_threshold(filter_threshold)
        self.filter_threshold = filter_threshold
        self.batch_size = cfg.batch_size
        # the command's loader and engine: the same models and settings give the same bytes
        models = load_models(cfg.method, cfg.ebm, cfg.ddpm, named=_KEYWORDS)
        self.purifier = Purifier.from_config(cfg, *models)

    def describe(self) -> dict:
        """The engine's description (method, models' sha256, backend, device)."""
        return {**self.purifier.describe(), "batch_size": self.batch_size}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        images, ids = _images_and_ids(batch, "PurifyBatches")
        kw = {} if self.filter_threshold is None else {"filter_threshold": self.filter_threshold}
        out = np.empty_like(images)
        for s, e, x, i in _pieces(images, ids, self.batch_size):
            out[s:e] = np.asarray(self.purifier(x, i, **kw))[: e - s]
        return {**batch, "image": out}


class EnergyBatches:
    """``EnergyBatches(ebm=..., device=..., batch_size=...)(batch) -> batch`` with an
    ``"energy"`` column: each image's EBM energy (float64), as ``puregen-fast scan`` computes
    it. ``ebm``: a checkpoint source (default the authors' EBM, as the command's).
    ``chain_steps=K`` (> 0) adds ``"energy_after"``, the energy after K steps of the EBM's own
    chain (noise keyed by the ids), and ``"drop"``, energy - energy_after, as ``scan
    --chain-steps K`` ranks by."""

    def __init__(self, *, ebm: str | None = None, device: str = "auto",
                 batch_size: int = DEFAULT_BATCH_SIZE, chain_steps: int = 0) -> None:  # fmt: skip
        # the command's checks, through its configuration's fields (a bad value names its field)
        cfg = PurifyConfig(method="ebm", ebm=ebm, device=device, batch_size=batch_size)
        if type(chain_steps) is not int or not 0 <= chain_steps <= MAX_LANGEVIN_STEPS:
            raise ValueError(f"EnergyBatches(chain_steps=...): an int in [0, 10**4] (Langevin "
                             f"steps; 0: the energy alone), got {chain_steps!r}")  # fmt: skip
        self.batch_size = cfg.batch_size
        ebm = load_models("ebm", cfg.ebm, named=_KEYWORDS).ebm
        self.purifier = energy_purifier(ebm, cfg.device)
        self.chain = (energy_purifier(ebm, cfg.device, ebm_steps=chain_steps)
                      if chain_steps else None)  # fmt: skip

    def describe(self) -> dict:
        """The EBM (source, sha256) and device the energies come from, the batch size, and the
        chain's steps, step size and temperature (None without one)."""
        d = self.purifier.describe()
        chain = None
        if self.chain is not None:
            c = self.chain.describe()["ebm"]
            chain = {k: c[k] for k in ("steps", "eps", "temp")}
        return {"ebm": d.get("ebm"), "device": d["device"], "batch_size": self.batch_size,
                "chain": chain}  # fmt: skip

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        images, ids = _images_and_ids(batch, "EnergyBatches")
        out = np.empty((1 if self.chain is None else 2, len(images)), np.float64)
        for s, e, x, i in _pieces(images, ids, self.batch_size):
            out[:, s:e] = batch_energies(self.purifier, self.chain, x, i)[:, : e - s]
        if self.chain is None:
            return {**batch, "energy": out[0]}
        return {**batch, "energy": out[0], "energy_after": out[1], "drop": out[0] - out[1]}


def _pieces(images: np.ndarray, ids: np.ndarray, bs: int):
    """(start, stop, images, ids) of ``batch_size`` pieces, a short one padded as the command
    pads its last batch (the last image repeated, the next ids), so every model call has the
    command's shape."""
    for s in range(0, len(images), bs):
        e = min(s + bs, len(images))
        x, i = images[s:e], ids[s:e]
        if e - s < bs:
            x = np.concatenate([x, np.repeat(x[-1:], bs - (e - s), axis=0)])
            i = np.concatenate([i, i[-1] + 1 + np.arange(bs - (e - s), dtype=np.int64)])
        yield s, e, np.ascontiguousarray(x), i


def _columns(batch: Mapping[str, Any]) -> str:
    return ", ".join(map(repr, batch)) or "none"


def _image_column(batch: Mapping[str, Any]) -> np.ndarray:
    if "image" not in batch:
        raise ValueError(
            f"batch has no 'image' column (columns: {_columns(batch)}); map the images to "
            "'image', uint8 (B, H, W, 3)"
        )
    col = batch["image"]
    a = np.asarray(col)
    if a.dtype == object:  # Ray's variable-shaped tensors: one array per row
        try:
            a = np.stack([np.asarray(r) for r in col])
        except ValueError as e:
            raise ValueError(
                f"column 'image': images of different sizes ({e}); resize them to one size"
            ) from e
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(
            f"column 'image': expected uint8 (B, H, W, 3), got {a.dtype} {a.shape}; decode "
            "to RGB uint8 (read_images(..., mode='RGB'))"
        )
    return a


def _id_column(batch: Mapping[str, Any], n: int) -> np.ndarray:
    if "id" not in batch:
        raise ValueError(
            f"batch has no 'id' column (columns: {_columns(batch)}); add each image's global "
            "index as 'id' (int64): it keys the noise, so the bytes do not depend on Ray's "
            "batches"
        )
    ids = np.asarray(batch["id"])
    if ids.dtype.kind not in "iu" or ids.shape != (n,):
        raise ValueError(
            f"column 'id': expected integers of shape ({n},) (one per image), got {ids.dtype} "
            f"{ids.shape}"
        )
    if n and (ids.min() < 0 or ids.max() > np.iinfo(np.int64).max - n):
        raise ValueError(f"column 'id': global indices must be >= 0, got min {ids.min()}")
    return ids.astype(np.int64)
