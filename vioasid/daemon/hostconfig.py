"""The daemon's host: from the ``[[host]]`` part of a scenario file, or a sensible default.

A host file is a scenario file's ``[[host]]`` table (``name``, ``allocation``, ``pasid_bits``,
``[[host.function]]`` with ``rid``, ``enqcmd``, ``translating``), validated by the scenario
parser so both read the same format. Other top-level tables (``[[vm]]``, ``[[step]]``) are
ignored, so a whole scenario file works too.
"""

from __future__ import annotations

from typing import Any

from vioasid.model.engine import Host
from vioasid.model.errors import VioasidError
from vioasid.model.scenario import HostSpec, ScenarioError, parse_scenario
from vioasid.model.toml_file import TomlFileError, read_toml


class HostConfigError(Exception):
    """The host file is unusable; the message names the file and field."""


DEFAULT_FUNCTIONS: tuple[tuple[str, bool, bool], ...] = (
    # (rid, enqcmd, translating): one function of each kind the policy table distinguishes
    ("3a:00.0", False, False),
    ("3b:00.0", False, True),
    ("5e:00.0", True, False),
    ("5f:00.0", True, True),
)
"""The default host's functions: plain, translating, enqcmd, enqcmd + translating."""


def default_host_doc() -> dict[str, Any]:
    return {
        "name": "host",
        "allocation": "per-device",
        "pasid_bits": 20,
        "function": [
            {"rid": rid, "enqcmd": enq, "translating": tr} for rid, enq, tr in DEFAULT_FUNCTIONS
        ],
    }


def host_from_spec(spec: HostSpec) -> Host:
    host = Host(spec.name, allocation=spec.allocation, pasid_bits=spec.pasid_bits)  # type: ignore[arg-type]
    for fn in spec.functions:
        host.add_function(fn.rid, enqcmd=fn.enqcmd, translating=fn.translating)
    return host


def host_from_doc(doc: dict[str, Any], where: str = "host", name: str | None = None) -> Host:
    """A host from a parsed TOML document holding ``[[host]]`` tables (``name`` picks one
    when there are several)."""
    hosts = doc.get("host")
    if not isinstance(hosts, list) or not hosts:
        raise HostConfigError(f"{where}: no [[host]] table")
    try:
        specs = parse_scenario({"host": hosts}).hosts
    except ScenarioError as exc:
        raise HostConfigError(f"{where}: {exc}") from None
    if name is not None:
        chosen = [s for s in specs if s.name == name]
        if not chosen:
            names = ", ".join(s.name for s in specs)
            raise HostConfigError(f"{where}: no [[host]] named {name!r} (has {names})")
    elif len(specs) > 1:
        raise HostConfigError(f"{where}: {len(specs)} [[host]] tables; pick one with --host-name")
    else:
        chosen = list(specs)
    try:
        return host_from_spec(chosen[0])
    except VioasidError as exc:
        raise HostConfigError(f"{where}: {exc.message}") from None


def load_host(path: str, name: str | None = None) -> Host:
    """The host described by the TOML file at ``path``."""
    try:
        doc = read_toml(path, what="host file")
    except TomlFileError as exc:
        raise HostConfigError(str(exc)) from None
    return host_from_doc(doc, path, name)


def default_host() -> Host:
    """One per-device host with 20-bit PASIDs and the functions of :data:`DEFAULT_FUNCTIONS`."""
    return host_from_doc({"host": [default_host_doc()]}, "default host")
