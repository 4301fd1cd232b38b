"""``vioasid demo --migrate`` user errors around PASID DMA functions: one line on stderr, exit
2, no traceback, no QEMU started (QEMU 10.0 cannot have them; failure modes per demo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_glue.qemu.binary import probe

ROOT = Path(__file__).resolve().parent.parent
QEMU_10 = "/usr/bin/qemu-system-x86_64"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vioasid", "demo", "--migrate", *args],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


def _has_qemu_10() -> bool:
    return os.access(QEMU_10, os.X_OK) and not probe(QEMU_10).vfio_user


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--pasid", "--qemu", QEMU_10), "needs QEMU 11.1 (vfio-user-pci)"),
        (("--no-pasid", "--refuse-first", "dst-dies"), "without PASID functions use one of"),
        (("--pasid", "--refuse-first", "corrupt"), "with PASID functions use one of"),
    ],
)
def test_demo_migrate_pasid_user_errors(args: tuple[str, ...], words: str) -> None:
    if QEMU_10 in args and not _has_qemu_10():
        pytest.skip("no QEMU 10.0 at /usr/bin")
    if "--pasid" in args and QEMU_10 not in args:
        from qemu_glue.qemu.binary import choose

        if not choose().features.vfio_user:
            pytest.skip("needs QEMU 11.1")
    r = _run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
