"""What runs inside the test guest, and the host-side tests that boot it."""
