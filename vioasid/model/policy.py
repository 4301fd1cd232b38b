"""The pPASID policy table of the design (README "pPASID allocation"), as data.

:func:`rule_for` answers, for one (host policy, assignment, function capabilities), where the
pPASID of a guest vPASID X comes from and what the device puts on the wire:

=========  ===========================  =====================================  ============
assign     function                     pPASID for vPASID X (per-device)       tag
=========  ===========================  =====================================  ============
vfio-pci   not enqcmd                   X, dedicated (per-RID) table           X
vfio-pci   translating, not enqcmd      X, dedicated table                     X
vfio-pci   enqcmd, not translating      the VM's global pPASID for X, == X     X
vfio-pci   enqcmd + translating         the VM's global pPASID for X           pPASID
mdev       not enqcmd                   lowest free in the function's space    pPASID
mdev       enqcmd                       the VM's global pPASID for X           pPASID
=========  ===========================  =====================================  ============

Under ``global`` every row draws the VM's global pPASID for X from the host-wide space, and a
non-translating vfio-pci function needs that value to be X itself. The tag on the wire is always
the pPASID (equal to X exactly when the row says X).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["per-device", "global"]
Assign = Literal["vfio-pci", "mdev"]
Space = Literal["per-rid", "global"]

POLICIES: tuple[Policy, ...] = ("per-device", "global")
ASSIGNS: tuple[Assign, ...] = ("vfio-pci", "mdev")


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the policy table."""

    row: int  # row number of the per-device table (1..6); global rows reuse the same numbers
    space: Space  # where the pPASID comes from
    equal_x: bool  # the pPASID must equal the vPASID (a device that does not convert)
    converts: bool  # the device or its mediation converts vPASID -> pPASID (tag = pPASID)
    cpu_table: bool  # an ENQCMD function: X is recorded in the VM's CPU PASID translation table

    @property
    def tag(self) -> str:
        return "X" if self.equal_x else "pPASID"


def rule_for(policy: Policy, assign: Assign, enqcmd: bool, translating: bool) -> Rule:
    """The policy-table row for a device (see the module docstring)."""
    if assign == "vfio-pci":
        if not enqcmd:
            row = 2 if translating else 1
            if policy == "per-device":
                return Rule(row, "per-rid", True, False, False)
            return Rule(row, "global", not translating, translating, False)
        if translating:
            return Rule(4, "global", False, True, True)
        return Rule(3, "global", True, False, True)
    if enqcmd:
        return Rule(6, "global", False, True, True)
    if policy == "per-device":
        return Rule(5, "per-rid", False, True, False)
    return Rule(5, "global", False, True, False)
