"""``vioasid demo --seed``: the seed's systems on real guests (qemu_glue/seed_demo.py).

Prints, per case, what the design table / the RFC thread predicts and what happened on the
real guests (``--json``: one object with ``cases`` [{name, expected, observed, pass, bindings}]);
``--trace FILE`` writes one JSON line per bind command (pPASID, tag, table, policy row) and per
job (the tag it went out with). Exit 0 only if every case passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from qemu_glue.commands.options import qemu_choice
from vioasid.commands.common import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's seed options (called by ``demo.configure``)."""
    g = p.add_argument_group("the seed's systems on real guests (--seed)")
    g.add_argument(
        "--seed",
        action="store_true",
        help="run the seed's cases on real guests: each device type, the ENQCMD portal with the "
        "VM's CPU PASID table, the trouble case and its legal variants, exhaustion, the two "
        "policies, two guests sharing one parent function (needs QEMU 11.1)",
    )
    g.add_argument(
        "--seed-loop",
        type=int,
        default=None,
        metavar="S",
        help="seconds each of the two tenant guests runs random-data jobs (default 34)",
    )
    g.add_argument(
        "--status-socket",
        default=None,
        metavar="PATH",
        help="with --seed: serve the two tenants' engine on PATH with the daemon's server while "
        "they run, so 'vioasid status --socket PATH' shows the shared parent's table live "
        "(default: a private temporary socket the demo queries itself); without --seed: the "
        "PASID DMA functions' engine (their bindings, jobs and faults)",
    )
    g.add_argument(
        "--trace",
        dest="seed_trace",
        default=None,
        metavar="FILE",
        help="with --seed: one JSON line per bind command (vPASID, pPASID, tag, table, policy "
        "row, refusal) and per job (the tag on the wire)",
    )


def progress(msg: str) -> None:
    print(f"vioasid demo: {msg}", file=sys.stderr, flush=True)


def _print_human(out: dict[str, Any]) -> None:
    width = max(len(c["name"]) for c in out["cases"])
    for c in out["cases"]:
        print(f"{c['name']:<{width}}  {'PASS' if c['pass'] else 'FAIL'}")
        for label, text in (("expected", c["expected"]), ("observed", c["observed"])):
            wrapped = textwrap.wrap(text, 96) or [""]
            print(f"{'':<{width}}  {label}: {wrapped[0]}")
            for line in wrapped[1:]:
                print(f"{'':<{width}}            {line}")
    from vioasid.commands.status import render

    shown = {c["name"]: c.get("tables") for c in out["cases"]}
    for name, title in (
        ("trouble-case", "the engine's tables at the trouble case's refusal (as vioasid status)"),
        ("shared-parent", "the two tenants' binds in the shared parent's table"),
    ):
        if shown.get(name):
            print(f"\n{title}:")
            print(textwrap.indent(render(shown[name]), "  "), end="")
    after = out.get("tenants", {}).get("tables_after_kill")
    if after:
        print(f"\nafter SIGKILL of {out['tenants']['killed']}:")
        print(textwrap.indent(render(after), "  "), end="")
    print(f"\nserved by {out['served_by']}; {out['wall_seconds']} s")
    print("PASS" if out["ok"] else "FAIL")


def run(args: argparse.Namespace) -> int:
    from images.build import ensure_image
    from qemu_glue.seed_demo import TENANT_LOOP_S, SeedOptions, run_seed

    if args.accel == "kvm":
        raise UsageError("--seed runs its guests under TCG")
    loop_s = TENANT_LOOP_S if args.seed_loop is None else args.seed_loop
    if loop_s < 25:
        raise UsageError("--seed-loop must be at least 25 s (20 s of concurrent jobs + margin)")
    with contextlib.ExitStack() as stack:
        trace = None
        if args.seed_trace is not None:
            try:
                trace = stack.enter_context(open(args.seed_trace, "w", buffering=1 << 16))
            except OSError as e:
                raise UsageError(f"--trace {args.seed_trace}: {e.strerror}") from None
        qemu = qemu_choice(args)
        if not qemu.features.vfio_user:
            raise UsageError(
                f"--seed needs vfio-user-pci (QEMU 11.1); {qemu.path} is {qemu.version}"
            )
        progress(f"QEMU {qemu.version} ({qemu.path})")
        img = ensure_image(progress)
        opts = SeedOptions(
            kernel=img.kernel,
            initrd=img.initrd,
            qemu=qemu,
            trace=trace,
            echo=sys.stderr if args.console else False,
            timeout=args.timeout,
            progress=progress,
            tenant_loop_s=loop_s,
            status_socket=Path(args.status_socket) if args.status_socket else None,
        )
        out = asyncio.run(run_seed(opts))
    out["qemu"] = qemu.to_json()
    if args.json:
        print(json.dumps(out))
    else:
        _print_human(out)
    return 0 if out["ok"] else 1
