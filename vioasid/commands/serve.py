"""``vioasid serve``: run the daemon in the foreground on a unix socket.

Exits 0 on SIGTERM/SIGINT after closing every client (their VMs are released) and removing the
socket file; exits 2 with one line on stderr for a bad host file or an unusable socket path.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import signal

from vioasid.commands.common import UsageError
from vioasid.daemon import eventloop
from vioasid.daemon.hostconfig import HostConfigError, default_host, load_host
from vioasid.daemon.server import MAX_CONNECTIONS, Server
from vioasid.daemon.service import Service
from vioasid.model.engine import Host

log = logging.getLogger("vioasid.serve")


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid serve`` (the parser ``vioasid.cli`` made)."""
    p.add_argument(
        "--socket",
        required=True,
        metavar="PATH",
        help="unix socket path to listen on (created 0600; a PATH.lock beside it keeps a "
        "second daemon off the same path)",
    )
    p.add_argument(
        "--group",
        metavar="GROUP",
        help="let this group's members connect too (socket 0660); each still sees and "
        "changes only what its own uid may (docs/protocol.md, 'Limits and ownership')",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help=f"clients served at once; one more is refused with 'exhausted' "
        f"(default {MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--host",
        metavar="FILE.toml",
        help="host description: the [[host]] table of the scenario format (default: one "
        "per-device host with functions 3a:00.0, 3b:00.0 translating, 5e:00.0 enqcmd, "
        "5f:00.0 enqcmd+translating)",
    )
    p.add_argument("--host-name", metavar="NAME", help="which [[host]] when FILE has several")
    p.add_argument(
        "--log-level",
        dest="serve_log_level",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity on stderr (overrides the global --log-level)",
    )


def run(args: argparse.Namespace) -> int:
    if args.serve_log_level:
        logging.getLogger().setLevel(getattr(logging, args.serve_log_level.upper()))
    if not args.socket or args.socket.startswith("\0"):
        raise UsageError("--socket needs a file path (an empty path would be an abstract socket)")
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    group = None
    if args.group is not None:
        try:
            group = int(args.group) if args.group.isdigit() else grp.getgrnam(args.group).gr_gid
        except KeyError:
            raise UsageError(f"--group {args.group}: no such group") from None
    try:
        host = load_host(args.host, args.host_name) if args.host else default_host()
    except HostConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        loop, _ = eventloop.choose()  # stdlib asyncio, or uvloop when installed
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return eventloop.run(serve(args.socket, host, group, args.max_connections), loop)


async def serve(
    path: str, host: Host, group: int | None = None, max_connections: int = MAX_CONNECTIONS
) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean shutdown."""
    server = Server(Service(host), path, group=group, max_connections=max_connections)
    try:
        await server.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.warning("serving host %s on %s", host.name, path)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.close()
    log.warning("stopped; socket %s removed", path)
    return 0
