"""Live migration: the vPASID hand-over around QEMU's migration, two-host rigs, the demo."""
