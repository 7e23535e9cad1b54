"""``scan``'s pictures, drawn with Pillow as `puregen_fast.eval.charts` draws the experiment's:
`save_histograms` (the energy histogram of each class, filt's cut marked) and `save_top_grid`
(the highest-energy images of each class, a row per class); `save_separation` (where the poisons
are known: their energies against the clean images'). `scan_pictures` is the hook
`puregen_fast.scan.scan_dataset` calls to draw both. Written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from puregen_fast.data.datasets import Dataset
from puregen_fast.data.io import atomic_path
from puregen_fast.data.preview import fonts
from puregen_fast.eval.charts import _COLOURS
from puregen_fast.scan import EnergyTable, Pictures

__all__ = ["HISTOGRAM", "TOP_GRID", "MAX_CLASSES", "save_histograms", "save_separation",
           "save_top_grid", "scan_pictures", "shown_classes"]  # fmt: skip

HISTOGRAM = "scan-histogram.png"
TOP_GRID = "scan-top.png"
# more classes than this (Tiny-ImageNet's 200) are not drawn all: a picture stays readable, and
# every image is in the table anyway
MAX_CLASSES = 40
_CUT = (214, 39, 40)


def shown_classes(table: EnergyTable, num_classes: int, limit: int = MAX_CLASSES) -> list[int]:
    """The classes drawn, in label order: all of them up to ``limit``, else the ``limit`` that
    hold the most images at or above filt's cut (where poisons would gather), ties by label."""
    present = [c for c in range(num_classes) if (table.labels == c).any()]
    if len(present) <= limit:
        return present
    above = {c: int(table.above_cut[table.labels == c].sum()) for c in present}
    return sorted(sorted(present, key=lambda c: (-above[c], c))[:limit])


def _title(present: int, shown: int) -> str:
    if present == shown:
        return ""
    return f" ({shown} of {present} classes: those with the most images at or above the cut)"


