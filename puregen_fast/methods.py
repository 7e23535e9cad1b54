"""The purification methods, one row each (DESIGN 2.1): the one table that the configuration,
the engine, the pipeline, Ray and ``eval experiment`` read.

A method is a name, the models it needs (and those it uses only when given), its stages in order,
whether ``reps`` repeats them, and its help line (the README's method table is checked against
these rows). The stages are the engine's building blocks (`STAGES`); the engine runs them
(`puregen_fast.purifier.Purifier`). A new method made of existing stages is one `register` call:

    register(Method("ddpm+ebm", models=("ebm", "ddpm"), stages=("ddpm", "ebm"),
                    help="DDPM steps, then EBM steps"))

and every command and API that takes a method (``purify --method``, `Purifier`, `PurifyBatches`,
``eval experiment --defenses``) takes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from puregen_fast import paper

__all__ = [
    "METHOD_NAMES",
    "METHOD_SETTINGS",
    "MODELS",
    "STAGES",
    "Method",
    "Stage",
    "get",
    "methods",
    "register",
    "unregister",
]

MODELS = ("ebm", "ddpm")


@dataclass(frozen=True)
class Stage:
    """A step of a method: the model it runs (None: none) and the `EngineConfig` fields it
    reads. A model stage (named after its model) records its settings in the model's entry of
    `Purifier.describe`; the other stages record theirs beside it."""

    name: str
    model: str | None
    settings: tuple[str, ...]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        # rank by EBM energy; the stages after it run on the images at or above the threshold
        Stage("filter", "ebm", ("filter_frac",)),
        Stage("ebm", "ebm", ("ebm_steps", "ebm_eps", "ebm_temp")),
        Stage("ddpm", "ddpm", ("ddpm_steps",)),
        Stage("jpeg", None, ("jpeg_quality",)),
    )
}
# the `EngineConfig` fields that belong to a method's stages (and reps to a repeating one); the
# other fields (seed, backend, precision, ...) are every method's
METHOD_SETTINGS = ("reps", *dict.fromkeys(k for s in STAGES.values() for k in s.settings))


@dataclass(frozen=True)
class Method:
    """One row of the table. ``models``: the models the method needs; ``optional``: those it
    uses when given (their stages are skipped otherwise); ``repeats``: ``reps`` rounds of the
    stages (round r keys their noise apart)."""

    name: str
    models: tuple[str, ...]
    stages: tuple[str, ...]
    help: str
    optional: tuple[str, ...] = ()
    repeats: bool = False

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "+-_" for c in self.name):
            raise ValueError(f"method name {self.name!r}: letters, digits and +-_ only")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown stage(s) {', '.join(unknown)}; "
                             f"the stages are {', '.join(STAGES)}")  # fmt: skip
        if len(set(self.stages)) != len(self.stages):
            # a stage twice in a round would draw the same keyed noise twice: use repeats
            raise ValueError(f"method {self.name!r}: a stage is listed twice")
        if "filter" in self.stages[1:]:
            raise ValueError(f"method {self.name!r}: filter must be the first stage")
        bad = [m for m in (*self.models, *self.optional) if m not in MODELS]
        if bad or set(self.models) & set(self.optional):
            raise ValueError(f"method {self.name!r}: models are {', '.join(MODELS)}, each "
                             f"needed or optional, not both")  # fmt: skip
        given = (*self.models, *self.optional)
        for s in self.stages:
            model = STAGES[s].model
            if model is not None and model not in given:
                raise ValueError(f"method {self.name!r}: stage {s} runs the {model.upper()}, "
                                 f"which the method neither needs nor takes")  # fmt: skip
        missing = [m for m in self.models if m not in {STAGES[s].model for s in self.stages}]
        if missing:
            raise ValueError(f"method {self.name!r}: needs {', '.join(missing)} but no stage "
                             "runs it")  # fmt: skip

    def uses(self, model: str, given: bool = False) -> bool:
        """Whether the method runs ``model`` (``given``: one was passed, for optional ones)."""
        return model in self.models or (given and model in self.optional)

    @property
    def model_free(self) -> bool:
        """No model at all (jpeg, none): nothing for a sampler to do."""
        return not self.models and not self.optional

    @property
    def filters(self) -> bool:
        """Ranks the data set by energy first: needs one global threshold (DESIGN 2.1)."""
        return bool(self.stages) and self.stages[0] == "filter"

    @property
    def settings(self) -> tuple[str, ...]:
        """The `EngineConfig` fields this method reads (of every stage, optional ones too)."""
        own = ("reps",) if self.repeats else ()
        return own + tuple(k for s in self.stages for k in STAGES[s].settings)

    @property
    def required_settings(self) -> tuple[str, ...]:
        """The fields that change this method's output whatever models are given (a stage of an
        optional model counts only when that model is given)."""
        own = ("reps",) if self.repeats else ()
        return own + tuple(k for s in self.stages if STAGES[s].model not in self.optional
                           for k in STAGES[s].settings)  # fmt: skip

    @property
    def recorded(self) -> tuple[str, ...]:
        """The settings `Purifier.describe` records beside the models' entries."""
        own = ("reps",) if self.repeats else ()
        return own + tuple(k for s in self.stages if s not in MODELS
                           for k in STAGES[s].settings)  # fmt: skip


_TABLE: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a row; ValueError if the name is taken."""
    if method.name in _TABLE:
        raise ValueError(f"method {method.name!r} exists already")
    _TABLE[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a row (a test's throwaway method)."""
    del _TABLE[name]


def get(name: str) -> Method:
    """The row of ``name``; ValueError listing the methods otherwise."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_TABLE)}") from None


def methods() -> tuple[Method, ...]:
    """Every row, in the table's order."""
    return tuple(_TABLE.values())


class _Names(Sequence[str]):
    """The method names, read from the table at each use, so a method registered after import
    is a choice of every flag and check (argparse takes any container for ``choices``)."""

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(_TABLE)[i]

    def __len__(self) -> int:
        return len(_TABLE)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_TABLE))

    def __contains__(self, name: object) -> bool:
        return name in _TABLE

    def __repr__(self) -> str:
        return repr(tuple(_TABLE))


METHOD_NAMES: Sequence[str] = _Names()

_EBM_HELP = (
    "Langevin on the EBM: `x <- x - eps^2/2 * grad(sum E(x)/temp) + eps * z`, `--ebm-steps` "
    f"steps (the paper's {paper.LANGEVIN_STEPS})"
)
_DDPM_HELP = (
    f"forward-noise to t = `--ddpm-steps` (the paper's {paper.DDPM_STEPS}), reverse t-1..0 with "
    "the DDPM posterior (x0 clipped)"
)
for _m in (
    Method("ebm", ("ebm",), ("ebm",), _EBM_HELP),
    Method("ddpm", ("ddpm",), ("ddpm",), _DDPM_HELP),
    Method("ebm+ddpm", ("ebm", "ddpm"), ("ebm", "ddpm"), 'EBM steps, then DDPM steps ("Naive")'),
    Method("reps", ("ebm", "ddpm"), ("ebm", "ddpm"),
           "`--reps` rounds of (EBM, DDPM), each with the given (smaller) step counts",
           repeats=True),
    Method("filt", ("ebm",), ("filter", "ebm", "ddpm"),
           "rank by EBM energy; purify only the highest-energy `--filter-frac` (EBM, then DDPM "
           "if given)", optional=("ddpm",)),
    Method("jpeg", (), ("jpeg",), "JPEG re-encode at `--jpeg-quality` (the paper's baseline)"),
    Method("none", (), (), "copy"),
):  # fmt: skip
    register(_m)
del _m
