"""Fixtures every guest test shares: the test image, and the image + QEMU the PASID DMA tests need.

A PASID test skips (it does not fail) when the image has no ``vioasid_dma.ko`` or the QEMU has no
``vfio-user-pci`` (QEMU 10.0): ``vioasid qemu install`` gets QEMU 11.1.
"""

from __future__ import annotations

import gzip

import pytest

from images.build import DMA_SCRIPTS, GuestImage, ensure_image
from qemu_glue.qemu.binary import QemuChoice, QemuNotFound, choose


@pytest.fixture(scope="session")
def image() -> GuestImage:
    """The test guest (built or taken from the cache)."""
    return ensure_image()


@pytest.fixture(scope="session")
def pasid_image(image: GuestImage) -> GuestImage:
    """The test guest, holding the PASID DMA driver and the guest scripts that drive it."""
    with gzip.open(image.initrd) as f:
        data = f.read()
    missing = [n for n in ("vioasid_dma.ko", *DMA_SCRIPTS) if n.encode() not in data]
    if missing:
        pytest.skip(f"the test image has no {', '.join(missing)}")
    return image


@pytest.fixture(scope="session")
def pasid_qemu() -> QemuChoice:
    """The QEMU vioasid picks, when it can serve PASID DMA functions (vfio-user-pci)."""
    try:
        q = choose()
    except QemuNotFound as e:
        pytest.skip(str(e))
    if not q.features.vfio_user:
        pytest.skip(f"{q.path} ({q.version}) has no vfio-user-pci: run 'vioasid qemu install'")
    return q
