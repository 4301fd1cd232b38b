"""Which asyncio event loop the daemon runs on: stdlib asyncio, or uvloop when it is installed.

uvloop (the optional ``fast`` extra, ``pip install 'vioasid[fast]'``) runs the same code with
its event loop written in C: a single-request round trip costs less daemon CPU. Nothing in the
daemon depends on it; without it the stdlib loop is used. ``VIOASID_EVENT_LOOP`` chooses:
``auto`` (the default: uvloop when importable), ``asyncio`` or ``uvloop`` (an error when it is
not installed).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

ENV = "VIOASID_EVENT_LOOP"
CHOICES = ("auto", "asyncio", "uvloop")


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def choose(choice: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """``(name, loop factory)``: ``("uvloop", factory)`` or ``("asyncio", None)`` (the stdlib
    default loop). ``choice`` defaults to ``$VIOASID_EVENT_LOOP``, else ``auto``."""
    choice = (choice or os.environ.get(ENV) or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio", None
    factory = _uvloop_factory()
    if factory is None:
        if choice == "uvloop":
            raise ValueError(f"{ENV}=uvloop but uvloop is not installed (the 'fast' extra)")
        return "asyncio", None
    return "uvloop", factory


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """``asyncio.run(main)`` on the chosen loop (see :func:`choose`; a bad choice raises
    ``ValueError`` before ``main`` starts)."""
    try:
        name, factory = choose(choice)
    except ValueError:
        main.close()
        raise
    log.info("event loop: %s", name)
    if factory is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
