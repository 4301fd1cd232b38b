"""A vhost-user-blk back-end whose every DMA address is translated by vioasid.

``codec`` (sans-IO message framing), ``virtqueue`` (split rings over a DMA translator),
``blk`` (virtio-blk requests on a raw file), ``backend`` (the asyncio server QEMU connects to).
"""
