"""What every device shares: the PASID-aware DMA translator and the dirty log."""
