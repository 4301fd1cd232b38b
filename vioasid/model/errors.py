"""The error kinds of the vPASID engine, as one exception hierarchy.

Every refusal the model makes is a :class:`VioasidError` whose ``kind`` is one of the five error
kinds of the scenario contract and the wire protocol (``pasid-conflict``, ``invalid``,
``not-found``, ``exhausted``, ``migration-failed``). The daemon maps ``kind`` onto its status
codes; the scenario runner prints ``{"kind": ..., "message": ...}``. A refused operation leaves
every table and allocator exactly as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

ERROR_KINDS = ("pasid-conflict", "invalid", "not-found", "exhausted", "migration-failed")


class VioasidError(Exception):
    """Base of every model error: ``kind`` (one of :data:`ERROR_KINDS`) and a message."""

    kind: ClassVar[str] = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message}


class InvalidRequest(VioasidError):
    """The request makes no sense for the state it names (bad value, wrong device kind...)."""

    kind = "invalid"


class NotFound(VioasidError):
    """The VM, device, function, binding or guest PASID entry named does not exist."""

    kind = "not-found"


class PasidConflict(VioasidError):
    """A bind refused by the conflict rules; names VM, device, vPASID and the pPASID in the way.

    ``rule`` is the conflict rule of the design (1: needs pPASID == vPASID but it is taken;
    2: the VM's CPU table maps the vPASID elsewhere; 3: space exhausted; 4: the function's
    table slot is held by another binding).
    """

    kind = "pasid-conflict"

    def __init__(
        self,
        message: str,
        *,
        vm: str = "",
        device: str = "",
        vpasid: int = -1,
        ppasid: int = -1,
        rule: int = 0,
    ) -> None:
        super().__init__(message)
        self.vm = vm
        self.device = device
        self.vpasid = vpasid
        self.ppasid = ppasid
        self.rule = rule


class Exhausted(PasidConflict):
    """Conflict rule 3: the pPASID space a bind must draw from has no free value left."""

    kind = "exhausted"


class MigrationFailed(VioasidError):
    """A migration stream was refused (corrupt, truncated, future version) or a binding could
    not be re-created on the destination; the destination keeps nothing."""

    kind = "migration-failed"


ERROR_CLASSES: dict[str, type[VioasidError]] = {
    "pasid-conflict": PasidConflict,
    "invalid": InvalidRequest,
    "not-found": NotFound,
    "exhausted": Exhausted,
    "migration-failed": MigrationFailed,
}
