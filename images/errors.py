"""The image builder's one error type: a message a user can act on (what to install)."""

from __future__ import annotations


class ImageError(Exception):
    """Building the guest image failed; the message says what is missing or wrong."""
