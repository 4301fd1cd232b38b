"""Fill a cache directory completely or not at all: build in a temp dir, rename into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_dir(final: Path, fill: Callable[[Path], None], prefix: str | None = None) -> None:
    """Build into a temp dir next to ``final`` (named ``prefix``…) and rename it into place.

    An interrupted build leaves only the temp dir (never a half-filled ``final``); ``fill``'s
    exception removes it and propagates.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
