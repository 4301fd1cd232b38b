"""vfio-user (QEMU docs/interop/vfio-user.rst): a sans-IO codec, a reusable PCIe function and
the asyncio server that presents it to QEMU's ``vfio-user-pci`` device."""
