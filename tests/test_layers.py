"""The package's imports point one way (DESIGN 1): every import, function-local ones included, is
read from the source with `ast` and checked against the layer order, and the module graph must
have no circle. The checker is also run on small planted trees, so it is known to fail."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the installed layout: folder on disk -> package name (pyproject's package-dir mapping)
ROOTS = {"puregen_fast": "puregen_fast", "kernels": "puregen_fast.kernels",
         "train": "puregen_fast.train"}  # fmt: skip

# a module may import modules of its own group and of groups with a lower rank
RANK = {
    "errors": 0,
    "version": 0,
    "paper": 0,  # the paper's chain (DESIGN 2.1): the defaults every layer takes by name
    "methods": 1,  # the table of purification methods (it names the paper's chain in its help)
    "noise": 1,
    "runtime": 1,
    "io": 1,  # data/io.py, the one atomic-write helper, serves every layer
    "pickle_scan": 1,  # data/pickle_scan.py: every pickle reader (data, models, eval) scans first
    "models": 2,
    "data": 2,
    "dist": 2,
    "kernels": 3,  # tensors only: the noise stream and the schedule's coefficient layout
    "reference": 3,  # never the kernels or the fast path: it is what they are checked against
    "config": 3,
    "sampling": 4,
    "purifier": 5,
    "pipeline": 6,
    "train": 6,
    "scan": 7,  # the energy pass over a data set, on the pipeline's runs; eval draws it
    "eval": 8,
    "integrations": 8,
    "cli": 9,  # on top: nothing imports it
    "__init__": 10,  # the public face imports anything but the command line
}
LEAVES = {"errors", "version", "paper", "noise", "runtime", "io", "pickle_scan"}  # nothing of ours


def modules(roots: dict[str, str], base: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the roots."""
    found = {}
    for folder, package in roots.items():
        for f in sorted((base / folder).rglob("*.py")):
            parts = list(f.relative_to(base / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = f
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that ``name`` imports anywhere in its file (function bodies too)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a name inside a module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def group_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["puregen_fast", "kernels"]:
        return "kernels"
    if parts[:2] == ["puregen_fast", "train"]:
        return "train"
    if parts[:3] in (["puregen_fast", "data", "io"], ["puregen_fast", "data", "pickle_scan"]):
        return parts[2]
    return parts[1] if len(parts) > 1 else "__init__"


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        g = group_of(src)
        for dst in sorted(targets):
            h = group_of(dst)
            if g == h:
                continue
            if g in LEAVES:
                bad.append(f"{src} -> {dst}: {g} imports nothing of ours")
            elif h not in RANK or g not in RANK:
                bad.append(f"{src} -> {dst}: {g if g not in RANK else h} has no layer")
            elif RANK[h] >= RANK[g]:
                bad.append(f"{src} -> {dst}: {g} (layer {RANK[g]}) imports {h} (layer {RANK[h]})")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def graph_of(roots: dict[str, str], base: Path) -> dict[str, set[str]]:
    known = modules(roots, base)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_the_package_has_no_circle_and_keeps_the_layer_order():
    graph = graph_of(ROOTS, REPO)
    assert len(graph) > 40  # the whole package was read
    assert circles(graph) == []
    assert violations(graph) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        p = tmp_path / "puregen_fast" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in list((tmp_path / "puregen_fast").rglob("*")):
        if d.is_dir() and not (d / "__init__.py").exists():
            (d / "__init__.py").write_text("")
    (tmp_path / "puregen_fast" / "__init__.py").touch()
    return graph_of({"puregen_fast": "puregen_fast"}, tmp_path)


def test_models_importing_sampling_is_refused(tmp_path):
    g = _tree(tmp_path, {"models/ebm.py": "def f():\n    from puregen_fast.sampling import x\n",
                         "sampling/x.py": "from puregen_fast.models import ebm\n"})  # fmt: skip
    assert any("models (layer 2) imports sampling" in v for v in violations(g))
    assert circles(g) == [["puregen_fast.models.ebm", "puregen_fast.sampling.x"]]


@pytest.mark.parametrize(
    "files, expect",
    [
        ({"noise.py": "from puregen_fast import errors\n", "errors.py": ""}, "nothing of ours"),
        ({"reference.py": "import puregen_fast.kernels.k\n", "kernels/k.py": ""}, "kernels"),
        ({"data/d.py": "from puregen_fast.models.m import M\n", "models/m.py": "M = 1\n"},
         "data (layer 2) imports models"),
        ({"sampling/s.py": "from ..cli import main\n", "cli/main.py": ""}, "imports cli"),
        ({"magic.py": "from puregen_fast import noise\n", "noise.py": ""}, "has no layer"),
    ],
)
def test_planted_violations_are_found(tmp_path, files, expect):
    assert any(expect in v for v in violations(_tree(tmp_path, files)))


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start``'s imports reach, transitively (function-local imports too)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def data_beyond_leaves(mods: set[str]) -> list[str]:
    """The data modules among ``mods`` other than the leaves every layer may use (and the
    package's empty ``__init__``)."""
    ok = {"puregen_fast.data", "puregen_fast.data.io", "puregen_fast.data.pickle_scan"}
    return sorted(m for m in mods if m.startswith("puregen_fast.data") and m not in ok)


def test_the_sampling_layer_never_reaches_the_data_readers():
    """DESIGN 1: the samplers need models, kernels and the runtime, not the data set readers
    (once pulled in through the configuration's list of data set names)."""
    graph = graph_of(ROOTS, REPO)
    sampling = [m for m in graph if m.startswith("puregen_fast.sampling")]
    assert "puregen_fast.sampling.backends" in sampling
    for m in sampling:
        assert data_beyond_leaves(reached(graph, m)) == [], m
        assert "puregen_fast.config" not in reached(graph, m), m


def test_importing_the_sampling_layer_loads_no_data_reader():
    """The same at run time: the package face imports its names lazily, so importing a layer
    loads only what that layer imports."""
    code = ("import sys, puregen_fast.sampling.backends, puregen_fast.sampling.conv_grad; "
            "print(' '.join(m for m in sys.modules if m.startswith('puregen_fast.')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()  # fmt: skip
    assert "puregen_fast.sampling.langevin" in out
    assert data_beyond_leaves(set(out)) == []
    assert "puregen_fast.config" not in out


def test_a_sampling_module_reaching_the_readers_is_found(tmp_path):
    g = _tree(tmp_path, {"sampling/s.py": "from puregen_fast import config\n",
                         "config.py": "from puregen_fast.data.datasets import DATASETS\n",
                         "data/datasets.py": "DATASETS = ()\n"})  # fmt: skip
    assert data_beyond_leaves(reached(g, "puregen_fast.sampling.s")) == [
        "puregen_fast.data.datasets"]


def test_the_package_face_gives_every_public_name():
    import puregen_fast as pg

    assert sorted(pg.__all__) == sorted([*pg._WHERE, "__version__"])
    for name in pg.__all__:
        assert getattr(pg, name) is not None, name
    assert pg.Purifier.__module__ == "puregen_fast.purifier" and pg.noise.STREAM_EBM == 1
