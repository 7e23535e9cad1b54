"""The paper's metrics and its table.

Metrics (as the authors' ``run_test_epoch_narcissus``):

* natural accuracy: accuracy on the clean test set;
* poison success: of the test images whose true class is not the target, triggered (the trigger
  times the test-time scale added as in training, see `puregen_fast.eval.poison`), the fraction
  classified as the target class;
* triggered accuracy: accuracy on those same triggered images.

The authors evaluate test-time scales 1 and 2 (`range(1, 3)`, utils/classifier.py line 1144 of
SunayBhat1/PureGen_PoisonDefense) and report scale 1. Unlike their per-batch mean of
means, fractions here are over images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from puregen_fast.eval.charts import save_chart
from puregen_fast.eval.poison import apply_trigger

__all__ = [
    "poison_metrics",
    "class_accuracy",
    "image_change",
    "mean_image_change",
    "evaluate_predictions",
    "format_table",
    "summarize_cells",
    "format_protocol_table",
    "save_chart",
]


def poison_metrics(pred_triggered: np.ndarray, labels: np.ndarray, target: int) -> dict:
    """Poison success and triggered accuracy from predictions on triggered test images.

    Only images whose true class is not ``target`` count (an image of the target class
    classified as the target is no attack success). Returns fractions in [0, 1] and the count.
    """
    pred = np.asarray(pred_triggered).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.size} predictions for {y.size} labels")
    keep = y != target
    n = int(keep.sum())
    if n == 0:
        return {"poison_success": float("nan"), "triggered_acc": float("nan"), "num_images": 0}
    return {
        "poison_success": float((pred[keep] == target).mean()),
        "triggered_acc": float((pred[keep] == y[keep]).mean()),
        "num_images": n,
    }


def evaluate_predictions(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    trigger: np.ndarray | None = None,
    target_class: int | None = None,
    scales: Sequence[float] = (1.0,),
    quantize: str = "trunc",
    batch_size: int = 1000,
) -> dict:
    """Natural accuracy of ``predict`` (uint8 NHWC images -> class indices) on the test set and,
    with a trigger, the poison metrics for each test-time scale (``poison_metrics``). The
    triggered images are made batch by batch, so the test set is never held twice."""
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    preds = np.empty(n, np.int64)
    for s in range(0, n, batch_size):
        preds[s : s + batch_size] = predict(np.asarray(images[s : s + batch_size]))
    res: dict[str, Any] = {
        "natural_acc": float((preds == y).mean()) if n else float("nan"),
        "num_test_images": int(n),
        "class_acc": class_accuracy(preds, y),
    }
    if trigger is None or target_class is None:
        return res
    others = np.flatnonzero(y != target_class)
    res["poison"] = []
    for m in scales:
        pt = np.empty(others.size, np.int64)
        for s in range(0, others.size, batch_size):
            idx = others[s : s + batch_size]
            xt = apply_trigger(np.asarray(images[idx]), trigger, m, quantize=quantize)
            pt[s : s + batch_size] = predict(xt)
        res["poison"].append({"scale": float(m), **poison_metrics(pt, y[others], target_class)})
    return res


def class_accuracy(pred: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """Accuracy per class (index = class), None for a class with no image."""
    y = np.asarray(labels, np.int64).reshape(-1)
    if y.size == 0:
        return []
    k = int(y.max()) + 1
    total = np.bincount(y, minlength=k)
    right = np.bincount(y[np.asarray(pred).reshape(-1) == y], minlength=k)
    return [float(r / t) if t else None for r, t in zip(right, total)]


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def format_table(results: Sequence[dict]) -> str:
    """The paper's table: one row per training set (its name or method), natural accuracy % and
    poison success % (one column per test-time trigger scale), triggered accuracy %."""
    scales: list[float] = []
    for r in results:
        for p in r.get("metrics", {}).get("poison", []):
            if p["scale"] not in scales:
                scales.append(p["scale"])
    head = ["train set", "natural acc %"]
    head += [f"poison success % (x{s:g})" for s in scales]
    head += [f"triggered acc % (x{s:g})" for s in scales]
    rows = [head]
    for r in results:
        m = r.get("metrics", {})
        by = {p["scale"]: p for p in m.get("poison", [])}
        row = [str(r.get("name", "?")), _pct(m.get("natural_acc"))]
        row += [_pct(by[s]["poison_success"]) if s in by else "-" for s in scales]
        row += [_pct(by[s]["triggered_acc"]) if s in by else "-" for s in scales]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the protocol's table


def image_change(before: np.ndarray, after: np.ndarray, chunk: int = 4096) -> dict[str, Any]:
    """How far a defense moved the images: the root-mean-square pixel difference in levels
    (0..255) and the PSNR in dB (None when nothing changed). A defense that changes images more
    than the noise a classifier tolerates costs natural accuracy however well it removes poisons.
    """
    a, b = np.asarray(before), np.asarray(after)
    if a.shape != b.shape:
        raise ValueError(f"image_change: shapes differ, {a.shape} vs {b.shape}")
    sq = 0.0
    for s in range(0, a.shape[0], chunk):  # float64 sums in chunks: no full float copy
        d = a[s : s + chunk].astype(np.float64) - b[s : s + chunk].astype(np.float64)
        sq += float(np.square(d).sum())
    return _change(float(np.sqrt(sq / max(1, a.size))))


def mean_image_change(changes: Sequence[dict]) -> dict[str, Any]:
    """`image_change` results of equal-sized sets combined: the RMS of their RMSs."""
    return _change(float(np.sqrt(np.mean([c["rms"] ** 2 for c in changes]))))


def _change(rms: float) -> dict[str, Any]:
    return {"rms": rms, "psnr_db": None if rms == 0 else float(20 * np.log10(255.0 / rms))}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of finite values."""
    v = np.asarray([x for x in values if x == x], np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


def _per_seed(cells: Sequence[dict], seeds: Sequence[int], get: Callable) -> list[float]:
    """Per seed: the mean over that seed's cells (its target classes) of ``get(metrics)``."""
    out = []
    for s in seeds:
        vals = [get(x["metrics"]) for x in cells if x["key"]["seed"] == s]
        vals = [v for v in vals if v is not None and v == v]
        out.append(float(np.mean(vals)) if vals else float("nan"))
    return out


def _per_target(cells: Sequence[dict], targets: Sequence[int], get: Callable) -> dict[int, float]:
    """Per target class: the mean over its cells (its seeds) of ``get(metrics)``."""
    out = {}
    for t in targets:
        vals = [get(x["metrics"]) for x in cells if x["key"]["target"] == t]
        vals = [v for v in vals if v is not None and v == v]
        if vals:
            out[t] = float(np.mean(vals))
    return out


def summarize_cells(
    cells: Sequence[dict],
    defenses: Sequence[str],
    classifiers: Sequence[str],
    changes: dict[str, dict] | None = None,
) -> list[dict]:
    """One row per (defense, classifier) from `eval experiment` cell records; ``changes``
    (defense -> `image_change` of its purified copy, averaged over target classes) rides along.

    Each seed's value is the mean over the target classes (trials) of that seed; the row gives
    the mean and standard deviation of those over seeds (the seed spread). ``worst``: the target
    class whose mean poison success over seeds is highest, and that mean."""
    rows = []
    for d in defenses:
        for c in classifiers:
            mine = [x for x in cells if x["key"]["defense"] == d and
                    x["key"]["classifier"]["name"] == c]  # fmt: skip
            if not mine:
                continue
            seeds = sorted({x["key"]["seed"] for x in mine})
            targets = sorted({x["key"]["target"] for x in mine})
            row: dict[str, Any] = {
                "defense": d, "classifier": c, "seeds": seeds, "targets": targets,
                "natural_acc": _mean_std(_per_seed(mine, seeds, lambda m: m.get("natural_acc"))),
                "undertrained_cells": sum(1 for x in mine if x.get("warnings")),
            }  # fmt: skip
            if changes and d in changes:
                row["image_change"] = changes[d]
            scales = sorted({q["scale"] for x in mine for q in x["metrics"].get("poison", [])})
            row["poison"] = {}
            for sc in scales:

                def get(m: dict, sc=sc) -> float | None:
                    return next((q["poison_success"] for q in m.get("poison", [])
                                 if q["scale"] == sc), None)  # fmt: skip

                entry = _mean_std(_per_seed(mine, seeds, get))
                by_t = _per_target(mine, targets, get)
                if by_t:
                    worst = max(by_t, key=lambda t: by_t[t])
                    entry["worst"] = {"target": worst, "mean": by_t[worst]}
                row["poison"][f"{sc:g}"] = entry
            row["target_class_acc"] = _mean_std(
                _per_seed(mine, seeds, lambda m: m.get("target_class_acc"))
            )
            row["shortcut_cells"] = sum(1 for x in mine if x.get("shortcut"))
            if any("target_misclassification" in x["metrics"] for x in mine):
                row["target_misclassification"] = _mean_std(
                    _per_seed(mine, seeds, lambda m: m.get("target_misclassification"))
                )
            rows.append(row)
    return rows


def _pm(e: dict | None) -> str:
    if not e or e.get("mean") != e.get("mean"):
        return "-"
    return f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}"


