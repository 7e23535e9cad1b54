"""The design lives in the repository: ``docs/DESIGN.md`` exists, and every "DESIGN n" or
"DESIGN n.n" cited in the package, the tests, the README, the benchmarks, the examples and the
docs (``DESIGN §n.n`` and lists such as ``DESIGN 2.1, 6`` too, also across a line break) names a
numbered section heading of it. Inside the design, "section n.n" must name one as well, and a
path to the design must be ``docs/DESIGN.md``. The checker also runs on planted trees, so it is
known to fail."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = Path("docs") / "DESIGN.md"
# where citations live: folders searched for SUFFIXES files, and single files
FOLDERS = ("puregen_fast", "kernels", "train", "tests", "bench", "examples", "docs")
FILES = ("README.md",)
SUFFIXES = {".py", ".md", ".sh"}
SKIP = {"__pycache__", ".git"}

_NUM = r"\d+(?:\.\d+)*"
CITATION = re.compile(rf"DESIGN(?<!\wDESIGN)\s*§?\s*({_NUM}(?:\s*,\s*§?\s*{_NUM})*)")
SECTION_REF = re.compile(rf"\bsections?\s+§?({_NUM})")
HEADING = re.compile(rf"^(#{{2,6}})\s+({_NUM})\.?\s+\S", re.MULTILINE)
DESIGN_PATH = re.compile(r"(?<![\w./-])[\w./-]*/DESIGN\.md")


def sections(design_text: str) -> tuple[set[str], list[str]]:
    """The section numbers of the design's headings (``## 2.`` -> "2", ``### 2.4`` -> "2.4"),
    and what is wrong with the numbering: a number twice, a heading level that does not match
    the number's depth, a subsection whose section has no heading."""
    found: set[str] = set()
    bad = []
    for m in HEADING.finditer(design_text):
        level, num = len(m.group(1)), m.group(2)
        if num in found:
            bad.append(f"{DESIGN}: section {num} has two headings")
        if level != num.count(".") + 2:
            bad.append(f"{DESIGN}: section {num} under a level-{level} heading")
        found.add(num)
    for num in sorted(found):
        parent = num.rpartition(".")[0]
        if parent and parent not in found:
            bad.append(f"{DESIGN}: section {num} has no section {parent}")
    return found, bad


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def unresolved(text: str, known: set[str], where: str, in_design: bool = False) -> list[str]:
    """Citations in ``text`` that name no section in ``known``, as ``where:line: ...``."""
    bad: list[str] = []
    if "DESIGN" not in text and not in_design:  # the cheap test first: most files cite nothing
        return bad
    for m in CITATION.finditer(text):
        for num in re.findall(_NUM, m.group(1)):
            if num not in known:
                bad.append(f"{where}:{_line(text, m.start())}: DESIGN {num}: no such section")
    if in_design:
        for m in SECTION_REF.finditer(text):
            if m.group(1) not in known:
                bad.append(f"{where}:{_line(text, m.start())}: section {m.group(1)}: "
                           "no such section")  # fmt: skip
    for m in DESIGN_PATH.finditer(text) if "DESIGN.md" in text else ():
        if m.group(0) != DESIGN.as_posix():
            bad.append(f"{where}:{_line(text, m.start())}: {m.group(0)}: the design is "
                       f"{DESIGN.as_posix()}")  # fmt: skip
    return bad


def cited_files(root: Path) -> list[Path]:
    out = [root / f for f in FILES if (root / f).is_file()]
    for folder in FOLDERS:
        for f in sorted((root / folder).rglob("*")):
            if f.suffix in SUFFIXES and f.is_file() and not SKIP & set(f.relative_to(root).parts):
                out.append(f)
    return out


def problems(root: Path) -> list[str]:
    """Everything wrong with the design and its citations under ``root``."""
    design = root / DESIGN
    if not design.is_file():
        return [f"{DESIGN} is missing"]
    design_text = design.read_text(encoding="utf-8")
    known, bad = sections(design_text)
    for f in cited_files(root):
        rel = f.relative_to(root)
        bad += unresolved(f.read_text(encoding="utf-8", errors="replace"), known, str(rel),
                          in_design=rel == DESIGN)  # fmt: skip
    return bad


def test_every_design_citation_names_a_section():
    assert (REPO / DESIGN).is_file(), f"{DESIGN} is missing"
    files = cited_files(REPO)
    assert len(files) > 100  # the package, the tests and the docs were read
    texts = [f.read_text(errors="replace") for f in files]
    assert sum(len(CITATION.findall(x)) for x in texts if "DESIGN" in x) > 40
    assert problems(REPO) == []


# -- the checker fails where it should ---------------------------------------------------------

PLANTED_DESIGN = (
    "# d\n\n## 1. Layout\ntext\n\n## 2. Numbers\n\n### 2.1 Algorithms\n### 2.4 Safety\n"
)


def test_sections_are_read_from_the_headings():
    known, bad = sections(PLANTED_DESIGN)
    assert known == {"1", "2", "2.1", "2.4"} and bad == []
    _, bad = sections("## 3. A\n## 3. B\n## 4.1 C\n#### 5.2 D\n")
    assert any("section 3 has two headings" in b for b in bad)
    assert any("section 4.1 under a level-2 heading" in b for b in bad)
    assert any("section 4.1 has no section 4" in b for b in bad)
    assert any("section 5.2 has no section 5" in b for b in bad)


def test_a_bad_citation_is_found():
    known, _ = sections(PLANTED_DESIGN)
    d = "DESIGN"  # built here, so this file's own text cites nothing
    good = f"x (DESIGN 2.4) y {d} §2.1 z ({d} 2.1, 1) w {d}\n    2 {d}.md {d}'s"
    assert unresolved(good, known, "f.py") == []
    for text, num in [(f"see {d} 9.9", "9.9"), (f"({d} 2.1, 6)", "6"), (f"({d}\n   2.2)", "2.2"),
                      (f"{d} §7", "7"), (f"{d} 2.1.3.", "2.1.3")]:  # fmt: skip
        assert unresolved(text, known, "f.py") == [f"f.py:1: {d} {num}: no such section"], text
    assert unresolved("a\nb (see section 3)", known, "docs/x.md", in_design=True) == [
        "docs/x.md:2: section 3: no such section"
    ]
    assert unresolved("see section 3", known, "f.py") == []  # only inside the design
    assert unresolved(f"../shared/{d}.md", known, "README.md") != []
    assert unresolved(f"docs/{d}.md", known, "README.md") == []


def test_the_checker_fails_on_a_planted_tree(tmp_path):
    assert problems(tmp_path) == [f"{DESIGN} is missing"]
    (tmp_path / "docs").mkdir()
    (tmp_path / DESIGN).write_text(PLANTED_DESIGN + "as section 2.2 says\n")
    (tmp_path / "puregen_fast" / "sub").mkdir(parents=True)
    (tmp_path / "puregen_fast" / "sub" / "m.py").write_text('"""ok (DESIGN 2.1)\n\nDESIGN 3"""\n')
    (tmp_path / "README.md").write_text("fine: DESIGN 1\n")
    assert problems(tmp_path) == [
        "puregen_fast/sub/m.py:3: DESIGN 3: no such section",
        "docs/DESIGN.md:10: section 2.2: no such section",
    ]
