"""``vioasid status``: the running daemon's VMs, devices and vPASID/pPASID tables.

Also the PASID DMA functions the serving process presents over vfio-user (the dump's
``pasid_functions``: ``vioasid boot --dma-device ... --status-socket PATH`` and ``vioasid demo
--status-socket PATH`` serve their in-process engine with the daemon's server there).

Human tables by default, the daemon's dump as one JSON object with ``--json``. Exits 1 when the
daemon cannot be reached (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from vioasid.client import Client, ClientError, NotFound, NotOwner
from vioasid.commands.common import UsageError, emit

MAX_NAME = 0xFFFF  # a VM name on the wire: u16 length, UTF-8 (formats/wire.py)


def _encodable(name: str) -> bool:
    try:
        return len(name.encode()) <= MAX_NAME
    except UnicodeEncodeError:
        return False


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid status`` (the parser ``vioasid.cli`` made)."""
    p.add_argument("--socket", required=True, metavar="PATH", help="the daemon's unix socket")
    p.add_argument("--json", action="store_true", help="print the state as one JSON object")
    p.add_argument("--vm", metavar="NAME", help="only this VM (exit 2 when there is none)")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up when the daemon has not answered within this time (default 5)",
    )


async def fetch(path: str, vm: str | None, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        client = await Client.connect(path, timeout=0)
        try:
            vm_id = None if vm is None else await client.open_vm(vm)
            return await client.dump(vm_id)
        finally:
            await client.close()


def run(args: argparse.Namespace) -> int:
    if args.vm is not None and (len(args.vm) > MAX_NAME or not _encodable(args.vm)):
        raise UsageError(f"--vm: not a VM name (at most {MAX_NAME} bytes of valid UTF-8)")
    if not args.timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")
    try:
        doc = asyncio.run(fetch(args.socket, args.vm, args.timeout))
    except TimeoutError:
        emit(
            f"vioasid status: {args.socket}: the daemon did not answer within {args.timeout:g}s",
            err=True,
        )
        return 1
    except (NotFound, NotOwner) as exc:
        raise UsageError(f"--vm {args.vm}: {exc.message}") from None
    except (OSError, ClientError) as exc:
        emit(f"vioasid status: {args.socket}: {exc}", err=True)
        return 1
    if args.json:
        emit(json.dumps(doc, indent=2, sort_keys=True))
    else:
        emit(render(doc), end="")
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines) + "\n"


def render(doc: dict[str, Any]) -> str:
    """The dump as human tables: VMs, devices, bindings (vPASID → pPASID), functions."""
    out = [
        f"host {doc.get('host')}  allocation {doc.get('allocation')}  "
        f"sessions {len(doc.get('sessions', []))}\n\n"
    ]
    vms = doc.get("vms", {})
    out.append(
        _table(
            ["VM", "ID", "OWNER", "DEVICES", "BINDINGS", "CPU TABLE", "FAULTS", "PRQ"],
            [
                [
                    name,
                    str(v.get("id", "")),
                    str(v.get("owner", "")),
                    str(len(v["devices"])),
                    str(sum(len(d["bindings"]) for d in v["devices"].values())),
                    " ".join(f"{x}→{p}" for x, p in v["cpu_table"].items()) or "-",
                    str(v["faults"]),
                    str(v["page_requests"]),
                ]
                for name, v in sorted(vms.items())
            ],
        )
    )
    rows = []
    for name, v in sorted(vms.items()):
        for bdf, d in v["devices"].items():
            binds = " ".join(f"{x}→{p}" for x, p in d["bindings"].items()) or "-"
            rows.append([name, bdf, d["function"], d["assign"], d["space"], d["tag"], binds])
    out.append("\n")
    out.append(
        _table(["VM", "DEVICE", "FUNCTION", "ASSIGN", "SPACE", "TAG", "vPASID→pPASID"], rows)
    )
    rows = []
    for bdf, f in sorted(doc.get("functions", {}).items()):
        caps = ",".join(c for c in ("enqcmd", "translating") if f[c]) or "-"
        table = " ".join(
            f"{pp}:{o['vm']}/{o['device']}/{o['vpasid']}" for pp, o in f["table"].items()
        )
        rows.append([bdf, caps, f["assigned"] or "-", table or "-"])
    out.append("\n")
    out.append(_table(["FUNCTION", "CAPS", "ASSIGNED", "pPASID:VM/DEVICE/vPASID"], rows))
    pasid_fns = doc.get("pasid_functions")
    if pasid_fns:  # served over vfio-user by the process that owns the engine
        rows = [
            [
                str(f.get("vm")),
                str(f.get("device")),
                str(f.get("type")),
                str(f.get("function")),
                "yes" if f.get("connected") else "no",
                f"{f.get('jobs', {}).get('ok', 0)}/{f.get('jobs', {}).get('failed', 0)}",
                str(f.get("faults", 0)),
                " ".join(
                    f"{b['vpasid']}→{b['ppasid']}"
                    + (f" tag {b['tag']}" if b["tag"] != b["ppasid"] else "")
                    for b in f.get("bindings", [])
                )
                or "-",
            ]
            for f in pasid_fns
        ]
        out.append("\n")
        out.append(
            _table(
                [
                    "VM",
                    "PASID DMA",
                    "TYPE",
                    "FUNCTION",
                    "CONNECTED",
                    "JOBS OK/FAILED",
                    "FAULTS",
                    "vPASID→pPASID",
                ],
                rows,
            )
        )
    return "".join(out)
