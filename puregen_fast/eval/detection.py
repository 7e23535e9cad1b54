"""How well an image score (the EBM energy `puregen-fast scan` ranks by) finds the poisons, where
they are known (DESIGN 9): ROC AUC, the poisons among the top 1, 5 and 10% by score, and the
precision and recall at filt's cut. Higher scores are more suspicious; the order among equal
scores is the scan's (the lower id first), and the AUC counts a tie as half."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from puregen_fast import paper
from puregen_fast.pipeline import filter_cut
from puregen_fast.reference import jpeg

__all__ = [
    "BASELINES",
    "TOP_FRACS",
    "class_mean_distance",
    "detection",
    "format_detection",
    "jpeg_error",
    "random_scores",
    "roc_auc",
    "top_share",
]

TOP_FRACS = (0.01, 0.05, 0.10)


def _check(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positive, dtype=bool)
    if s.ndim != 1 or s.shape != p.shape:
        raise ValueError(f"scores {s.shape} and the poison mask {p.shape}: one of each per image")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, p


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks from the lowest score, tied scores sharing their mean rank."""
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2  # the mean of ranks a+1..b
    return ranks


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The probability that a poison scores above a clean image (ties count half): the area
    under the ROC curve, by the Mann-Whitney rank sum. None without both kinds of image."""
    s, p = _check(scores, positive)
    n1, n0 = int(p.sum()), int((~p).sum())
    if n1 == 0 or n0 == 0:
        return None
    r = _average_ranks(s)
    return float((r[p].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _by_rank(s: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(s.size), -s))  # the scan's order: highest first, lower id


def top_share(scores: np.ndarray, positive: np.ndarray, frac: float) -> dict[str, Any]:
    """The ``ceil(frac * N)`` highest-scoring images: how many are poisons, the share of all
    poisons they hold (recall) and the share of them that are poisons (precision)."""
    s, p = _check(scores, positive)
    if not 0 < frac <= 1:
        raise ValueError(f"frac must lie in (0, 1], got {frac}")
    k = max(1, math.ceil(frac * s.size - 1e-9))  # 5% of 100 is 5, not 6 from 5.000000000000001
    hits = int(p[_by_rank(s)[:k]].sum())
    n1 = int(p.sum())
    return {"frac": frac, "k": k, "poisons": hits, "recall": hits / n1 if n1 else None,
            "precision": hits / k}  # fmt: skip


def detection(
    scores: np.ndarray, poison_idx: Sequence[int] | np.ndarray, *, filter_frac: float = 0.5,
    fracs: Sequence[float] = TOP_FRACS,
) -> dict[str, Any]:  # fmt: skip
    """The detection record of one poisoned set: counts, AUC, `top_share` at each of
    ``fracs``, precision and recall at filt's cut for ``filter_frac`` (`pipeline.filter_cut`:
    the images filt purifies), and how far the poisons' mean score lies above the clean
    images' in the clean images' standard deviations."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.zeros(s.shape, bool)
    idx = np.asarray(poison_idx, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= s.size):
        raise ValueError(f"poison indices must lie in [0, {s.size}), got {idx.min()}..{idx.max()}")
    p[idx] = True
    s, p = _check(s, p)
    cut = filter_cut(s, filter_frac)
    at = s >= cut
    n1, hits = int(p.sum()), int((p & at).sum())
    clean = s[~p]
    sd = float(clean.std()) if clean.size else 0.0
    sep = (float(s[p].mean()) - float(clean.mean())) / sd if n1 and sd > 0 else None
    return {
        "num_images": int(s.size),
        "num_poisons": n1,
        "auc": roc_auc(s, p),
        "top": [top_share(s, p, f) for f in fracs],
        "filt": {"filter_frac": filter_frac, "cut": cut, "selected": int(at.sum()),
                 "poisons": hits, "precision": hits / int(at.sum()),
                 "recall": hits / n1 if n1 else None},  # fmt: skip
        "poison_z_vs_clean": sep,
    }


# --- trivial scores, the baselines an energy score must beat --------------------------------------


def random_scores(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random ranking: uniform scores, seeded (AUC 0.5 on average)."""
    return np.random.default_rng(seed).random(len(images))


def class_mean_distance(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's RMS distance (levels) to the mean image of its own class: a trigger added to
    some images of a class moves them away from the rest."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    y = np.asarray(labels)
    out = np.empty(len(x))
    for c in np.unique(y):
        m = y == c
        out[m] = np.sqrt(((x[m] - x[m].mean(0)) ** 2).mean(1))
    return out


def jpeg_error(images: np.ndarray, labels: np.ndarray, quality: int = paper.JPEG_QUALITY
               ) -> np.ndarray:  # fmt: skip
    """Each image's RMS change (levels) under a JPEG re-encoding at ``quality``: fine-grained
    noise, as an optimised trigger often is, does not survive JPEG."""
    x = np.asarray(images, np.uint8)
    d = jpeg(x, quality).astype(np.float64) - x
    return np.sqrt((d.reshape(len(x), -1) ** 2).mean(1))


# name -> score(images uint8 NHWC, labels): higher is more suspicious
BASELINES = {"random": random_scores, "class-mean distance": class_mean_distance,
             "JPEG error": jpeg_error}  # fmt: skip


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def format_detection(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table, one row per (name, `detection` record): AUC, the recall at each top
    share, and filt's precision and recall."""
    if not rows:
        return ""
    fracs = [t["frac"] for t in rows[0][1]["top"]]
    ff = rows[0][1]["filt"]["filter_frac"]
    head = (["set", "poisons", "AUC"] + [f"poisons in top {100 * f:g}%" for f in fracs]
            + [f"filt {ff:g}: precision", "filt: recall"])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in rows:
        auc = "n/a" if d["auc"] is None else f"{d['auc']:.3f}"
        cells = [name, f"{d['num_poisons']} of {d['num_images']}", auc]
        cells += [f"{t['poisons']} of {t['k']} ({_pct(t['recall'])} of poisons)" for t in d["top"]]
        cells += [_pct(d["filt"]["precision"]), _pct(d["filt"]["recall"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
