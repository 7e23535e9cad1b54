"""``eval experiment``: the paper's protocol in one run. Poison the training set (any attack) ->
purify it with each defense through the engine and the shard writer (`purify_dataset`, so an
interrupted purification resumes) -> train each victim with each seed -> the table, the verdict
per defense (`puregen_fast.eval.verdict`) and the chart.

Every run also trains each victim on the clean training set (the ``clean`` row): the natural
accuracy the poison and the defenses are measured against, and the trigger's success on a victim
that never saw a poison, the floor of poison success.

`run_protocol` is the whole run, as named steps: `prepare_out`, `load_sets`, `load_models`, then
per target class `_poison`, `_detect` (how well the EBM energy finds the poisons) and per
training set (clean, each defense) `_training_set` and `_victim_cells`, then `write_outputs`.
`eval run` (one victim on one set) is `puregen_fast.eval.run`.
"""

# The output folder is content-addressed (`puregen_fast.eval.cells`): the poisoned set lives
# under a digest of the attack settings and the training data, each purified copy under a digest
# of that plus the defense settings (model sha256s included), and each cell's result under a
# digest of everything that decides it. A rerun (after Ctrl-C, a crash, or with more seeds,
# defenses or classifiers) reuses every finished piece whose settings are unchanged and computes
# only the rest; two runs side by side share the cells instead of computing one twice.

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puregen_fast import methods
from puregen_fast.config import EngineConfig
from puregen_fast.data.datasets import Dataset, open_dataset
from puregen_fast.data.io import atomic_write, atomic_write_json, file_digest
from puregen_fast.data.manifest import MANIFEST
from puregen_fast.data.preview import PREVIEW, make_preview
from puregen_fast.data.reader import load_purified
from puregen_fast.errors import UsageError
from puregen_fast.eval.cells import CellStore, array_digest, digest, held, slug
from puregen_fast.eval.charts import save_chart, save_curve
from puregen_fast.eval.classifier import (
    ARCHS,
    Classifier,
    TrainConfig,
    fit_accuracy,
    train_classifier,
    undertrained_message,
)
from puregen_fast.eval.detection import detection, format_detection
from puregen_fast.eval.inputs import (
    Found,
    find_inputs,
    format_inputs,
    inputs_record,
    trigger_file,
)
from puregen_fast.eval.metrics import (
    evaluate_predictions,
    format_protocol_table,
    image_change,
    mean_image_change,
    summarize_cells,
)
from puregen_fast.eval.poison import load_trigger, poison_dataset, save_poisoned_npz
from puregen_fast.eval.poisons import (
    PoisonSpec,
    authors_dataset,
    describe_selection,
    poison_with_published,
)
from puregen_fast.eval.run import EvalSet
from puregen_fast.eval.scan_charts import save_separation, scan_pictures
from puregen_fast.eval.verdict import CLEAN, format_verdicts, shortcut_message, verdicts
from puregen_fast.eval.victims import ClassifierSpec, parse_classifier_spec
from puregen_fast.models.checkpoints import DEFAULT_EBM
from puregen_fast.pipeline import purify_dataset
from puregen_fast.purifier import Purifier, chain_line
from puregen_fast.purifier import load_models as engine_models
from puregen_fast.runtime import describe_device
from puregen_fast.scan import energy_purifier, scan_dataset
from puregen_fast.version import __version__

__all__ = [
    "DEFENSES",
    "DROP",
    "DROP_FRAC",
    "EXPERIMENT_FORMAT",
    "ClassifierSpec",
    "Protocol",
    "SWEEPABLE",
    "changes",
    "check_protocol",
    "defenses",
    "parse_classifier_spec",
    "parse_sweep",
    "run_protocol",
    "variants",
]

# the defenses are the engine's methods (`puregen_fast.methods`), read live from its table, and
# `DROP`: detect and drop, the one defense that removes images instead of purifying them
DEFENSES = methods.METHOD_NAMES
DROP = "drop"
# drop's default share of the training set, the highest-energy images (--drop-frac): 0.05, 0.1
# and 0.2 all left the photo experiment's backdoor in place (bench/results/photos-drop-sweep.md),
# so no share measured best and no recommendation rests on it
DROP_FRAC = 0.1
EXPERIMENT_FORMAT = "puregen-fast-experiment"
ATTACKS = ("narcissus", "gradient-matching", "bullseye-polytope")
# the engine settings --sweep may vary and their parsers; the defenses each one changes are
# the methods that read it (`changes`)
SWEEPABLE: dict[str, Callable[[str], Any]] = {
    "ebm_steps": int, "ebm_eps": float, "ebm_temp": float, "ddpm_steps": int,
    "jpeg_quality": int, "reps": int, "filter_frac": float, "drop_frac": float,
}  # fmt: skip
# the engine's own settings (method and device are the experiment's)
_ENGINE = tuple(f for f in EngineConfig.__dataclass_fields__ if f not in ("method", "device"))


