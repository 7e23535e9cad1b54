"""PNG sample grids and loss curves, drawn with Pillow (no matplotlib), written atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from puregen_fast.data.io import atomic_path

__all__ = ["SampleRangeError", "check_samples", "save_grid", "save_curves"]


class SampleRangeError(ValueError):
    """Samples that are non-finite or far outside [-1, 1]: a grid of them is refused (DESIGN
    2.4: a NaN cast to uint8 would be drawn black, a diverged chain clamped to plain colour)."""


def _save_png(im: Image.Image, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")  # PNG whatever the name ends in, as before


def check_samples(rows: Sequence[torch.Tensor], margin: float | None) -> list[torch.Tensor]:
    """``rows`` as float32 on the CPU; raises `SampleRangeError` when one holds a non-finite
    value or (``margin`` not None) leaves [-1 - margin, 1 + margin]."""
    out = [r.detach().float().cpu() for r in rows]
    for i, r in enumerate(out):
        if not r.numel():
            continue
        finite = torch.isfinite(r)
        if not bool(finite.all()):
            n = int((~finite).flatten(1).any(1).sum())
            raise SampleRangeError(f"row {i}: {n} of {r.shape[0]} image(s) hold non-finite values")
        peak = float(r.abs().max())
        if margin is not None and peak > 1 + margin:
            raise SampleRangeError(
                f"row {i}: values up to |x| = {peak:.4g}, outside [-1 - m, 1 + m] with "
                f"--watch-sample-margin m = {margin:g}"
            )
    return out


def _to_u8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] (clamped) -> uint8 NHWC."""
    u = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (u * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(
    rows: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    scale: int = 2,
    pad: int = 2,
    *,
    margin: float | None = 4.0,
) -> None:
    """One row of images per tensor (float NCHW in [-1, 1], clamped for display); rows may
    differ in length. Refuses (`SampleRangeError`, nothing written) a row with a non-finite
    value or, unless ``margin`` is None, one leaving [-1 - margin, 1 + margin]."""
    imgs = [_to_u8(r) for r in check_samples(rows, margin) if r.shape[0]]
    if not imgs:
        return
    h, w = imgs[0].shape[1:3]
    ncol = max(a.shape[0] for a in imgs)
    canvas = np.full((len(imgs) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, a in enumerate(imgs):
        for j, img in enumerate(a):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img
    im = Image.fromarray(canvas)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    _save_png(im, path)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _panel(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], pts: list, colour: str) -> None:
    """One series' points (x, y) in ``box``, with its y range and step range in the corners."""
    xlo, xhi = min(x for x, _ in pts), max(x for x, _ in pts)
    ylo, yhi = min(y for _, y in pts), max(y for _, y in pts)
    if xhi == xlo:
        xhi = xlo + 1
    if yhi == ylo:
        yhi, ylo = yhi + 0.5 * (abs(yhi) or 1), ylo - 0.5 * (abs(ylo) or 1)
    if ylo < 0 < yhi:  # the zero line helps read an energy gap
        zy = box[3] - (0 - ylo) / (yhi - ylo) * (box[3] - box[1])
        d.line([(box[0], zy), (box[2], zy)], fill="#bbbbbb")
    scaled = [
        (
            box[0] + (x - xlo) / (xhi - xlo) * (box[2] - box[0]),
            box[3] - (y - ylo) / (yhi - ylo) * (box[3] - box[1]),
        )
        for x, y in pts
    ]
    if len(scaled) > 1:
        d.line(scaled, fill=colour, width=1)
    else:
        x, y = scaled[0]
        d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    d.text((2, box[1]), _fmt(yhi), fill="black")
    d.text((2, box[3] - 10), _fmt(ylo), fill="black")
    d.text((box[0] + 2, box[3] - 11), f"step {int(xlo)}", fill="gray")
    d.text((box[2] - 70, box[3] - 11), f"step {int(xhi)}", fill="gray")


def save_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    title: str = "",
    width: int = 640,
    panel_h: int = 160,
) -> None:
    """One panel per named series (x values, y values), stacked vertically, non-finite points
    skipped; axis ranges written in the corners."""
    names = [k for k, (xs, ys) in series.items() if len(xs)]
    if not names:
        return
    margin_l, margin_r, top = 60, 10, 18 if title else 4
    im = Image.new("RGB", (width, top + len(names) * (panel_h + 6)), "white")
    d = ImageDraw.Draw(im)
    if title:
        d.text((margin_l, 3), title, fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for p, name in enumerate(names):
        xs, ys = series[name]
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
        y0 = top + p * (panel_h + 6)
        box = (margin_l, y0 + 12, width - margin_r, y0 + panel_h)
        d.rectangle(box, outline="black")
        d.text((4, y0), name, fill="black")
        if pts:
            _panel(d, box, pts, colours[p % len(colours)])
    _save_png(im, path)
