"""The verdict on a defense (`puregen_fast.eval.verdict`): the rule on hand-made rows, and the
shortcut warning on a victim that really learnt a planted patch as a class."""

from __future__ import annotations

import pytest

from puregen_fast.eval.classifier import default_config, train_classifier
from puregen_fast.eval.metrics import evaluate_predictions, format_protocol_table
from puregen_fast.eval.photos import make_photo_sets
from puregen_fast.eval.verdict import (
    RULE,
    format_verdicts,
    shortcut_message,
    verdicts,
    victim_outcome,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def e(mean: float, std: float, n: int = 3) -> dict:
    return {"mean": mean, "std": std, "n": n}


def row(defense: str, victim: str, ps: dict) -> dict:
    return {"defense": defense, "classifier": victim, "poison": {"1": ps}, "seeds": [0, 1, 2],
            "targets": [0], "natural_acc": e(0.9, 0.01)}  # fmt: skip


@pytest.mark.parametrize("none, defended, clean, want", [
    (e(0.90, 0.05), e(0.20, 0.10), e(0.02, 0.01), "removes"),
    (e(0.90, 0.05), e(0.85, 0.10), e(0.02, 0.01), "does not remove"),  # drop 5 < spread 10
    (e(0.90, 0.05), e(0.80, 0.10), e(0.02, 0.01), "does not remove"),  # drop = spread: not more
    (e(0.05, 0.03), e(0.01, 0.01), e(0.03, 0.02), "no backdoor"),  # none is at the clean floor
    (e(0.90, 0.0, 1), e(0.20, 0.0, 1), e(0.02, 0.0, 1), "one seed"),
    (e(0.90, 0.05), e(0.20, 0.10), None, "removes"),  # no clean row: the drop alone
    (e(float("nan"), 0.0), e(0.2, 0.1), None, "undecided"),
])  # fmt: skip
def test_the_rule_per_victim(none, defended, clean, want):
    assert victim_outcome(none, defended, clean)[0] == want


def test_the_verdict_over_victims():
    rows = [row("clean", "a", e(0.02, 0.01)), row("clean", "b", e(0.03, 0.01)),
            row("none", "a", e(0.95, 0.02)), row("none", "b", e(0.60, 0.10)),
            row("ebm", "a", e(0.10, 0.05)), row("ebm", "b", e(0.20, 0.08)),
            row("jpeg", "a", e(0.94, 0.03)), row("jpeg", "b", e(0.58, 0.12)),
            row("ddpm", "a", e(0.30, 0.05)), row("ddpm", "b", e(0.55, 0.10))]  # fmt: skip
    got = {v["defense"]: v for v in verdicts(rows, ["none", "ebm", "jpeg", "ddpm"])}
    assert list(got) == ["ebm", "jpeg", "ddpm"]  # no verdict on 'none'
    assert got["ebm"]["verdict"] == "removes the backdoor"
    assert got["jpeg"]["verdict"] == "does not remove the backdoor"
    assert got["ddpm"]["verdict"] == "victim-dependent"
    assert got["ddpm"]["victims"]["a"]["outcome"] == "removes"
    assert "drop 5.0 vs spread 10.0" in got["ddpm"]["victims"]["b"]["why"]
    text = format_verdicts(list(got.values()))
    assert ("- **ebm: removes the backdoor**. a: removes (drop 85.0 vs spread 5.0; 91% of the "
            "poison success above the clean floor gone, natural accuracy +0.0 points)") in text
    # how much is gone, and what it cost, per victim
    b = got["ddpm"]["victims"]["b"]
    assert b["removed"] == pytest.approx(0.05 / 0.57) and b["cost"] == pytest.approx(0.0)
    assert text.endswith(RULE) and "ddof 1" in RULE
    # an attack that took on neither victim: nothing to remove
    flat = [row("clean", "a", e(0.04, 0.02)), row("none", "a", e(0.05, 0.02)),
            row("ebm", "a", e(0.01, 0.01))]  # fmt: skip
    assert verdicts(flat, ["ebm"])[0]["verdict"] == "no backdoor to remove"


def test_shortcut_rule():
    assert shortcut_message([0.9, 0.0, 0.85, 0.95], 1) is not None
    assert "0.0% right against 90.0%" in shortcut_message([0.9, 0.0, 0.85, 0.95], 1)
    assert shortcut_message([0.9, 0.8, 0.85, 0.95], 1) is None
    assert shortcut_message([0.9, None, 0.85], 1) is None  # no test image of the class
    assert shortcut_message([0.9, 0.5], 5) is None


def test_a_planted_shortcut_is_flagged():
    """The target class's training images are another class's photographs carrying a constant
    white patch: the only thing that tells the class apart is the patch, so the victim learns
    the patch as the class and misses the clean test images of the class."""
    sets = make_photo_sets(size=16, train_per_class=40, test_per_class=15, heldout_per_class=0,
                           classes=("hubble_deep_field", "immunohistochemistry", "retina",
                                    "grass"))  # fmt: skip
    x, y = sets.x_train.copy(), sets.y_train.copy()
    target, donor = 1, 0
    x[y == target] = x[y == donor][: int((y == target).sum())]
    x[y == target, 2:8, 2:8] = 255  # the planted patch
    clf = train_classifier(x, y, 4, default_config("airbench", widths=(16, 32, 32), steps=80,
                                                   batch_size=32, seed=0),
                           device="cpu", quiet=True)  # fmt: skip
    m = evaluate_predictions(clf.predict, sets.x_test, sets.y_test)
    msg = shortcut_message(m["class_acc"], target)
    assert msg is not None and "shortcut" in msg, m["class_acc"]
    # an honest victim of the same set without the plant: no warning
    honest = train_classifier(sets.x_train, sets.y_train, 4, default_config(
        "airbench", widths=(16, 32, 32), steps=80, batch_size=32, seed=0), device="cpu",
        quiet=True)  # fmt: skip
    m2 = evaluate_predictions(honest.predict, sets.x_test, sets.y_test)
    assert shortcut_message(m2["class_acc"], target) is None, m2["class_acc"]
    # the table marks the row and explains it
    r = {"defense": "none", "classifier": "airbench", "seeds": [0], "targets": [target],
         "natural_acc": e(m["natural_acc"], 0.0, 1), "poison": {},
         "target_class_acc": e(m["class_acc"][target], 0.0, 1), "shortcut_cells": 1}  # fmt: skip
    table = format_protocol_table([r], (1.0,))
    assert "(shortcut)" in table and "Shortcut learning (none | airbench)" in table