def changes(setting: str, defense: str) -> bool:
    """Whether ``setting`` changes what ``defense`` computes, whatever models are given."""
    if defense == DROP:  # ranks by the EBM's energy alone, without a chain
        return setting == "drop_frac"
    return setting in methods.get(defense).required_settings


def defenses() -> tuple[str, ...]:
    """Every defense `eval experiment` runs: the engine's methods, then `DROP`."""
    return (*DEFENSES, DROP)


def uses_ebm(defense: str) -> bool:
    return defense == DROP or methods.get(defense).uses("ebm")


def _ebm_defenses() -> list[str]:
    return [d for d in defenses() if uses_ebm(d)]

Log = Callable[[str], None]


@dataclass(frozen=True)
class Protocol:
    """Everything `run_protocol` does.

    ``attack``: ``narcissus`` (a trigger from ``trigger``, an .npy file or a folder of
    ``best_noise_lab<k>.npy``, or else the authors' published ones from ``poisons``),
    ``gradient-matching`` or ``bullseye-polytope`` (the authors' poisons from ``poisons``;
    ``targets`` are then their trial numbers). ``count``: images of the target class to poison
    (None: all of them). ``purify``: the engine's settings for every defense (``ebm``/``ddpm``
    sources, steps, ``jpeg_quality``, ``seed``, ``batch_size``, ...). ``sweep``: settings to vary
    (`SWEEPABLE` names, each with its values): every defense that a swept setting changes runs
    once per combination, as its own row (`variants`). ``ebm_poisoned``: an EBM trained on the
    poisoned training set itself (the case of a user who has only their own, possibly poisoned,
    data): every EBM defense also runs with it, as the row ``<defense> (EBM trained on poisoned)``.
    """

    dataset: str
    data_dir: str | None
    test: EvalSet
    attack: str
    targets: tuple[int, ...]
    defenses: tuple[str, ...]
    classifiers: tuple[ClassifierSpec, ...]
    seeds: tuple[int, ...]
    split: str = "train"
    trigger: str | None = None
    poisons: str | None = None
    poisons_dataset: str | None = None
    count: int | None = 500
    last_n: bool = True
    quantize: str = "trunc"
    scales: tuple[float, ...] = (1.0, 3.0)
    purify: tuple[tuple[str, Any], ...] = ()
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    ebm_poisoned: str | None = None
    profile: str = "ours"  # `puregen_fast.eval.protocols`: what chose the victims and scales
    target_image: str | None = None  # Gradient Matching's target.pickle (`find_gm_target`)
    # which trigger the test images get: "applied" (the one the training images got) or
    # "file" (the trigger file as read: the authors' STL-10 test, utils/classifier.py 1150-1169)
    trigger_at_test: str = "applied"

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["test"] = {k: getattr(self.test, k) for k in self.test.__dataclass_fields__}
        d["classifiers"] = [c.to_dict() for c in self.classifiers]
        d["purify"] = dict(self.purify)
        d["sweep"] = {k: list(v) for k, v in self.sweep}
        for k in ("targets", "defenses", "seeds", "scales"):
            d[k] = list(d[k])
        return d


