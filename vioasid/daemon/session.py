"""One client connection's state: what it negotiated, which VMs it owns, its pending output.

A session is sans-IO: the service appends encoded messages to :attr:`Session.outbox` (its own
replies) and to other sessions' outboxes (pushed events); the server flushes outboxes to sockets
after each batch of input. Subscriptions live on the VM (``VmEntry.subscribers``). When the
connection ends, the service releases every VM the session owns (see
:meth:`vioasid.daemon.service.Service.end_session`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def _nothing_unsent() -> int:
    return 0


@dataclass(eq=False)
class Session:
    """A connected client."""

    id: int
    peer: str = ""  # "pid 1234 uid 1000" from SO_PEERCRED, for logs
    uid: int = -1  # the peer's uid (SO_PEERCRED); -1: unknown (sees only its own VMs)
    features: int = 0  # acknowledged with SET_FEATURES
    owned: set[int] = field(default_factory=set)  # VM ids this connection registered/imported
    outbox: list[bytes | bytearray] = field(default_factory=list)
    closed: bool = False
    unsent: Callable[[], int] = _nothing_unsent  # bytes the socket has not taken yet (server)
    events_dropped: int = 0  # events not queued because this client left too much unread
    dump: bytes | None = None  # the DUMP document being paged through

    def __str__(self) -> str:
        return f"session {self.id}" + (f" ({self.peer})" if self.peer else "")

    def push(self, data: bytes | bytearray) -> None:
        if not self.closed:
            self.outbox.append(data)

    def take_output(self) -> bytes | bytearray:
        out, self.outbox = self.outbox, []
        return out[0] if len(out) == 1 else b"".join(out)
