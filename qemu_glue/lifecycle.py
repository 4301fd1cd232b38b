"""``async with`` for objects that ``start()`` and ``close()`` (rigs of QEMUs and devices):
a start that fails half-way is closed before the error goes on, and ``close()`` always runs."""

from __future__ import annotations

from typing import Self


class StartClose:
    """Mixin: ``__aenter__`` runs ``start()`` (closing on failure), ``__aexit__`` ``close()``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