def parse_sweep(text: str) -> tuple[str, tuple[Any, ...]]:
    """``NAME=V1,V2,...`` (``--sweep``), e.g. ``ebm-steps=20,40,80,150``; UsageError naming the
    flag for an unknown name or a bad value."""
    name, eq, vals = text.partition("=")
    key = name.strip().replace("-", "_")
    if not eq or key not in SWEEPABLE:
        raise UsageError(f"--sweep {text!r}: expected NAME=V1,V2,... with NAME one of "
                         f"{', '.join(k.replace('_', '-') for k in SWEEPABLE)}")  # fmt: skip
    parse = SWEEPABLE[key]
    try:
        values = tuple(parse(v.strip()) for v in vals.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sweep {text!r}: a value is not a {parse.__name__}") from None
    if not values or len(set(values)) != len(values):
        raise UsageError(f"--sweep {text!r}: give distinct values")
    if any(not (v > 0 and v == v and v != float("inf")) for v in values):
        raise UsageError(f"--sweep {text!r}: values must be finite and > 0")
    if key in ("filter_frac", "drop_frac") and max(values) > 1:
        raise UsageError(f"--sweep {text!r}: a fraction lies in (0, 1]")
    return key, values


def variants(p: Protocol) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, defense, setting overrides) per row of purified victims: one per defense,
    or one per combination of the swept settings that change it, labelled
    ``ebm (ebm-steps=20)``."""
    out = []
    for d in p.defenses:
        axes = [(k, vs) for k, vs in p.sweep if changes(k, d)]
        combos: list[dict[str, Any]] = [{}]
        for k, vs in axes:
            combos = [{**c, k: v} for c in combos for v in vs]
        for c in combos:
            tag = ", ".join(f"{k.replace('_', '-')}={v:g}" for k, v in c.items())
            out.append((f"{d} ({tag})" if tag else d, d, c))
            if p.ebm_poisoned is not None and uses_ebm(d):
                tag = ", ".join(["EBM trained on poisoned", *filter(None, [tag])])
                out.append((f"{d} ({tag})", d, {**c, "ebm": p.ebm_poisoned}))
    return out


def check_protocol(p: Protocol) -> None:
    """UsageError (naming the flag) for settings that cannot run, before anything is read."""
    if p.attack not in ATTACKS:
        raise UsageError(f"--attack {p.attack!r}: choose one of {', '.join(ATTACKS)}")
    if not p.targets:
        raise UsageError("--target-class: give at least one target class")
    if len(set(p.targets)) != len(p.targets) or min(p.targets) < 0:
        raise UsageError(f"--target-class {list(p.targets)}: distinct classes >= 0 expected")
    bad = [d for d in p.defenses if d not in defenses()]
    if bad or not p.defenses:
        raise UsageError(f"--defenses {','.join(p.defenses)}: unknown {', '.join(bad) or '(none)'}"
                         f"; choose from {','.join(defenses())}")  # fmt: skip
    if len(set(p.defenses)) != len(p.defenses):
        raise UsageError(f"--defenses {','.join(p.defenses)}: a defense is listed twice")
    if not p.classifiers or any(c.arch not in ARCHS for c in p.classifiers):
        raise UsageError(f"--classifier: give one or more of {', '.join(ARCHS)}")
    labels = [c.label for c in p.classifiers]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--classifier: two classifiers share the name {labels}; add name=...")
    if not p.seeds or len(set(p.seeds)) != len(p.seeds):
        raise UsageError(f"--seeds {list(p.seeds)}: distinct seeds expected")
    if p.attack == "narcissus" and p.trigger is None and p.poisons is None:
        raise UsageError(
            "--attack narcissus needs --trigger FILE|DIR (e.g. from `eval trigger --method "
            "narcissus`) or --poisons SRC (the authors' triggers)"
        )
    if p.ebm_poisoned is not None and not any(uses_ebm(d) for d in p.defenses):
        raise UsageError(f"--ebm-poisoned applies to the EBM defenses "
                         f"({', '.join(_ebm_defenses())}); --defenses has none")  # fmt: skip
    if p.attack != "narcissus" and p.trigger is not None:
        raise UsageError(f"--trigger applies to --attack narcissus, not {p.attack}")
    if p.attack != "narcissus" and p.poisons is None:
        raise UsageError(f"--attack {p.attack} needs --poisons SRC (the authors' poisons: a "
                         f"folder or hf:SunayBhat1/puregen-poisons)")  # fmt: skip
    keys = [k for k, _ in p.sweep]
    if len(set(keys)) != len(keys):
        raise UsageError(f"--sweep: a setting is swept twice ({', '.join(keys)})")
    unused = [k for k in keys if not any(changes(k, d) for d in p.defenses)]
    if unused:
        raise UsageError(f"--sweep {unused[0].replace('_', '-')}: changes none of --defenses "
                         f"{','.join(p.defenses)}")  # fmt: skip


# ----------------------------------------------------------------------------- the steps


@dataclass
class Sets:
    """The training set and the (first ``limit``) test images, read once."""

    train: Dataset
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    test_key: dict[str, Any]  # what decides the test set, for the cells' keys


def prepare_out(p: Protocol, out: str | os.PathLike[str]) -> Path:
    """The experiment folder, with ``plan.json`` written; UsageError naming ``--out``."""
    root = Path(out).expanduser()
    try:
        (root / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {root}: cannot create the folder ({e})") from e
    atomic_write_json(root / "plan.json", p.to_dict(), sort_keys=False)
    return root


def load_sets(p: Protocol, *, quiet: bool = False) -> Sets:
    """The training and test sets, checked against each other and the target classes."""
    train = open_dataset(p.dataset, p.data_dir, p.split, quiet=quiet)
    t = p.test
    test = open_dataset(t.dataset, t.data_dir, t.split, quiet=quiet)
    n_test = len(test) if t.limit is None else min(len(test), t.limit)
    x_test, y_test = np.asarray(test.images[:n_test]), np.asarray(test.labels[:n_test], np.int64)
    if tuple(train.images.shape[1:]) != tuple(x_test.shape[1:]):
        raise UsageError(f"--dataset images are {train.images.shape[1:3]} but --test-dataset "
                         f"images are {x_test.shape[1:3]}: they must match")  # fmt: skip
    k = len(train.class_names)
    if len(test.class_names) != k:
        raise UsageError(f"--dataset has {k} classes but --test-dataset "
                         f"{len(test.class_names)}: they must be the same classes")  # fmt: skip
    if p.attack == "narcissus" and max(p.targets) >= k:
        raise UsageError(f"--target-class {max(p.targets)}: the data set has {k} classes "
                         f"(0..{k - 1})")  # fmt: skip
    test_key = {"describe": test.describe(), "n": n_test, "images": array_digest(x_test)}
    return Sets(train, x_test, y_test, k, test_key)


def load_models(defenses: Sequence[str], pur: Mapping[str, Any],
                ebm_poisoned: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The models the defenses need, by source, through purify's loader
    (`puregen_fast.purifier.load_models`): the authors' published checkpoints unless
    ``ebm``/``ddpm`` names others; and the EBM trained on the poisoned set, if given and an
    EBM is used. Keyed ``ebm:<source>`` and ``ddpm``."""
    ebm_src = pur.get("ebm") or DEFAULT_EBM

    def named(flag: str, src: str) -> Callable[[str, Callable[[], Any]], Any]:
        def attempt(model_flag: str, load: Callable[[], Any]) -> Any:
            try:
                return load()
            except UsageError as e:  # which EBM: the checkpoint's message says --ebm for both
                if model_flag != "--ebm":
                    raise
                raise UsageError(f"{flag} {src}: {e}") from e

        return attempt

    # drop ranks by the EBM's energy: it needs what the ebm method needs
    wanted = [("ebm" if d == DROP else d) for d in defenses]
    ebm, ddpm = engine_models(wanted, pur.get("ebm"), pur.get("ddpm"),
                              attempt=named("--ebm", ebm_src))  # fmt: skip
    models: dict[str, Any] = {}
    if ebm is not None:
        models[f"ebm:{ebm_src}"] = ebm
        if ebm_poisoned:
            models[f"ebm:{ebm_poisoned}"] = engine_models(
                "ebm", ebm_poisoned, attempt=named("--ebm-poisoned", ebm_poisoned)).ebm
    if ddpm is not None:
        models["ddpm"] = ddpm
    return models


