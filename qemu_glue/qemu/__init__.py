"""Which QEMU vioasid runs and how: the private QEMU 11.1 install, binary choice, property probe."""
