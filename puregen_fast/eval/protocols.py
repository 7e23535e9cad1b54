"""Named profiles of `eval experiment`: the victims and the measurement as one documented set.

* ``ours`` (default): fast victims that learn small sets well (airbench, and a ResNet-18 with
  Nesterov momentum, reflect padding and the training set's own statistics), poison success
  at trigger x1 and x3.
* ``paper``: as the authors measure (SunayBhat1/PureGen_PoisonDefense at c03507e): one victim,
  the CIFAR ResNet-18 trained from scratch with plain momentum SGD (lr 0.1, momentum 0.9,
  weight decay 5e-4, no Nesterov; utils/classifier.py 1036), batch 128, 200 epochs, the rate
  x0.1 at epochs 100 and 150 (MultiStepLR stepped per epoch; config.ini 12-22, 1085), plain
  cross-entropy (train_classifier.py 96), random crop with 4 black pixels of padding and a
  horizontal flip (torchvision RandomCrop(padding=4) before Normalize; utils/classifier.py
  790-818), the fixed normalisation constants of the data set (utils/classifier.py 32-39), no
  test-time augmentation; Narcissus poison success on every non-target test image at trigger
  x1 and x2 (range(1, 3); utils/classifier.py 1144), x1 the headline; the triggered test images
  and the purified training images quantised by truncation (ToPILImage: scripts/PureGen.py
  95-97), the engine's ``quantize="trunc"``. The Narcissus poisoning of each data set as theirs:
  500 images, the last of the target class (config.ini 24-25), except CINIC-10's 900 drawn at
  random (config.ini 210-215); on STL-10 the test images get the trigger file as read, 32x32
  at the top-left corner, not the 96x96 resize the training images got (utils/classifier.py
  1150-1169 take the unresized array that utils/purification.py 188 and 223 return).

``ours`` poisons 500, the last of the class, on every data set, on STL-10 tests with the
trigger the training images got, and rounds purified images to the nearest level (the engine's
default). ``--count``, ``--random-select`` and ``--trigger-scale``
replace a profile's choice.
"""

from __future__ import annotations

from typing import Any

from puregen_fast.eval.poisons import authors_dataset, authors_narcissus
from puregen_fast.eval.victims import PAPER_RESNET18, ClassifierSpec

__all__ = ["PROFILES", "describe_profile", "profile_settings"]

PROFILES = ("ours", "paper")
# the authors' normalisation constants per data set (CINIC-10 and STL-10 use CIFAR-10's)
_NORMALIZE = {"tinyimagenet": "tinyimagenet"}


def _paper_victim(dataset: str) -> ClassifierSpec:
    opts = {**PAPER_RESNET18, "normalize": _NORMALIZE.get(dataset, "cifar10")}
    return ClassifierSpec("resnet18", tuple(sorted(opts.items())), "resnet18-paper")


def profile_settings(name: str, dataset: str, poisons_dataset: str | None = None
                     ) -> dict[str, Any]:  # fmt: skip
    """The victims (``classifiers``), ``scales``, ``quantize`` (poisons and triggered test
    images), ``purify_quantize`` (the purified images: the engine's ``quantize``, None for its
    default), the Narcissus poisoning
    (``count``, ``last_n``, ``poison_source``: where it is stated) and which trigger the test
    images get (``trigger_at_test``: ``applied``, the one the training images got, or
    ``file``, the trigger file as read: they differ on STL-10 only) of profile ``name`` for a
    training set ``dataset`` (``poisons_dataset``: the authors' data set it stands for)."""
    if name == "paper":
        count, last_n, where = authors_narcissus(authors_dataset(dataset, poisons_dataset)[0])
        return {"classifiers": (_paper_victim(dataset),), "scales": (1.0, 2.0),
                "quantize": "trunc", "purify_quantize": "trunc", "count": count,
                "last_n": last_n, "poison_source": where, "trigger_at_test": "file"}  # fmt: skip
    if name == "ours":
        return {"classifiers": (ClassifierSpec("airbench"), ClassifierSpec("resnet18")),
                "scales": (1.0, 3.0), "quantize": "trunc", "purify_quantize": None,
                "count": 500, "last_n": True,
                "poison_source": "ours", "trigger_at_test": "applied"}  # fmt: skip
    raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")


def describe_profile(name: str, dataset: str, poisons_dataset: str | None = None) -> str:
    """One line per setting of the profile, as printed at the start of a run."""
    s = profile_settings(name, dataset, poisons_dataset)
    victims = "; ".join(
        f"{c.label} ({c.arch}: " + ", ".join(f"{k}={v}" for k, v in c.options) + ")"
        if c.options else f"{c.label} (its preset)" for c in s["classifiers"]
    )
    scales = ", ".join(f"x{m:g}" for m in s["scales"])
    sel = "the last of the target class" if s["last_n"] else "drawn at random"
    src = "" if s["poison_source"] == "ours" else f", {s['poison_source']}"
    at_test = {"applied": "the trigger the training images got",
               "file": "the trigger file as read (STL-10: 32x32, not resized)"}  # fmt: skip
    return (f"protocol {name}: victims {victims}; poison success at trigger {scales} (headline "
            f"x{s['scales'][0]:g}); quantisation {s['quantize']}, of purified images "
            f"{s['purify_quantize'] or 'round'}; Narcissus poisons "
            f"{s['count']} images, {sel}{src}; test images get "
            f"{at_test[s['trigger_at_test']]}")  # fmt: skip