def _poison(p: Protocol, train: Dataset, target: int, out: Path, log: Log,
            found: Sequence[Found] = ()) -> Path:  # fmt: skip
    """The poisoned training set for ``target`` as .npz (made once: its name is a digest of
    the attack settings, the trigger's bytes and the training images). ``found``: the inputs
    `find_inputs` found (Gradient Matching's target image)."""
    key: dict[str, Any] = {
        "attack": p.attack, "target": target, "count": p.count, "last_n": p.last_n,
        "quantize": p.quantize, "train": train.describe(), "poisons": p.poisons,
        "poisons_dataset": p.poisons_dataset,
        "images": array_digest(train.images),
    }  # fmt: skip
    trig_path = None
    if p.attack == "narcissus" and p.trigger is not None:
        trig_path = trigger_file(p.trigger, target, len(p.targets))
        key["trigger_sha256"] = file_digest(trig_path)
    name = authors_dataset(train.name, p.poisons_dataset)[0]
    if trig_path is None and name == "stl10":
        key["stl10"] = "remapped, resized to 96x96"  # not the copies made before that was done
    gm = [f.path for f in found if f.target == target and f.what == "target image"]
    pois = [Path(f.path).parent for f in found if f.target == target and f.what == "poisons"]
    if p.attack == "gradient-matching" and gm and pois and Path(gm[0]).parent != pois[0]:
        key["target_image"] = gm[0]  # found outside the poison folder (copies made before
        # it was looked for there lack it)
    if p.attack == "bullseye-polytope":
        key["train_subset"] = "the authors' 50 a class"  # not the copies made before it was
    folder = out / f"poison-{slug(p.attack)}-{target}-{digest(key)}"
    path = folder / "poisoned.npz"
    if path.is_file():
        return path
    if trig_path is not None:
        ps = poison_dataset(
            train.images, train.labels, load_trigger(trig_path, tuple(train.images.shape[1:3])),
            target, p.count, class_names=list(train.class_names), last_n=p.last_n,
            quantize=p.quantize,
        )  # fmt: skip
        n = int(np.sum(np.asarray(train.labels) == target))
        log(f"Narcissus: the trigger {trig_path} added to "
            f"{describe_selection(n, target, p.count, p.last_n, 0)}")  # fmt: skip
    else:
        spec = PoisonSpec(p.attack, name, target)
        ps = poison_with_published(
            train.images, train.labels, list(train.class_names), spec, p.poisons,
            count=p.count, last_n=p.last_n, quantize=p.quantize,
            gm_target=gm[0] if gm and p.attack == "gradient-matching" else p.target_image,
        )  # fmt: skip
        log(str(ps.extra.get("poisoning", "")))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "attack.json", key)
    save_poisoned_npz(ps, path)
    log(f"poisoned {len(ps.poison_idx)} training images ({p.attack}, target {target}) -> {path}")
    return path


def _purifier(defense: str, pur: Mapping[str, Any], models: Mapping[str, Any], device
              ) -> Purifier:  # fmt: skip
    """The engine for ``defense``: the models its row uses, and the engine settings given, of
    which the method-specific ones only where the method reads them (``--reps`` does not
    refuse ``ebm``)."""
    row = methods.get(defense)
    own = set(methods.METHOD_SETTINGS) - set(row.settings)
    kw = {k: pur[k] for k in _ENGINE if pur.get(k) is not None and k not in own}
    ebm = models.get(f"ebm:{pur.get('ebm') or DEFAULT_EBM}") if row.uses("ebm") else None
    ddpm = models.get("ddpm") if row.uses("ddpm", given=bool(pur.get("ddpm"))) else None
    try:
        cfg = EngineConfig(method=defense, device=str(device), **kw)
        return Purifier.from_config(cfg, ebm, ddpm)
    except ValueError as e:
        raise UsageError(f"--defenses {defense}: {e}") from e


