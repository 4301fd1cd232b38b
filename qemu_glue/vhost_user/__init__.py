"""A guest with vioasid's vhost-user-blk disk: the back-end (:mod:`vioasid.vhost_user`) wired to a
QEMU process, its QMP monitor and the guest's invalidation queue (``guest.py``)."""
