"""VM specs for the guest tests: the test image (kernel + initramfs) under one vIOMMU mode."""

from __future__ import annotations

from images.build import GuestImage
from qemu_glue.qemu.vmspec import Device, IommuMode, IommuSpec, VmSpec


def image_vm(
    image: GuestImage,
    name: str,
    mode: IommuMode,
    append: str,
    *devices: Device,
    extra_args: tuple[str, ...] = (),
) -> VmSpec:
    """QEMU booting ``image`` with kernel command line ``append``, a vIOMMU in ``mode`` and
    ``devices``."""
    return VmSpec(
        name=name,
        iommu=IommuSpec(mode=mode),
        devices=devices,
        kernel=image.kernel,
        initrd=image.initrd,
        append=append,
        extra_args=extra_args,
    )