def _save(im, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    with atomic_path(p) as tmp:
        im.save(tmp, format="PNG")
    return p


def save_histograms(
    table: EnergyTable, class_names: Sequence[str], path: str | os.PathLike[str], *,
    bins: int = 30,
) -> Path:  # fmt: skip
    """A PNG with one panel per class: the histogram of its energies over bins shared by every
    panel (so the panels compare), bars scaled to the panel's tallest, and filt's cut as a red
    line (images at or above it are the ones filt purifies)."""
    from PIL import Image, ImageDraw

    font, small = fonts()
    classes = shown_classes(table, len(class_names))
    present = len(np.unique(table.labels))
    lo, hi = float(table.energies.min()), float(table.energies.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    cols = min(4, len(classes))
    rows = -(-len(classes) // cols)
    pw, ph, gap, top, left = 230, 90, 40, 64, 16
    im = Image.new("RGB", (left + cols * (pw + gap), top + rows * (ph + gap + 18)), "white")
    dr = ImageDraw.Draw(im)
    head = "EBM energy per class (higher: less like the data the EBM learnt)"
    if table.score != "energy":
        head = "energy drop along the chain per class (higher: moved further downhill)"
    dr.text((left, 8), head + _title(present, len(classes)), fill="black", font=font)
    dr.text((left, 30), f"red: {table.cut_name} at --filter-frac {table.filter_frac:g}, "
            f"{table.score} {table.cut:.4g}; {int(table.above_cut.sum())} of "
            f"{table.energies.size} images at or above it", fill=_CUT, font=small)  # fmt: skip

    def px(v: float, x0: float) -> float:
        return x0 + (v - edges[0]) / (edges[-1] - edges[0]) * pw

    for i, c in enumerate(classes):
        x0 = left + (i % cols) * (pw + gap)
        y1 = top + (i // cols) * (ph + gap + 18) + 16 + ph
        m = table.labels == c
        counts, _ = np.histogram(table.energies[m], edges)
        peak = max(1, int(counts.max()))
        dr.text((x0, y1 - ph - 16), f"{class_names[c]} ({int(m.sum())}, "
                f"{int(table.above_cut[m].sum())} at or above)", fill="black", font=small)
        for b, n in enumerate(counts):
            if n:
                bx0, bx1 = px(edges[b], x0), px(edges[b + 1], x0)
                dr.rectangle([bx0, y1 - n / peak * ph, max(bx0, bx1 - 1), y1], fill=_COLOURS[0])
        dr.line([(x0, y1), (x0 + pw, y1)], fill="black")
        cx = px(table.cut, x0)
        dr.line([(cx, y1 - ph), (cx, y1)], fill=_CUT, width=2)
        dr.text((x0, y1 + 3), f"{edges[0]:.3g}", fill="black", font=small)
        hi_text = f"{edges[-1]:.3g}"
        dr.text((x0 + pw - 7 * len(hi_text), y1 + 3), hi_text, fill="black", font=small)
    return _save(im, path)


def _read(images, ids: Sequence[int], piece: int = 1024) -> dict[int, np.ndarray]:
    """The images of ``ids``. An array (in memory or memory-mapped) is read at those rows only.
    A streamed WebDataset is read in one forward pass from the first to the last, in pieces:
    reading at another position reopens its shard and skips from the start, which per image
    would read a large shard once for every image drawn."""
    want = sorted({int(i) for i in ids})
    if not want:
        return {}
    if isinstance(images, np.ndarray):
        return {i: np.asarray(images[i : i + 1])[0] for i in want}
    found, wanted = {}, set(want)
    for s in range(want[0], want[-1] + 1, piece):
        e = min(s + piece, want[-1] + 1)
        chunk = images[s:e]
        found.update({i: chunk[i - s] for i in range(s, e) if i in wanted})
    return found


def save_top_grid(
    table: EnergyTable, dataset: Dataset, path: str | os.PathLike[str], *, top: int = 8,
    thumb: int = 64,
) -> Path:  # fmt: skip
    """A PNG with a row per class: its ``top`` highest-energy images, highest first, each
    ``thumb`` pixels wide (small images enlarged without smoothing, so a trigger's pixels stay
    visible) above its rank and overall z-score."""
    from PIL import Image, ImageDraw

    font, small = fonts()
    names = list(dataset.class_names)
    classes = shown_classes(table, len(names))
    present = len(np.unique(table.labels))
    order = table.order
    picks = {c: [int(i) for i in order[table.labels[order] == c][:top]] for c in classes}
    pixels = _read(dataset.images, [i for v in picks.values() for i in v])
    label_w, top_h, row_h = 150, 46, thumb + 34
    width = label_w + top * (thumb + 8) + 8
    im = Image.new("RGB", (max(width, 520), top_h + row_h * len(classes)), "white")
    dr = ImageDraw.Draw(im)
    what = "EBM energy" if table.score == "energy" else "energy drop along the chain"
    dr.text((8, 8), f"highest {what} per class, highest first{_title(present, len(classes))}",
            fill="black", font=font)  # fmt: skip
    dr.text((8, 24), "under each: its rank over the data set and its overall z-score; red: at or "
            f"above {table.cut_name}", fill="black", font=small)  # fmt: skip
    for r, c in enumerate(classes):
        y0 = top_h + r * row_h
        dr.text((8, y0 + thumb // 2 - 7), str(names[c])[:22], fill="black", font=small)
        for j, i in enumerate(picks[c]):
            x0 = label_w + j * (thumb + 8)
            src = Image.fromarray(pixels[i])
            h, w = pixels[i].shape[:2]
            scale = thumb / max(h, w)  # the longer side fills the square
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            res = Image.NEAREST if scale >= 1 else Image.BILINEAR
            im.paste(src.resize(size, res), (x0, y0))
            colour = _CUT if table.above_cut[i] else "black"
            dr.text((x0, y0 + thumb + 2), f"#{int(table.rank[i])}", fill=colour, font=small)
            dr.text((x0, y0 + thumb + 15), f"z {table.z_all[i]:.1f}", fill=colour, font=small)
    return _save(im, path)


def scan_pictures(top: int = 8) -> Pictures:
    """The hook `scan_dataset` calls on rank 0: both pictures into the output folder, returned
    by kind for scan.json."""

    def draw(out: Path, table: EnergyTable, dataset: Dataset) -> dict[str, str]:
        save_histograms(table, dataset.class_names, out / HISTOGRAM)
        save_top_grid(table, dataset, out / TOP_GRID, top=top)
        return {"histogram": HISTOGRAM, "top_images": TOP_GRID}

    return draw


def save_separation(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray, float]], path: str | os.PathLike[str],
    *, bins: int = 30,
) -> Path:  # fmt: skip
    """A PNG with one panel per (title, energies, poison mask, filt's cut): the clean images'
    energy histogram (blue) and the poisons' (red) on the panel's bins, each scaled to its own
    tallest bar (poisons are few), and the cut as a dashed line."""
    from PIL import Image, ImageDraw

    font, small = fonts()
    pw, ph, gap, top, left = 600, 120, 34, 48, 16
    im = Image.new("RGB", (left * 2 + pw, top + len(panels) * (ph + gap + 20)), "white")
    dr = ImageDraw.Draw(im)
    dr.text((left, 8), "EBM energy: clean images (blue), poisons (red outline), each scaled to "
            "its own tallest bar", fill="black", font=font)  # fmt: skip
    dr.text((left, 26), "dashed: filt's cut; images right of it are the ones filt purifies",
            fill="black", font=small)  # fmt: skip
    for n, (title, energies, mask, cut) in enumerate(panels):
        e, m = np.asarray(energies, np.float64), np.asarray(mask, bool)
        lo, hi = float(e.min()), float(e.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        y1 = top + n * (ph + gap + 20) + 18 + ph
        dr.text((left, y1 - ph - 16), title, fill="black", font=small)

        def px(v: float, edges: np.ndarray = edges) -> float:
            return left + (v - edges[0]) / (edges[-1] - edges[0]) * pw

        for colour, part, inset in ((_COLOURS[0], e[~m], 0), (_CUT, e[m], 2)):
            counts, _ = np.histogram(part, edges)
            peak = max(1, int(counts.max()))
            for b, c in enumerate(counts):
                if c:
                    x0, x1 = px(edges[b]) + inset, px(edges[b + 1]) - 1 - inset
                    dr.rectangle([x0, y1 - c / peak * ph, max(x0, x1), y1], outline=colour,
                                 fill=None if inset else colour)  # fmt: skip
        dr.line([(left, y1), (left + pw, y1)], fill="black")
        cx = px(cut)
        for yy in range(int(y1 - ph), int(y1), 6):
            dr.line([(cx, yy), (cx, yy + 3)], fill="black", width=2)
        dr.text((left, y1 + 3), f"{edges[0]:.3g}", fill="black", font=small)
        hi_text = f"{edges[-1]:.3g}"
        dr.text((left + pw - 7 * len(hi_text), y1 + 3), hi_text, fill="black", font=small)
    return _save(im, path)