def _purifier_identity(purifier: Purifier) -> dict:
    """What decides a purified copy's bytes, for its folder's name; any device."""
    d = purifier.identity()
    d.pop("device", None)
    return d


def _purify(
    poisoned: Path, defense: str, purifier: Purifier, pur: Mapping[str, Any], quiet: bool,
    log: Log,
) -> tuple[Path, dict]:  # fmt: skip
    """``poisoned`` through the engine and the shard writer into a folder next to it, named by
    a digest of the defense's settings; an unfinished folder is resumed, a finished one reused.
    A second run waits for the first to finish the same folder, then reuses it."""
    ident = _purifier_identity(purifier)
    folder = poisoned.parent / f"{slug(defense)}-{digest(ident)}"
    with held(poisoned.parent / f".{folder.name}.lock"):
        if (folder / MANIFEST).is_file():
            return folder, ident
        ds = open_dataset("npz", poisoned, "train", quiet=True)
        t0 = time.perf_counter()
        purify_dataset(
            ds, purifier, folder, batch_size=min(int(pur.get("batch_size") or 64), len(ds)),
            resume=folder.exists(), quiet=quiet,
            extra_manifest={"command": {"eval_experiment": True, "defense": defense}},
        )  # fmt: skip
    chain = f" ({chain_line(purifier)})" if purifier.uses_ebm else ""
    log(f"purified {len(ds)} images with {defense}{chain} in {time.perf_counter() - t0:.1f}s -> "
        f"{folder}")  # fmt: skip
    return folder, ident


def _detect(
    poisoned: Path, target: int, pur: Mapping[str, Any], models: Mapping[str, Any],
    ebm_poisoned: str | None, device: torch.device, log: Log,
) -> list[dict[str, Any]]:  # fmt: skip
    """Where the poisons are known: each EBM the run loaded (``--ebm``, ``--ebm-poisoned``)
    scans the poisoned training set (`puregen_fast.scan`, into a folder beside it named by the
    model, resumed like a purified copy) and `eval.detection` measures how well its energy
    finds the poisons, at filt's fraction. Empty without an EBM defense."""
    frac = _filt_frac(pur)
    found = []
    for flag, src in (("--ebm", pur.get("ebm") or DEFAULT_EBM), ("--ebm-poisoned", ebm_poisoned)):
        ebm = models.get(f"ebm:{src}") if src else None
        if ebm is None:
            continue
        energies, folder, _ = _scan(poisoned, ebm, pur, device)
        with np.load(poisoned, allow_pickle=False) as z:
            idx = z["poison_idx"]
        d = {"target": target, "ebm": f"{flag} {src}", "scan": str(folder),
             **detection(energies, idx, filter_frac=frac)}  # fmt: skip
        auc = "n/a" if d["auc"] is None else f"{d['auc']:.3f}"
        log(f"detection by the energy of {flag} {src} (target {target}): AUC {auc}; poisons in "
            "the top " + ", ".join(f"{100 * t['frac']:g}%: {t['poisons']} of {t['k']}"
                                   for t in d["top"])
            + f"; filt {frac:g}: {d['filt']['poisons']} of its {d['filt']['selected']} -> "
            f"{folder}")  # fmt: skip
        found.append({**d, "_energies": energies, "_mask": np.isin(
            np.arange(len(energies)), idx)})  # fmt: skip
    return found


def _filt_frac(pur: Mapping[str, Any]) -> float:
    return float(pur.get("filter_frac") or EngineConfig.filter_frac)


def _scan(poisoned: Path, ebm: torch.nn.Module, pur: Mapping[str, Any], device: torch.device
          ) -> tuple[np.ndarray, Path, dict]:  # fmt: skip
    """The EBM energy of every image of the poisoned set (`puregen_fast.scan`, into a folder
    beside it named by the model, resumed like a purified copy), the folder, and the model's
    identity."""
    purifier = energy_purifier(ebm, device)
    ident = purifier.identity().get("ebm")
    folder = poisoned.parent / f"scan-{digest(ident)}"
    with held(poisoned.parent / f".{folder.name}.lock"):
        ds = open_dataset("npz", poisoned, "train", quiet=True)
        r = scan_dataset(ds, purifier, folder, filter_frac=_filt_frac(pur), quiet=True,
                         batch_size=min(int(pur.get("batch_size") or 64), len(ds)),
                         resume=folder.exists(), pictures=scan_pictures())  # fmt: skip
    assert r is not None  # one process: rank 0
    return r.table.energies, folder, ident


