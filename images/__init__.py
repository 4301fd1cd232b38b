"""Builds the bootable test guest: a Debian kernel plus a small busybox initramfs."""
