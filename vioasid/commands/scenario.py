"""``vioasid scenario FILE.toml``: run a scenario file (shared/design/scenario-format.md).

Prints one JSON object per step, then ``scenario: N steps, N expectations met, N failed``.
Exit status 0 when every expectation is met, 1 when one is not, 2 when the file is invalid
(one line on stderr naming the field; no step runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from typing import Any

from vioasid.commands.common import UsageError
from vioasid.model.scenario import ScenarioError, ScenarioRunner, parse_scenario


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scenario",
        help="run a scenario file (hosts, VMs, steps) through the vPASID engine",
        description=(
            "Run the hosts, VMs and steps of a scenario TOML file through the same model the "
            "daemon uses. One JSON line per step, then a summary line; exit 0 when every "
            "expectation is met, 1 when one is not, 2 when the file is invalid."
        ),
    )
    p.add_argument("file", metavar="FILE.toml", help="the scenario file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"{args.file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{args.file}: not valid TOML: {exc}") from None
    try:
        runner = ScenarioRunner(parse_scenario(doc))
    except ScenarioError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    out = sys.stdout
    for result in runner.run():
        out.write(json.dumps(result) + "\n")
    out.write(runner.summary() + "\n")
    out.flush()
    return 1 if runner.failed else 0
