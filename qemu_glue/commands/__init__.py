"""``vioasid`` subcommands that drive QEMU (image, boot, demo, migrate)."""
