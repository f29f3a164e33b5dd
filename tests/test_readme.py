"""The README stays true: every `examples/<file>.py:<line>` it quotes points at a planted bug's line."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_line_references_point_at_planted_bugs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        refs = set(re.findall(r"(examples/[\w/]+\.py):(\d+)", fh.read()))
    assert refs, "the README quotes GradGuard output that names example lines"
    for path, line in refs:
        with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
            text = fh.read().splitlines()[int(line) - 1]
        assert "# BUG" in text, f"README quotes {path}:{line}, which is now: {text.strip()!r}"