def _attack_eval(poisoned: Path, trigger_at_test: str = "applied") -> dict[str, Any]:
    """What the metrics need, read back from the poisoned .npz: the trigger (Narcissus; with
    ``trigger_at_test="file"``, the trigger file as read where it differs from the one the
    training images got, as the authors test STL-10) or the target image and the poison class
    (Gradient Matching, Bullseye Polytope)."""
    with np.load(poisoned, allow_pickle=False) as z:
        out: dict[str, Any] = {"target_class": int(z["target_class"])}
        if "trigger" in z.files and z["trigger"].size:
            out["trigger"] = np.asarray(z["trigger"], np.float32)
        if "test_trigger" in z.files:  # STL-10: the file's 32x32, not the 96x96 resize
            out["trigger_at_test"] = trigger_at_test
            if trigger_at_test == "file":
                out["trigger"] = np.asarray(z["test_trigger"], np.float32)
        if "target_image" in z.files:
            out["target_image"] = np.asarray(z["target_image"], np.uint8).reshape(
                -1, *z["x"].shape[1:]
            )
    return out


@dataclass
class TrainingSet:
    """One training set a row of victims learns from: the clean set or a defense's output."""

    defense: str  # CLEAN or one of DEFENSES
    x: np.ndarray
    y: np.ndarray
    source: str  # what decides the images, for the cells' keys
    purifier: dict | None  # the purifier's identity, None for clean and none
    change: dict | None  # image_change against the poisoned set; None for clean and drop
    keep: np.ndarray | None = None  # drop: the poisoned set's images kept (a mask)
    removed: dict | None = None  # drop: how many images, poisons among them, it removed


def _training_set(
    label: str, defense: str, poisoned: Path, x_poisoned: np.ndarray, sets: Sets,
    pur: Mapping[str, Any], models: Mapping[str, Any], device: torch.device, quiet: bool,
    say: Log, preview: int | None = None,
) -> TrainingSet:  # fmt: skip
    """The images a row's victims train on: the clean training set, or the poisoned set
    through ``defense`` with the settings ``pur``, and how far the defense moved them. With
    ``preview=N`` the purified copy's folder gets ``preview.png`` (`puregen_fast.data.preview`:
    N poisoned images, evenly spaced, above the defense's output), also when it is reused."""
    if defense == CLEAN:
        tr = sets.train
        return TrainingSet(CLEAN, np.asarray(tr.images), np.asarray(tr.labels, np.int64),
                           "clean-" + array_digest(tr.images)[:12], None, None)  # fmt: skip
    if defense == DROP:
        return _dropped(label, poisoned, x_poisoned, pur, models, device, say)
    purifier = _purifier(defense, pur, models, device)
    folder, ident = _purify(poisoned, defense, purifier, pur, quiet, say)
    data = load_purified(folder)
    x, y = np.asarray(data.images), np.asarray(data.labels, np.int64)
    ch = image_change(x_poisoned, x)
    if defense != "none":
        psnr = "identical" if ch["psnr_db"] is None else f"PSNR {ch['psnr_db']:.1f} dB"
        say(f"{label} changed the images by {ch['rms']:.2f} levels RMS ({psnr})")
    if preview:  # the folder is finished (its manifest exists): the picture is of a whole run
        pv = make_preview(x_poisoned, x, preview)
        title = (f"{label}: {len(pv)} of {len(x)} poisoned training images, evenly spaced; "
                 "under each, its change in levels RMS (0-255)")  # fmt: skip
        say(f"{label}: {len(pv)} images before and after -> {pv.save(folder / PREVIEW, title)}")
    return TrainingSet(label, x, y, poisoned.parent.name, ident, ch)


def _dropped(
    label: str, poisoned: Path, x_poisoned: np.ndarray, pur: Mapping[str, Any],
    models: Mapping[str, Any], device: torch.device, say: Log,
) -> TrainingSet:  # fmt: skip
    """Detect and drop: the poisoned set without its ``drop_frac`` share of highest EBM
    energy (ties: the lower index stays), and how many poisons and clean images that removed."""
    frac = float(pur.get("drop_frac") or DROP_FRAC)
    src = pur.get("ebm") or DEFAULT_EBM
    energies, _, ident = _scan(poisoned, models[f"ebm:{src}"], pur, device)
    with np.load(poisoned, allow_pickle=False) as z:
        y, idx = np.asarray(z["y"], np.int64), np.asarray(z["poison_idx"], np.int64)
    n = len(energies)
    k = min(n - 1, round(frac * n))  # at least one image stays to train on
    gone = np.argsort(-energies, kind="stable")[:k]
    keep = np.ones(n, bool)
    keep[gone] = False
    hit = int(np.isin(gone, idx).sum())
    removed = {"drop_frac": frac, "dropped": int(k), "poisons": hit, "num_poisons": int(idx.size),
               "clean": int(k) - hit, "num_clean": n - int(idx.size)}  # fmt: skip
    say(f"{label} dropped the {k} highest-energy images ({frac:g} of {n}): {hit} of the "
        f"{idx.size} poisons and {k - hit} of the {n - idx.size} clean images")  # fmt: skip
    return TrainingSet(label, x_poisoned, y, poisoned.parent.name,
                       {"drop_frac": frac, "ebm": ident}, None, keep, removed)  # fmt: skip


