"""Purify an image folder or WebDataset shards with Ray Data on an actor pool, writing WebDataset
shards (``<key>.png``, ``<key>.cls``) to ``--out``.

One machine (Ray starts a local instance)::

    python examples/ray_purify.py --imagefolder data/train --out purified/ \\
        --method ebm --ebm runs/ebm --batch-size 256 --actors 4
    python examples/ray_purify.py --shards 'shards/train-{000..099}.tar' --out purified/ \\
        --method ddpm --ddpm runs/ddpm --batch-size 256 --actors 8

A multi-node Ray cluster: on the head node ``ray start --head --port=6379``, on every other node
``ray start --address=HEAD_IP:6379``; then run this script on any node with
``RAY_ADDRESS=HEAD_IP:6379`` in the environment (``ray.init()`` joins the cluster), or submit it
with ``ray job submit --address http://HEAD_IP:8265 -- python examples/ray_purify.py ...``. The
input, the checkpoints and ``--out`` must be on a file system every node sees. Where the cluster
has GPUs each actor takes one (``--actors`` at most the number of GPUs); elsewhere the actors run
on CPUs.

Ids: the images' global indices, in the order ``puregen-fast purify`` reads the same data
(ImageFolder: class folders sorted, files sorted; shards: the running index over the shards in
order), so with the same ``--seed`` and ``--batch-size`` every purified image has the bytes the
command writes for it. Output keys: the shards' own keys, or the zero-padded id for a folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import ray

from puregen_fast.config import EngineConfig, add_arguments
from puregen_fast.data.datasets import IMG_EXTENSIONS, decode_images
from puregen_fast.data.webdataset import index_webdataset, png_bytes, read_tar
from puregen_fast.integrations.ray_data import PurifyBatches


def imagefolder_items(root: Path) -> list[dict[str, Any]]:
    """One row per image file of ``root/<class>/...`` in torchvision ``ImageFolder`` order (what
    ``puregen-fast purify --dataset imagefolder`` reads): path, id, label, key."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files: list[tuple[str, int]] = []
    for label, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(root / c, followlinks=True)):
            for n in sorted(names):
                if n.lower().endswith(IMG_EXTENSIONS):
                    files.append((os.path.join(dirpath, n), label))
    width = len(str(max(len(files) - 1, 0)))
    return [{"path": p, "id": i, "label": y, "key": f"{i:0{width}d}"}
            for i, (p, y) in enumerate(files)]  # fmt: skip


def _decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The images of the batch's files, decoded as the command decodes them."""
    images = decode_images([Path(p) for p in batch["path"]], quiet=True)
    return {"image": images, "id": batch["id"], "label": batch["label"], "key": batch["key"]}


def _read_shard(batch: dict[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One shard row (path, start) -> its samples: image, id (start + position), label, key."""
    keys, images, labels = read_tar(str(batch["path"][0]), shape)
    start = int(batch["start"][0])
    return {"image": images, "id": start + np.arange(len(keys), dtype=np.int64),
            "label": labels, "key": np.asarray(keys, dtype=object)}  # fmt: skip


def read_dataset(imagefolder: str | None, shards: str | None, blocks: int | None = None):
    """The input as a Ray dataset with columns image, id, label, key."""
    if imagefolder:
        items = imagefolder_items(Path(imagefolder))
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(_decode)
    index = index_webdataset(shards)
    rows = [{"path": p, "start": int(s)} for p, s in zip(index.shards, index.starts)]
    return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _read_shard, batch_size=1, fn_kwargs={"shape": index.shape}
    )


def purify(ds, options: dict[str, Any], actors: int, actor_cpus: float | None = None):
    """``ds`` through `PurifyBatches` on a pool of ``actors`` actors, one GPU each where the
    cluster has GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    return ds.map_batches(
        PurifyBatches,
        fn_constructor_kwargs=options,
        batch_size=options["batch_size"],
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else None,
        num_cpus=actor_cpus,
        batch_format="numpy",
    )


def _encode(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "__key__": np.asarray(batch["key"], dtype=object),
        "png": np.asarray([png_bytes(im) for im in batch["image"]], dtype=object),
        "cls": np.asarray([str(int(y)).encode() for y in batch["label"]], dtype=object),
    }


def write_shards(ds, out: str) -> None:
    ds.map_batches(_encode).write_webdataset(out, encoder=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagefolder", metavar="ROOT", help="ROOT/<class>/<image>")
    src.add_argument("--shards", metavar="SPEC", help="'shards/train-{000..099}.tar'")
    p.add_argument("--out", required=True, help="folder for the output shards")
    p.add_argument("--ebm", metavar="SRC", help="EBM checkpoint")
    p.add_argument("--ddpm", metavar="SRC", help="DDPM checkpoint")
    p.add_argument("--batch-size", type=int, default=256, help="as puregen-fast purify's")
    p.add_argument("--actors", type=int, default=2, help="purifying actors (one GPU each)")
    p.add_argument("--actor-cpus", type=float, default=None, help="CPUs each actor reserves")
    p.add_argument("--blocks", type=int, default=None, help="input blocks (image folder)")
    p.add_argument("--filter-threshold", type=float, default=None,
                   help="filt: the energy threshold of a purify run's manifest (filter record)")
    add_arguments(p, EngineConfig)  # --method, --ebm-steps, --seed, --precision, ...
    args = p.parse_args(argv)
    options = {k: getattr(args, k) for k in
               ("ebm", "ddpm", "batch_size", *(f for f in EngineConfig.__dataclass_fields__))}
    if args.filter_threshold is not None:
        options["filter_threshold"] = args.filter_threshold
    ray.init(ignore_reinit_error=True)  # joins the cluster named by RAY_ADDRESS, if any
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = read_dataset(args.imagefolder, args.shards, args.blocks)
    write_shards(purify(ds, options, args.actors, args.actor_cpus), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
