"""What both migration demos share: their options, one attempt's record, the run's result.

:mod:`qemu_glue.migration.demo` (daemon-held vPASIDs, vhost-user-blk) and
:mod:`qemu_glue.migration.pasid_demo` (PASID DMA functions, vfio-user) run the same plan: a
guest boots on one host, ``failures`` refused attempts go first (each must leave the source
running), then ``count`` migrations hop between the hosts. Each demo adds its own figures to
:class:`AttemptBase`, :class:`DemoResultBase` and :class:`DemoOptionsBase`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Generic, Protocol, TypeVar

from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.qemu.vmspec import Accel, IommuMode

Progress = Callable[[str], None]


class MigrationOutcome(Protocol):
    """What a demo reads of one migration's result."""

    @property
    def ok(self) -> bool: ...

    @property
    def source_status(self) -> str | None: ...

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=MigrationOutcome)


@dataclass
class DemoOptionsBase:
    """Options of a migration demo run."""

    count: int = 1
    iommu: IommuMode = IommuMode.SCALABLE_FS
    accel: Accel = Accel.TCG
    memory_mib: int = 256
    failures: tuple[str, ...] = ()  # refused attempts before the first migration (tests)
    boot_timeout: float = 300.0
    timeout: float = 600.0
    kernel: Any = None  # images.build.GuestImage fields (filled by ensure_kernel)
    initrd: Any = None
    qemu: QemuChoice | None = None  # None: qemu_glue.qemu.binary.choose() at launch


async def ensure_kernel(opts: DemoOptionsBase, progress: Progress) -> None:
    """Fill ``opts.kernel``/``opts.initrd`` from the test guest image (built if needed)."""
    from images.build import ensure_image

    if opts.kernel is None:
        progress("preparing the test guest image")
        img = await asyncio.to_thread(ensure_image, progress)
        opts.kernel, opts.initrd = img.kernel, img.initrd


@dataclass
class AttemptBase(Generic[R]):
    """One migration attempt as a demo saw it: ``forced`` names the failure of a refused one,
    ``checks`` what went wrong around it."""

    source: str
    destination: str
    result: R
    forced: str | None = None
    checks: list[str] = field(default_factory=list)

    def refusal_checks(self) -> None:
        """A forced failure must be refused with the source still running."""
        if self.result.ok:
            self.checks.append("the forced failure was not refused")
        if self.result.source_status != "running":
            self.checks.append(f"source is {self.result.source_status}, not running")

    def extra_json(self) -> dict[str, Any]:
        """The demo's own figures of the attempt: the fields a subclass adds (those not None)."""
        base = {f.name for f in fields(AttemptBase)}
        return {
            f.name: v
            for f in fields(self)
            if f.name not in base and (v := getattr(self, f.name)) is not None
        }

    def to_json(self) -> dict[str, Any]:
        out = self.result.to_json()
        out.update(
            source=self.source, destination=self.destination, forced=self.forced, checks=self.checks
        )
        out.update(self.extra_json())
        return out


A = TypeVar("A", bound=AttemptBase[Any])


@dataclass
class DemoResultBase(Generic[A]):
    """A demo run: its attempts (refused ones first) and what went wrong outside them."""

    attempts: list[A] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    console_tail: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def migrations(self) -> list[A]:
        return [a for a in self.attempts if a.forced is None]

    @property
    def attempts_ok(self) -> bool:
        """No problem; every migration done and every forced failure refused, all checks clean."""
        return (
            not self.problems
            and all(a.result.ok and not a.checks for a in self.migrations)
            and all(not a.result.ok and not a.checks for a in self.attempts if a.forced)
        )

    def attempts_json(self) -> dict[str, Any]:
        return {
            "migrations": [a.to_json() for a in self.migrations],
            "refused_attempts": [a.to_json() for a in self.attempts if a.forced],
        }


__all__ = [
    "AttemptBase",
    "DemoOptionsBase",
    "DemoResultBase",
    "MigrationOutcome",
    "Progress",
    "ensure_kernel",
]
