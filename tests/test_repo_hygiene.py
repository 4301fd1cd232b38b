"""The tree as committed: no merge-conflict markers, shell scripts that parse."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_MARKER = re.compile(r"^(<{7}|>{7}) ", re.M)


def _tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.stdout.split()]


def test_no_conflict_markers() -> None:
    bad = []
    for f in _tracked("*.py", "*.sh", "*.md", "*.toml", "*.c", "*.h", "Makefile", "Kbuild"):
        if f.is_file() and _MARKER.search(f.read_text(errors="replace")):
            bad.append(str(f.relative_to(REPO)))
    assert bad == []


def test_shell_scripts_parse() -> None:
    for f in [*_tracked("*.sh"), REPO / ".ci" / "run"]:
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"{f}: {r.stderr}"
