"""Everything that touches a QEMU process: command lines, launching, QMP, vhost-user."""
