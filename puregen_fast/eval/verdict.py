"""Whether a defense worked, and whether the measurement can be trusted.

The verdict on a defense, per victim (rows of `puregen_fast.eval.metrics.summarize_cells`), at
the headline attack metric (poison success at the first trigger scale, or the target
misclassification for Gradient Matching and Bullseye Polytope):

* ``removes``: the poison success with no defense minus with the defense is more than the seed
  spread (the larger sample standard deviation, ddof 1, of the two rows over seeds);
* ``no backdoor``: with no defense, the poison success is within the spread of the clean row's
  (victims trained on the unpoisoned set): the attack did not take, there is nothing to remove;
* ``one seed``: a row has fewer than two seeds, so there is no spread to compare with;
* ``does not remove`` otherwise.

Over victims: ``removes the backdoor`` when it removes it for every victim the attack took on,
``does not remove the backdoor`` when for none, ``victim-dependent`` between; ``undecided`` with
one seed; ``no backdoor to remove`` when the attack took on no victim.

Shortcut learning: a victim that classifies the clean images of the target class far worse than
the others (below `SHORTCUT_RATIO` of the other classes' mean accuracy) has learnt the trigger as
the class's feature. Its poison success then measures that feature, not the poison's planted
backdoor, and its natural accuracy pays for the missing class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "CLEAN",
    "SHORTCUT_RATIO",
    "RULE",
    "finite",
    "format_verdicts",
    "headline",
    "shortcut_message",
    "verdicts",
    "victim_outcome",
]

CLEAN = "clean"  # the row of victims trained on the unpoisoned training set
SHORTCUT_RATIO = 0.5
RULE = (
    "Rule: a defense removes the backdoor for a victim when poison success without a defense "
    "minus with it is more than the seed spread (the larger sample std, ddof 1, of the two rows); "
    "the attack did not take on a victim whose poison success without a defense is within the "
    "spread of the clean row's. How much is gone: the drop as a share of the poison success "
    "above the clean row's (100%: down to the floor of a victim that never saw a poison). ± is "
    "the sample standard deviation (ddof 1) over seeds of each seed's mean over target classes."
)


def shortcut_message(class_acc: Sequence[float | None], target: int) -> str | None:
    """A warning when the clean accuracy of class ``target`` is below `SHORTCUT_RATIO` of the
    other classes' mean (None for classes with no test image); else None."""
    if not 0 <= target < len(class_acc) or class_acc[target] is None:
        return None
    others = [a for i, a in enumerate(class_acc) if i != target and a is not None]
    if not others:
        return None
    mean = sum(others) / len(others)
    acc = class_acc[target]
    if acc >= SHORTCUT_RATIO * mean:
        return None
    return (f"shortcut: the clean images of the target class {target} are classified "
            f"{100 * acc:.1f}% right against {100 * mean:.1f}% for the other classes; the victim "
            f"learnt the trigger as the class's feature, so its poison success measures that "
            f"feature, not the poison")  # fmt: skip


def headline(row: dict[str, Any]) -> tuple[str, dict | None]:
    """The row's attack metric, named for a chart, and its entry (mean, std, n over seeds)."""
    if row.get("poison"):
        sc = sorted(row["poison"], key=float)[0]
        return f"poison success % (trigger x{sc})", row["poison"][sc]
    return "target misclassification %", row.get("target_misclassification")


def finite(e: dict | None) -> bool:
    """An entry with a mean that is a number."""
    return bool(e) and e.get("mean") == e.get("mean")