def format_protocol_table(rows: Sequence[dict], scales: Sequence[float] = (1.0, 3.0)) -> str:
    """The rows of `summarize_cells` as a markdown table: natural accuracy and poison success
    (each trigger scale) or target misclassification, in %, mean ± std over seeds; with several
    target classes, the worst class's poison success at the first scale."""
    several = any(len(r["targets"]) > 1 for r in rows)
    triggered = any(r["poison"] for r in rows)
    targeted = any("target_misclassification" in r for r in rows)
    changed = any("image_change" in r for r in rows)
    by_class = any("target_class_acc" in r for r in rows)
    head = ["defense", "classifier", "seeds", "natural acc %"]
    if by_class:
        head.append("target class acc %")
    if triggered:
        head += [f"poison success % (x{s:g})" for s in scales]
        if several:
            head.append(f"worst class: poison success % (x{scales[0]:g})")
    if targeted:
        head.append("target misclassification %")
    if changed:
        head.append("image change (RMS levels)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["defense"], r["classifier"], str(len(r["seeds"])), _pm(r["natural_acc"])]
        if by_class:
            cells.append(_pm(r.get("target_class_acc")) + (" (shortcut)" if
                                                          r.get("shortcut_cells") else ""))
        if triggered:
            cells += [_pm(r["poison"].get(f"{s:g}")) for s in scales]
            if several:
                w = (r["poison"].get(f"{scales[0]:g}") or {}).get("worst")
                cells.append(f"{100 * w['mean']:.1f} (class {w['target']})" if w else "-")
        if targeted:
            cells.append(_pm(r.get("target_misclassification")))
        if changed:
            ch = r.get("image_change")
            cells.append(f"{ch['rms']:.1f}" if ch else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("undertrained_cells") for r in rows):
        lines.append("")
        lines.append("Some classifiers did not fit their training set (undertrained): see the "
                     "warnings in results.json.")  # fmt: skip
    short = [f"{r['defense']} | {r['classifier']}" for r in rows if r.get("shortcut_cells")]
    if short:
        lines.append("")
        lines.append(f"Shortcut learning ({', '.join(short)}): the victim classifies the clean "
                     "images of the target class far worse than the others; it learnt the "
                     "trigger as the class's feature, so its poison success measures that "
                     "feature, not the poison. Trust another victim's numbers.")  # fmt: skip
    return "\n".join(lines)