def _cell_metrics(
    clf: Classifier, x_test: np.ndarray, y_test: np.ndarray, att: Mapping[str, Any],
    scales: Sequence[float], quantize: str,
) -> dict[str, Any]:  # fmt: skip
    if "trigger" in att:
        return evaluate_predictions(
            clf.predict, x_test, y_test, trigger=att["trigger"],
            target_class=att["target_class"], scales=scales, quantize=quantize,
        )  # fmt: skip
    m = evaluate_predictions(clf.predict, x_test, y_test)
    if "target_image" not in att:
        raise UsageError("the poison set names no target image (target.pickle), so the "
                         "target misclassification cannot be measured")  # fmt: skip
    pred = clf.predict(att["target_image"])
    m["target_misclassification"] = float(np.mean(pred == att["target_class"]))
    m["target_predictions"] = [int(v) for v in pred]
    return m


def _train_cell(
    cfg: TrainConfig, ts: TrainingSet, sets: Sets, att: Mapping[str, Any], p: Protocol,
    device: torch.device, quiet: bool,
) -> dict[str, Any]:  # fmt: skip
    """One cell: train, measure, check that the net fits its training set and that it did not
    learn the target class as a shortcut."""
    clf = train_classifier(ts.x, ts.y, sets.num_classes, cfg, device=device, quiet=quiet)
    t1 = time.perf_counter()
    m = _cell_metrics(clf, sets.x_test, sets.y_test, att, p.scales, p.quantize)
    t = att["target_class"]
    m["target_class_acc"] = m["class_acc"][t] if t < len(m["class_acc"]) else None
    fit = fit_accuracy(clf, ts.x, ts.y)
    warn = undertrained_message(fit, clf)
    return {
        "metrics": m,
        "fit_acc": fit,
        "warnings": [warn] if warn else [],
        "shortcut": shortcut_message(m["class_acc"], t),
        "classifier_config": clf.config,
        "device": describe_device(clf.device),
        "timings": {"train_s": round(clf.train_seconds, 3),
                    "eval_s": round(time.perf_counter() - t1, 3)},
    }  # fmt: skip


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def _cell_line(rec: dict[str, Any]) -> str:
    """What the log says of a finished cell."""
    m = rec["metrics"]
    ps = " ".join(f"x{q['scale']:g} {_fmt_pct(q['poison_success'])}" for q in m.get("poison", []))
    if "target_misclassification" in m:
        ps = f"target {_fmt_pct(m['target_misclassification'])}"
    return f"natural {_fmt_pct(m['natural_acc'])}, poison {ps}"


