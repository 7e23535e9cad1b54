"""A before/after picture of a purification: ``preview.png`` (DESIGN 5).

`make_preview` picks ``count`` images of a set, evenly spaced over it (`preview_ids`: image ``i``
of ``k`` is ``floor((2i + 1) n / 2k)``, the middle of the i-th of k equal parts, so the choice
depends on the set's size alone, never on a random draw or on the run), and returns a `Preview`:
the ids, the originals, the purified images and each image's change, the root-mean-square pixel
difference in levels (0-255), as `eval.metrics.image_change` measures a whole set. The picture
(`Preview.image`, `Preview.png`, `Preview.save`) draws the originals above their purified
versions, with each image's id under the original and its RMS change under the purified one, in
rows of at most 16 pairs. It is drawn with Pillow as the project's other pictures are, and its
bytes depend only on the images and the title: a resumed run writes the same file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from puregen_fast.data.io import atomic_path
from puregen_fast.data.reader import ShardedArray
from puregen_fast.data.writer import PREVIEW

__all__ = ["MAX_PREVIEW", "PREVIEW", "Preview", "make_preview", "preview_ids", "read_rows"]

MAX_PREVIEW = 64  # images in one picture: 64 pairs are already four rows of 16
_PER_ROW = 16
_SHOW = 96  # pixels an image is shown at, at least (small images are enlarged by whole factors)
_SHOW_MAX = 160  # and at most (larger ones are reduced, box-filtered)


def preview_ids(n_images: int, count: int) -> np.ndarray:
    """``min(count, n_images)`` ids evenly spaced over ``[0, n_images)``: the middle of each of
    that many equal parts, in increasing order (int64)."""
    if n_images < 1:
        raise ValueError(f"a preview needs at least one image; the set has {n_images}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"preview count must be an integer >= 1; got {count!r}")
    k = min(int(count), n_images)
    i = np.arange(k, dtype=np.int64)
    return (2 * i + 1) * n_images // (2 * k)  # integers: no rounding that depends on the platform


def read_rows(images: Any, ids: Sequence[int] | np.ndarray, piece: int = 1024) -> np.ndarray:
    """The rows ``ids`` (increasing) of an image set: an array (in memory or memory-mapped) is
    read at those rows only; anything else (a streamed WebDataset) in one forward pass, in
    pieces, since reading at another position would reopen its shard from the start."""
    want = [int(i) for i in ids]
    if isinstance(images, (np.ndarray, ShardedArray)):
        return np.asarray(images[np.asarray(want, np.int64)])
    found: dict[int, np.ndarray] = {}
    if want:
        wanted = set(want)
        for s in range(min(want), max(want) + 1, piece):
            chunk = np.asarray(images[s : min(s + piece, max(want) + 1)])
            found.update({i: chunk[i - s] for i in range(s, s + len(chunk)) if i in wanted})
    return np.stack([found[i] for i in want]) if want else np.zeros((0, 0, 0, 3), np.uint8)


def _check_images(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 NHWC images with 3 channels; got {a.dtype} "
                         f"{tuple(a.shape)}")  # fmt: skip
    return a


@dataclass(frozen=True)
class Preview:
    """The figure data: ``ids`` (k,) int64, ``originals`` and ``purified`` (k, H, W, 3) uint8,
    ``rms`` (k,) float64, each image's change in levels (0-255)."""

    ids: np.ndarray
    originals: np.ndarray
    purified: np.ndarray
    rms: np.ndarray

    @classmethod
    def of(cls, ids: Sequence[int] | np.ndarray, originals: np.ndarray, purified: np.ndarray
           ) -> Preview:  # fmt: skip
        """The preview of these images (uint8 (k, H, W, 3) each): their RMS change computed."""
        a = _check_images(np.asarray(originals), "originals")
        b = _check_images(np.asarray(purified), "purified")
        ids = np.asarray(ids, np.int64).reshape(-1)
        if a.shape != b.shape or a.shape[0] != ids.size:
            raise ValueError(f"{ids.size} ids, originals {a.shape} and purified {b.shape} must "
                             "match")  # fmt: skip
        d = a.astype(np.float64) - b.astype(np.float64)
        return cls(ids, a, b, np.sqrt(np.square(d).reshape(d.shape[0], -1).mean(axis=1)))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def image(self, title: str = "") -> Any:
        """The picture as a Pillow RGB image (see the module doc)."""
        from PIL import Image, ImageDraw

        font, small = fonts()
        h, w = self.originals.shape[1:3]
        f = max(1, _SHOW // max(h, w))
        sw, sh = w * f, h * f
        if max(sw, sh) > _SHOW_MAX:
            r = _SHOW_MAX / max(sw, sh)
            sw, sh = max(1, round(sw * r)), max(1, round(sh * r))
        cols = min(len(self), _PER_ROW)
        rows = -(-len(self) // _PER_ROW)
        left, top, gap, text = 78, 34 if title else 10, 8, 18
        cw = max(sw, 64) + gap  # a column fits its label under small images
        band = 2 * (sh + text) + 14
        im = Image.new("RGB", (left + cols * cw, top + rows * band + 4), "white")
        dr = ImageDraw.Draw(im)
        if title:
            dr.text((8, 8), title, fill="black", font=font)

        def tile(a: np.ndarray) -> Any:
            t = Image.fromarray(np.ascontiguousarray(a), "RGB")
            if (sw, sh) == (w * f, h * f):
                return t.resize((sw, sh), Image.Resampling.NEAREST)  # pixels as they are
            return t.resize((sw, sh), Image.Resampling.BOX)

        for b in range(rows):
            y0 = top + b * band
            dr.text((8, y0 + sh // 2 - 7), "original", fill="black", font=small)
            dr.text((8, y0 + sh + text + sh // 2 - 7), "purified", fill="black", font=small)
            for c, j in enumerate(range(b * _PER_ROW, min(len(self), (b + 1) * _PER_ROW))):
                x0 = left + c * cw
                im.paste(tile(self.originals[j]), (x0, y0))
                dr.text((x0, y0 + sh + 2), f"#{int(self.ids[j])}", fill="black", font=small)
                y1 = y0 + sh + text
                im.paste(tile(self.purified[j]), (x0, y1))
                dr.text((x0, y1 + sh + 2), f"RMS {self.rms[j]:.2f}", fill=(160, 20, 20),
                        font=small)  # fmt: skip
        return im

    def png(self, title: str = "") -> bytes:
        """The picture as PNG bytes (the same for the same images and title)."""
        buf = io.BytesIO()
        self.image(title).save(buf, format="PNG")
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str], title: str = "") -> Path:
        """Write the picture to ``path`` atomically; returns the path."""
        p = Path(path)
        data = self.png(title)
        with atomic_path(p) as tmp:
            Path(tmp).write_bytes(data)
        return p


def fonts() -> tuple[Any, Any]:
    """The pictures' two fonts (titles, labels): Pillow's own, so no font file is needed."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        f = ImageFont.load_default()
        return f, f


def make_preview(
    originals: Any, purified: Any, count: int = 8, ids: Sequence[int] | None = None
) -> Preview:
    """The preview of ``count`` images (`preview_ids`, or the given ``ids``) of a purified set:
    ``originals`` and ``purified`` are uint8 (N, H, W, 3) image sets of one length (numpy
    arrays, memmaps, `load_purified(...).images`, a data set's ``images``); only the chosen rows
    are read. ValueError for sets that do not match."""
    n = len(originals)
    if len(purified) != n:
        raise ValueError(f"originals and purified differ in length: {n} vs {len(purified)}")
    if ids is None:
        chosen = preview_ids(n, count)
    else:
        chosen = np.asarray(ids, np.int64).reshape(-1)
        if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= n:
            raise ValueError(f"preview ids must lie in [0, {n}); got {chosen.tolist()[:8]}")
    order = np.argsort(chosen, kind="stable")  # read forward, give back in the order asked
    back = np.empty_like(order)
    back[order] = np.arange(order.size)
    return Preview.of(chosen, read_rows(originals, chosen[order])[back],
                      read_rows(purified, chosen[order])[back])  # fmt: skip
