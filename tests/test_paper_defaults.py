"""The paper's chain is defined once (issue 23): every default of a step count, step size,
temperature or JPEG quality in the package names `puregen_fast.paper`, none is a second literal
copy. The checker reads every default with `ast` and is also run on planted code, so it is known
to fail."""

from __future__ import annotations

import ast
from pathlib import Path

from puregen_fast import paper

REPO = Path(__file__).resolve().parents[1]
# the settings that take the paper's values, by the names they go by in signatures, fields,
# dictionaries and keyword arguments
CHAIN = {
    "steps": (paper.LANGEVIN_STEPS, paper.DDPM_STEPS),
    "ebm_steps": (paper.LANGEVIN_STEPS,),
    "eps": (paper.LANGEVIN_EPS,),
    "ebm_eps": (paper.LANGEVIN_EPS,),
    "mcmc_eps": (paper.LANGEVIN_EPS,),
    "temp": (paper.LANGEVIN_TEMP,),
    "ebm_temp": (paper.LANGEVIN_TEMP,),
    "mcmc_temp": (paper.LANGEVIN_TEMP,),
    "ddpm_steps": (paper.DDPM_STEPS,),
    "purify_steps": (paper.DDPM_STEPS,),
    "quality": (paper.JPEG_QUALITY,),
    "jpeg_quality": (paper.JPEG_QUALITY,),
}


def _value(node: ast.AST | None) -> object:
    """A literal number (a field's ``_f(150, ...)`` / ``_opt(150, ...)`` counts as one)."""
    if isinstance(node, ast.Call) and node.args:
        node = node.args[0]
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    return None


def copies(source: str) -> list[tuple[int, str, object]]:
    """(line, name, value) of each literal copy of a paper value in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        pairs: list[tuple[str, ast.AST | None]] = []
        if isinstance(node, ast.arguments):
            pos = node.posonlyargs + node.args
            pairs += zip([a.arg for a in pos[len(pos) - len(node.defaults):]], node.defaults)
            pairs += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            pairs.append((node.target.id, node.value))
        elif isinstance(node, ast.Dict):
            pairs += [(k.value, v) for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and isinstance(k.value, str)]  # fmt: skip
        elif isinstance(node, ast.keyword) and node.arg:
            pairs.append((node.arg, node.value))
        for name, v in pairs:
            val = _value(v)
            if name in CHAIN and val is not None and val in CHAIN[name]:
                found.append((getattr(v, "lineno", 0), name, val))
    return found


def test_the_checker_finds_a_planted_copy():
    planted = (
        "def f(x, steps=150, *, temp=1e-4):\n    pass\n"
        "class C:\n    ebm_eps: float = 1.25e-2\n    mcmc_temp: float = _f(1e-4, 'h')\n"
        "d = {'ebm_steps': 150}\ng(ddpm_steps=75)\n"
        "def ok(x, steps=paper.LANGEVIN_STEPS, lr=1e-4, epochs=150):\n    pass\n"
    )
    assert [(n, v) for _, n, v in copies(planted)] == [
        ("steps", 150), ("temp", 1e-4), ("ebm_eps", 1.25e-2), ("mcmc_temp", 1e-4),
        ("ebm_steps", 150), ("ddpm_steps", 75)]  # fmt: skip


def test_every_paper_default_is_defined_once():
    bad = []
    for folder in ("puregen_fast", "kernels", "train"):
        for f in sorted((REPO / folder).rglob("*.py")):
            if f == REPO / "puregen_fast" / "paper.py":
                continue
            bad += [f"{f.relative_to(REPO)}:{line}: {name}={val}"
                    for line, name, val in copies(f.read_text())]  # fmt: skip
    assert not bad, "a second copy of the paper's chain (name puregen_fast.paper):\n" + "\n".join(
        bad)
    # and paper.py holds each value once
    assert (paper.LANGEVIN_STEPS, paper.LANGEVIN_EPS, paper.LANGEVIN_TEMP, paper.DDPM_STEPS) == (
        150, 1.25e-2, 1e-4, 75)  # fmt: skip
