"""The vhost-user edge: the vhost-user-blk back-end (protocol codec, virtqueues, the disk)
whose every DMA address vioasid translates. ``qemu_glue.vhost_user.guest`` wires it to QEMU."""