def victim_outcome(none: dict | None, defended: dict | None, clean: dict | None
                   ) -> tuple[str, str]:  # fmt: skip
    """(outcome, the numbers behind it) for one victim: entries are {mean, std, n}."""
    if not (finite(none) and finite(defended)):
        return "undecided", "no poison success measured"
    assert none is not None and defended is not None
    if min(none["n"], defended["n"], clean["n"] if finite(clean) else 2) < 2:
        return "one seed", "fewer than two seeds: no spread"
    if finite(clean):
        assert clean is not None
        floor = max(none["std"], clean["std"])
        if none["mean"] - clean["mean"] <= floor:
            why = (f"no defense {100 * none['mean']:.1f} vs clean {100 * clean['mean']:.1f}, "
                   f"spread {100 * floor:.1f}")  # fmt: skip
            return "no backdoor", why
    drop = none["mean"] - defended["mean"]
    spread = max(none["std"], defended["std"])
    why = f"drop {100 * drop:.1f} vs spread {100 * spread:.1f}"
    return ("removes" if drop > spread else "does not remove"), why


def _amounts(base: dict, mine: dict, clean: dict | None) -> dict[str, float]:
    """How much of the backdoor a defense took away and what it cost: ``removed``, the share of
    the poison success above the clean row's that is gone (1: down to the floor); ``cost``,
    natural accuracy points lost against no defense."""
    out: dict[str, float] = {}
    b, m = headline(base)[1], headline(mine)[1]
    c = headline(clean)[1] if clean else None
    if finite(b) and finite(m) and finite(c):
        assert b is not None and m is not None and c is not None
        above = b["mean"] - c["mean"]
        if above > 0:
            out["removed"] = (b["mean"] - m["mean"]) / above
    nb, nm = base.get("natural_acc"), mine.get("natural_acc")
    if finite(nb) and finite(nm):
        assert nb is not None and nm is not None
        out["cost"] = 100 * (nb["mean"] - nm["mean"])
    return out


def verdicts(rows: Sequence[dict[str, Any]], defenses: Sequence[str]) -> list[dict[str, Any]]:
    """One verdict per defense (``none`` excluded) over every victim in ``rows``."""
    by = {(r["defense"], r["classifier"]): r for r in rows}
    victims = list(dict.fromkeys(r["classifier"] for r in rows))
    out = []
    for d in defenses:
        if d == "none":
            continue
        per = {}
        for v in victims:
            base, mine, clean = by.get(("none", v)), by.get((d, v)), by.get((CLEAN, v))
            if base is None or mine is None:
                per[v] = {"outcome": "undecided", "why": "no 'none' row to compare with"}
                continue
            o, why = victim_outcome(headline(base)[1], headline(mine)[1],
                                    headline(clean)[1] if clean else None)  # fmt: skip
            per[v] = {"outcome": o, "why": why, **_amounts(base, mine, clean)}
        outs = [x["outcome"] for x in per.values()]
        took = [o for o in outs if o != "no backdoor"]
        if not outs or any(o in ("one seed", "undecided") for o in outs):
            verdict = "undecided"
        elif not took:
            verdict = "no backdoor to remove"
        elif all(o == "removes" for o in took):
            verdict = "removes the backdoor"
        elif all(o == "does not remove" for o in took):
            verdict = "does not remove the backdoor"
        else:
            verdict = "victim-dependent"
        out.append({"defense": d, "verdict": verdict, "victims": per})
    return out


def _amount_text(x: dict[str, Any]) -> str:
    parts = []
    if "removed" in x:
        parts.append(f"{100 * x['removed']:.0f}% of the poison success above the clean floor "
                     "gone")  # fmt: skip
    if "cost" in x:
        parts.append(f"natural accuracy {0.0 - x['cost']:+.1f} points")
    return "; " + ", ".join(parts) if parts else ""


def format_verdicts(vs: Sequence[dict[str, Any]]) -> str:
    """The verdict lines printed under the table, then the rule."""
    lines = []
    for v in vs:
        per = "; ".join(f"{name}: {x['outcome']} ({x['why']}{_amount_text(x)})"
                        for name, x in v["victims"].items())  # fmt: skip
        lines.append(f"- **{v['defense']}: {v['verdict']}**. {per}")
    return "\n".join([*lines, "", RULE])
