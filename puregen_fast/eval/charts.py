"""The experiment's pictures, drawn with Pillow from `puregen_fast.eval.metrics.summarize_cells`
rows: `save_chart` (bars per defense and victim) and `save_curve` (the strength-cost curve:
poison success against natural accuracy, one point per row, so a user picks a setting by what
it costs). Both are written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from puregen_fast.data.io import atomic_path
from puregen_fast.data.preview import fonts
from puregen_fast.eval.verdict import finite, headline

__all__ = ["save_chart", "save_curve"]


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75)]  # fmt: skip


def save_chart(rows: Sequence[dict], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """A PNG bar chart of `summarize_cells` rows, drawn with Pillow: one panel for the poison
    success at the first trigger scale (or the target misclassification), one for natural
    accuracy; bars grouped by defense, one colour per classifier, whiskers at ± one std over
    seeds. Written atomically."""
    from PIL import Image, ImageDraw

    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    clfs = list(dict.fromkeys(r["classifier"] for r in rows))
    by = {(r["defense"], r["classifier"]): r for r in rows}

    label0 = next((headline(r)[0] for r in rows), "poison success %")
    panels = [(label0, lambda r: headline(r)[1]), ("natural accuracy %", lambda r:
              r["natural_acc"])]  # fmt: skip
    font, small = fonts()
    pw = max(360, 45 * len(defenses) * max(1, len(clfs)))
    ph, top, left, bottom = 300, 50, 50, 60
    w = left + len(panels) * (pw + 30) + 10
    h = top + ph + bottom + 18 * len(clfs)
    im = Image.new("RGB", (w, h), "white")
    dr = ImageDraw.Draw(im)
    if title:
        dr.text((left, 8), title, fill="black", font=font)
    for pi, (label, get) in enumerate(panels):
        x0 = left + pi * (pw + 30)
        y0, y1 = top, top + ph
        dr.text((x0, y0 - 22), label, fill="black", font=font)
        dr.line([(x0, y0), (x0, y1), (x0 + pw, y1)], fill="black")
        for v in (0, 25, 50, 75, 100):
            yy = y1 - v / 100 * ph
            dr.line([(x0 - 4, yy), (x0 + pw, yy)], fill=(225, 225, 225) if v else "black")
            dr.text((x0 - 30, yy - 7), f"{v}", fill="black", font=small)
        gw = pw / max(1, len(defenses))
        bw = gw * 0.8 / max(1, len(clfs))
        for di, d in enumerate(defenses):
            gx = x0 + di * gw + gw * 0.1
            dr.text((gx, y1 + 6), d, fill="black", font=small)
            for ci, c in enumerate(clfs):
                r = by.get((d, c))
                e = get(r) if r else None
                if not e or e.get("mean") != e.get("mean"):
                    continue
                m, s = 100 * e["mean"], 100 * e["std"]
                bx = gx + ci * bw
                dr.rectangle([bx, y1 - m / 100 * ph, bx + bw - 2, y1],
                             fill=_COLOURS[ci % len(_COLOURS)])  # fmt: skip
                cx = bx + (bw - 2) / 2
                lo, hi = y1 - max(0, m - s) / 100 * ph, y1 - min(100, m + s) / 100 * ph
                dr.line([(cx, lo), (cx, hi)], fill="black", width=1)
                dr.line([(cx - 3, hi), (cx + 3, hi)], fill="black")
                dr.line([(cx - 3, lo), (cx + 3, lo)], fill="black")
                dr.text((bx, y1 - m / 100 * ph - 14), f"{m:.0f}", fill="black", font=small)
    for ci, c in enumerate(clfs):
        ly = top + ph + 30 + 18 * ci
        dr.rectangle([left, ly, left + 12, ly + 12], fill=_COLOURS[ci % len(_COLOURS)])
        dr.text((left + 18, ly - 1), c, fill="black", font=small)
    p = Path(path)
    with atomic_path(p) as tmp:
        im.save(tmp, format="PNG")
    return p


def save_curve(rows: Sequence[dict], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """The strength-cost curve: one panel per victim, natural accuracy (x) against poison
    success at the first trigger scale (y), one labelled point per row (the clean row, no
    defense, each defense or swept setting), whiskers at ± one std over seeds. The best
    settings lie toward the lower right."""
    from PIL import Image, ImageDraw

    clfs = list(dict.fromkeys(r["classifier"] for r in rows))
    font, small = fonts()
    label0 = next((headline(r)[0] for r in rows), "poison success %")
    pw = ph = 320
    top, left, gap = 72, 56, 70
    w = left + len(clfs) * (pw + gap)
    h = top + ph + 56
    im = Image.new("RGB", (w, h), "white")
    dr = ImageDraw.Draw(im)
    if title:
        dr.text((left, 6), title, fill="black", font=font)
    dr.text((left, 26), f"{label0} (y) against natural accuracy % (x)", fill="black", font=small)
    for ci, c in enumerate(clfs):
        x0, y1 = left + ci * (pw + gap), top + ph
        mine = [r for r in rows if r["classifier"] == c and finite(r.get("natural_acc"))
                and finite(headline(r)[1])]  # fmt: skip
        nat = [100 * r["natural_acc"]["mean"] for r in mine]
        lo = max(0.0, min(nat, default=0.0) - 5)
        lo = min(lo, 90.0)
        span = 100.0 - lo

        def px(acc: float, ps: float, x0: float = x0, y1: float = y1, lo: float = lo,
               span: float = span) -> tuple[float, float]:  # fmt: skip
            return x0 + (min(max(acc, lo), 100.0) - lo) / span * pw, y1 - ps / 100 * ph

        dr.rectangle([x0, top, x0 + pw, y1], outline="black")
        dr.text((x0, top - 16), c, fill="black", font=font)
        for v in (0, 25, 50, 75, 100):
            yy = y1 - v / 100 * ph
            dr.line([(x0 - 4, yy), (x0, yy)], fill="black")
            dr.text((x0 - 28, yy - 7), f"{v}", fill="black", font=small)
        for i in range(5):
            v = lo + span * i / 4
            xx = x0 + pw * i / 4
            dr.line([(xx, y1), (xx, y1 + 4)], fill="black")
            dr.text((xx - 10, y1 + 6), f"{v:.0f}", fill="black", font=small)
        for i, r in enumerate(mine):
            a, e = r["natural_acc"], headline(r)[1]
            assert e is not None
            cx, cy = px(100 * a["mean"], 100 * e["mean"])
            col = _COLOURS[i % len(_COLOURS)]
            ax0, _ = px(100 * (a["mean"] - a["std"]), 0)
            ax1, _ = px(100 * (a["mean"] + a["std"]), 0)
            _, ey0 = px(0, 100 * max(0.0, e["mean"] - e["std"]))
            _, ey1 = px(0, 100 * min(1.0, e["mean"] + e["std"]))
            dr.line([(ax0, cy), (ax1, cy)], fill=col)
            dr.line([(cx, ey0), (cx, ey1)], fill=col)
            dr.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=col)
            dr.text((cx + 6, cy - 7), r["defense"], fill=col, font=small)
    p = Path(path)
    with atomic_path(p) as tmp:
        im.save(tmp, format="PNG")
    return p
