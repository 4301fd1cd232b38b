"""The daemon's event-loop choice: stdlib asyncio by default, uvloop only when importable."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from vioasid.daemon import eventloop

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.choose() == ("asyncio", None)
    assert eventloop.choose("ASYNCIO") == ("asyncio", None)


def test_auto_is_uvloop_only_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    name, factory = eventloop.choose()
    assert name == ("uvloop" if HAVE_UVLOOP else "asyncio")
    assert (factory is not None) == HAVE_UVLOOP
    monkeypatch.setattr(eventloop, "_uvloop_factory", lambda: None)  # as if not installed
    assert eventloop.choose("auto") == ("asyncio", None)
    with pytest.raises(ValueError, match="not installed"):
        eventloop.choose("uvloop")


def test_bad_choice_is_refused_and_the_coroutine_never_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(eventloop.ENV, "tokio")
    ran = []

    async def main() -> None:
        ran.append(1)

    with pytest.raises(ValueError, match="VIOASID_EVENT_LOOP"):
        eventloop.run(main())
    assert ran == []


def test_run_returns_the_result_on_the_chosen_loop() -> None:
    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(main(), "asyncio").startswith("asyncio")
    if HAVE_UVLOOP:
        assert eventloop.run(main(), "uvloop").startswith("uvloop")