def _victim_cells(
    store: CellStore, ts: TrainingSet, target: int, att: Mapping[str, Any], sets: Sets,
    p: Protocol, device: torch.device, quiet: bool, say: Log, progress: list[int], total: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every victim and seed trained on ``ts``: one cell each, reused when finished."""
    jobs = []
    for spec in p.classifiers:
        for seed in p.seeds:
            key = {
                "defense": ts.defense, "target": target, "seed": seed,
                "classifier": spec.to_dict(), "attack": p.attack, "poisoned": ts.source,
                "purifier": ts.purifier, "test": sets.test_key, "scales": list(p.scales),
                "quantize": p.quantize,
            }  # fmt: skip
            if "trigger_at_test" in att:  # only where the two triggers differ (STL-10)
                key["trigger_at_test"] = att["trigger_at_test"]

            def compute(spec=spec, seed=seed):
                return _train_cell(spec.config(seed), ts, sets, att, p, device, quiet)

            jobs.append((key, compute))

    def done(rec: dict[str, Any], reused: bool) -> None:
        progress[0] += 1
        k = rec["key"]
        secs = rec["timings"]["train_s"]
        where = f"{ts.defense} | {k['classifier']['name']} | target {target} | seed {k['seed']}"
        say(f"[{progress[0]}/{total}] {where}: {_cell_line(rec)}"
            + (" (reused)" if reused else f" ({secs:.0f}s)"))  # fmt: skip
        for w in rec.get("warnings", []) + ([rec["shortcut"]] if rec.get("shortcut") else []):
            say(f"warning: {where}: {w}")

    return store.run(jobs, done)


def write_outputs(
    root: Path, p: Protocol, sets: Sets, cells: list[dict], changes: dict[str, list[dict]],
    device: torch.device, seconds: float, reused: int, detections: Sequence[dict] = (),
    removals: Sequence[dict] = (),
) -> dict[str, Any]:  # fmt: skip
    """``results.json`` (the plan, every cell, the summary, the verdicts), ``table.md`` (the
    table, the verdict per defense and the rule) and ``chart.png``; returns the result. With
    ``detections`` (`_detect`) also the detection table and ``detection.png``."""
    change = {d: mean_image_change(v) for d, v in changes.items()}
    labels = [v[0] for v in variants(p)]
    summary = summarize_cells(cells, (CLEAN, *labels), [c.label for c in p.classifiers], change)
    verdict = verdicts(summary, labels)
    result = {
        "format": EXPERIMENT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": p.to_dict(),
        "summary": summary,
        "verdicts": verdict,
        "cells": cells,
        "device": describe_device(device),
        "seconds": round(seconds, 2),
        "cells_reused": reused,
        "versions": {"puregen_fast": __version__, "torch": torch.__version__},
        "detection": [{k: v for k, v in d.items() if not k.startswith("_")} for d in detections],
        "removal": list(removals),
    }
    atomic_write_json(root / "results.json", result, sort_keys=False)
    table = format_protocol_table(summary, p.scales) + "\n\n" + format_verdicts(verdict)
    if detections:
        rows = [(f"target {d['target']}, {d['ebm']}", d) for d in detections]
        table += ("\n\nDetection by EBM energy (the poisons known; higher energy is more "
                  "suspicious):\n\n" + format_detection(rows))  # fmt: skip
        save_separation([(name, d["_energies"], d["_mask"], d["filt"]["cut"]) for name, d in rows],
                        root / "detection.png")  # fmt: skip
    if removals:
        table += ("\n\nDetect and drop (the highest-energy share of the poisoned set left out):"
                  "\n\n| row | target | dropped | poisons removed | clean images removed |\n"
                  "|---|---|---|---|---|\n" + "".join(
                      f"| {r['defense']} | {r['target']} | {r['dropped']} ({r['drop_frac']:g}) | "
                      f"{r['poisons']} of {r['num_poisons']} | {r['clean']} of {r['num_clean']} |\n"
                      for r in removals))  # fmt: skip
    atomic_write(root / "table.md", table + "\n")
    save_chart(summary, root / "chart.png", title=_chart_title(p, sets.train))
    save_curve(summary, root / "curve.png", title=_chart_title(p, sets.train))
    return result


def run_protocol(
    p: Protocol,
    out: str | os.PathLike[str],
    device: torch.device,
    *,
    quiet: bool = False,
    log: Log | None = None,
    preview: int | None = None,
) -> dict[str, Any]:
    """Run the protocol (module docstring) into ``out``; returns the result (as written to
    ``results.json``: the plan, every cell, the summary and the verdicts) and writes
    ``table.md`` and ``chart.png`` beside it. ``log`` receives one line per finished step and
    cell. ``preview=N``: each purified copy's folder gets its ``preview.png`` (not part of the
    plan: it changes no number)."""
    check_protocol(p)
    say: Log = log or (lambda s: None)
    root = prepare_out(p, out)
    sets = load_sets(p, quiet=quiet)
    tr = sets.train
    found = find_inputs(p, tr.name, tr.source, np.asarray(tr.labels), sets.test_key["describe"],
                        sets.num_classes, tuple(tr.images.shape[1:3]))  # fmt: skip
    for line in format_inputs(found):  # every input found before anything is trained
        say(line)
    atomic_write_json(root / "inputs.json", inputs_record(found), sort_keys=False)
    pur = dict(p.purify)
    models = load_models(p.defenses, pur, p.ebm_poisoned)
    store = CellStore(root / "cells")
    rows = [(CLEAN, CLEAN, {}), *variants(p)]
    total = len(p.targets) * len(rows) * len(p.classifiers) * len(p.seeds)
    progress = [0]
    cells: list[dict[str, Any]] = []
    changes: dict[str, list[dict]] = {}  # defense -> image_change per target
    detections: list[dict[str, Any]] = []
    removals: list[dict[str, Any]] = []  # drop: what each drop row removed, per target
    t_start = time.perf_counter()
    for target in p.targets:
        poisoned = _poison(p, sets.train, target, root, say, found)
        att = _attack_eval(poisoned, p.trigger_at_test)
        detections += _detect(poisoned, target, pur, models, p.ebm_poisoned, device, say)
        with np.load(poisoned, allow_pickle=False) as z:
            x_poisoned = z["x"]  # what each defense is measured against
            # Bullseye Polytope: the victims train on the authors' subset (`bp_training_subset`)
            subset = z["train_subset"] if "train_subset" in z.files else None
        for label, defense, over in rows:
            ts = _training_set(label, defense, poisoned, x_poisoned, sets, {**pur, **over},
                               models, device, quiet, say, preview)  # fmt: skip
            rows_kept = subset
            if ts.keep is not None:  # drop: what it kept, of the victims' subset if any
                base = np.arange(len(ts.x)) if subset is None else subset
                rows_kept = base[ts.keep[base]]
                removals.append({"target": target, "defense": label, **(ts.removed or {})})
            if rows_kept is not None:
                ts.x, ts.y = ts.x[rows_kept], ts.y[rows_kept]
            if ts.change is not None:
                changes.setdefault(label, []).append(ts.change)
            cells += _victim_cells(store, ts, target, att, sets, p, device, quiet, say, progress,
                                   total)  # fmt: skip
    return write_outputs(root, p, sets, cells, changes, device, time.perf_counter() - t_start,
                         store.reused, detections, removals)  # fmt: skip


def _chart_title(p: Protocol, train: Dataset) -> str:
    src = Path(train.source).name if train.source else train.name
    return f"{p.attack} on {src}: {len(p.seeds)} seed(s), target(s) {list(p.targets)}"
