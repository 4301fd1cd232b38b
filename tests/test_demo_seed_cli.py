"""``vioasid demo --seed`` user errors: one line on stderr, exit 2, no traceback, no QEMU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vioasid", "demo", "--seed", *args],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--seed-loop", "5"), "--seed-loop must be at least 25"),
        (("--trace", "/nonexistent-dir/trace.jsonl"), "--trace /nonexistent-dir/trace.jsonl"),
        (("--accel", "kvm"), "TCG"),
        (("--qemu", "/nonexistent/qemu-system-x86_64"), "qemu"),
    ],
)
def test_demo_seed_user_errors(args: tuple[str, ...], words: str) -> None:
    r = _run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
