"""The paper's metrics and its table.

Metrics (as the authors' ``run_test_epoch_narcissus``):

* natural accuracy: accuracy on the clean test set;
* poison success: of the test images whose true class is not the target, triggered (the trigger
  times the test-time scale added as in training, see `puregen_fast.eval.poison`), the fraction
  classified as the target class;
* triggered accuracy: accuracy on those same triggered images.

The authors evaluate test-time scales 1, 2 and 3 and print scale 1. Unlike their per-batch mean of
means, fractions here are over images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from puregen_fast.eval.poison import apply_trigger

__all__ = ["poison_metrics", "evaluate_predictions", "format_table"]


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
