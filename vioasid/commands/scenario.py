"""``vioasid scenario FILE.toml``: run a scenario file (shared/design/scenario-format.md).

Prints one JSON object per step, then ``scenario: N steps, N expectations met, N failed``.
Exit status 0 when every expectation is met, 1 when one is not, 2 when the file is invalid
(one line on stderr naming the field; no step runs).
"""

from __future__ import annotations

import argparse
import json
import sys

from vioasid.commands.common import UsageError
from vioasid.model.scenario import ScenarioError, ScenarioRunner, parse_scenario
from vioasid.model.toml_file import TomlFileError, read_toml

_TROUBLE = (MemoryError, OverflowError, OSError, ValueError, TypeError, RecursionError)
"""What a well-formed but impossible scenario can raise (memory the machine cannot map, a page
allocator exhausted, an expectation holding a TOML date): one line, exit 2, no traceback."""


def _line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text and text[0] else type(exc).__name__


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid scenario`` (the parser ``vioasid.cli`` made)."""
    p.add_argument("file", metavar="FILE.toml", help="the scenario file")


def run(args: argparse.Namespace) -> int:
    try:
        doc = read_toml(args.file, what="scenario file")
    except TomlFileError as exc:
        raise UsageError(str(exc)) from None
    try:
        runner = ScenarioRunner(parse_scenario(doc))
    except ScenarioError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    except _TROUBLE as exc:  # e.g. guest memory larger than this machine can give
        raise UsageError(f"{args.file}: cannot set the scenario up: {_line(exc)}") from None
    out = sys.stdout
    steps = runner.run()
    while True:
        try:
            result = next(steps, None)
            if result is None:
                break
            line = json.dumps(result)
        except (ScenarioError, *_TROUBLE) as exc:
            # after the steps already printed, one final line says why the run stopped
            out.flush()
            raise UsageError(f"{args.file}: scenario stopped: {_line(exc)}") from None
        out.write(line + "\n")
    out.write(runner.summary() + "\n")
    out.flush()
    return 1 if runner.failed else 0
