"""The property probe against the real QEMU binaries setup-host.sh installs (10.0 and 11.1),
and the launcher it puts on PATH. Skipped only where setup has not run (no such binary)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_glue.qemu.binary import probe
from qemu_glue.qemu.install import newest_installed
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec

REPO = Path(__file__).resolve().parents[1]
SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"


def _system_major() -> int:
    if not os.access(SYSTEM_QEMU, os.X_OK):
        return 0
    out = subprocess.run([SYSTEM_QEMU, "--version"], capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.split("version ", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return 0


@pytest.mark.skipif(_system_major() != 10, reason="no QEMU 10.0 at /usr/bin (Debian 12 setup)")
def test_probe_qemu_10() -> None:
    f = probe(SYSTEM_QEMU)
    assert f.version.startswith("10.")
    assert (f.scalable_prop, f.fsts_prop) == ("x-scalable-mode", "x-flts")
    assert not f.vfio_user and not f.has_iommu("pasid-bits")
    assert "x-flts=on" in IommuSpec(mode=IommuMode.SCALABLE_FS).device_arg(f)


def _qemu_11() -> str | None:
    inst = newest_installed()
    if inst is not None:
        return str(inst.wrapper)
    return SYSTEM_QEMU if _system_major() >= 11 else None


@pytest.mark.skipif(_qemu_11() is None, reason="no QEMU 11.1 (run scripts/setup-host.sh)")
def test_probe_qemu_11() -> None:
    path = _qemu_11()
    assert path is not None
    f = probe(path)
    assert f.version.startswith("11.")
    assert (f.scalable_prop, f.fsts_prop) == ("scalable-mode", "fsts")
    assert f.vfio_user and f.has_iommu("pasid-bits")
    arg = IommuSpec(mode=IommuMode.SCALABLE_FS, pasid_bits=20).device_arg(f)
    assert "scalable-mode=on" in arg and "fsts=on" in arg and "pasid-bits=20" in arg


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "python").exists() or sys.prefix != str(REPO / ".venv"),
    reason="not running from this checkout's .venv (scripts/setup-host.sh makes it)",
)
def test_launcher_on_path_runs_this_checkouts_venv() -> None:
    launcher = shutil.which("vioasid")
    assert launcher is not None, "setup-host.sh puts a vioasid launcher on PATH"
    text = Path(launcher).read_text()
    assert str(REPO / ".venv" / "bin" / "python") in text
    out = subprocess.run(
        [launcher, "qemu", "path", "--json"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"].startswith(("10.", "11."))
