"""What runs inside the test guest and what it prints: ``/init`` (``init.sh``), the disk tests,
the PASID DMA checks and figures (``*.sh``, packed into the initramfs under ``/guest_tests``),
the marker lines they print (:mod:`.markers`) and the disk tests' data pattern
(:mod:`.patterns`). Product code: ``vioasid demo`` and the image builder use it; the tests that
boot guests live in ``guest_tests/``."""
