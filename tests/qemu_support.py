"""The QEMU for a unit test that starts real QEMU: the test skips (it does not fail) when there is
no QEMU, or when the QEMU lacks what the test needs (``vioasid qemu install`` gets QEMU 11.1)."""

from __future__ import annotations

import pytest

from qemu_glue.qemu.binary import QemuChoice, QemuNotFound, choose


def qemu_or_skip(*, vfio_user: bool = False) -> QemuChoice:
    """The QEMU vioasid picks; with ``vfio_user``, only one that has vfio-user-pci."""
    try:
        q = choose()
    except QemuNotFound:
        pytest.skip("no QEMU")
    if vfio_user and not q.features.vfio_user:
        pytest.skip("needs QEMU 11.1 (vfio-user-pci)")
    return q
