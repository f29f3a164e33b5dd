"""The README stays true: every `examples/<file>.py:<line>` it quotes points at a planted bug's line."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_line_references_point_at_planted_bugs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        refs = set(re.findall(r"(examples/[\w/]+\.py):(\d+)", fh.read()))
    assert refs, "the README quotes GradGuard output that names example lines"
    for path, line in refs:
        with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
            text = fh.read().splitlines()[int(line) - 1]
        assert "# BUG" in text, f"README quotes {path}:{line}, which is now: {text.strip()!r}"


def test_readme_links_point_at_files_in_the_repo():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", fh.read())
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert "docs/why-no-gradients.md" in local  # the article the README retells
    for target in local:
        path = os.path.normpath(os.path.join(ROOT, target))
        assert path.startswith(ROOT + os.sep), f"README links outside the repository: {target}"
        assert os.path.exists(path), f"README links to a missing file: {target}"


def test_shipped_article_is_the_one_the_tests_use():
    shipped = os.path.join(ROOT, "docs", "why-no-gradients.md")
    tested = os.path.join(ROOT, "tests", "data", "why-no-gradients.md")
    with open(shipped, encoding="utf-8") as a, open(tested, encoding="utf-8") as b:
        assert a.read() == b.read()


def test_pyproject_lower_bounds_are_the_compat_pins():
    """Every requirement's lower bound in pyproject.toml is the version `make compat` installs and tests
    (constraints-min.txt), and the suite's own pins (constraints.txt) satisfy every range."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = [Requirement(d) for d in tomllib.loads(Path(ROOT, "pyproject.toml").read_text())["project"]["dependencies"]]

    def pins(name: str) -> dict[str, str]:
        rows = (line.split("#")[0].strip() for line in Path(ROOT, name).read_text().splitlines())
        return dict(row.lower().replace("_", "-").split("==") for row in rows if row)

    lowest, tested = pins("constraints-min.txt"), pins("constraints.txt")
    for req in deps:
        name = req.name.lower()
        floor = [s.version for s in req.specifier if s.operator == ">="]
        assert floor, f"{req}: no lower bound"
        assert Version(lowest.get(name, "0")) == Version(floor[0]), (
            f"{req}: constraints-min.txt pins {lowest.get(name)}"
        )
        assert req.specifier.contains(tested[name]), f"{req}: constraints.txt pins {tested[name]}"


def test_readme_package_layout_lists_every_module():
    """The "Package layout" list of "How it works" names every module of the package, and only modules that exist."""
    text = Path(ROOT, "README.md").read_text(encoding="utf-8")
    start = text.index("**Package layout**")
    block = text[start : text.index("\n\n", text.index("\n- ", start))]
    listed = set(re.findall(r"`(\w+)\.py`", block))
    package = {p.stem for p in Path(ROOT, "lightning_gradguard").glob("*.py")} - {"__init__"}
    assert listed == package, (sorted(package - listed), sorted(listed - package))
