"""Host side of a guest test run: feed a QEMU's console to a GuestReport, with timings.

Used by the guest pytest tests and by ``vioasid demo``::

    async with launch(spec) as vm:
        run = await watch_guest(vm, timeout=180)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from images.guest.markers import DONE, INIT, STOPPED, GuestReport
from qemu_glue.qemu.process import QemuError, QemuProcess


@dataclass
class GuestRun:
    """A finished (or timed-out) guest run."""

    report: GuestReport = field(default_factory=GuestReport)
    init_s: float | None = None  # QEMU start → /init marker (host clock)
    tests_done_s: float | None = None  # QEMU start → first VIOASID-TESTS-DONE
    exit_s: float | None = None  # QEMU start → QEMU exited
    returncode: int | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.timed_out

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "passed": self.report.passed,
            "failed": self.report.failed,
            "init_s": self.init_s,
            "tests_done_s": self.tests_done_s,
            "exit_s": self.exit_s,
            "returncode": self.returncode,
            "timed_out": self.timed_out,
            "errors": self.report.errors,
            "failures": [
                {"name": r.name, "gen": r.gen, "detail": r.detail}
                for r in self.report.results
                if not r.passed
            ],
        }


async def watch_guest(
    vm: QemuProcess, timeout: float, *, until_exit: bool = True, run: GuestRun | None = None
) -> GuestRun:
    """Follow the console until QEMU exits (or, with ``until_exit=False``, the first
    TESTS-DONE / LOOP-STOPPED marker), at most ``timeout`` seconds."""
    run = run or GuestRun()

    async def follow() -> None:
        async for line in vm.console_lines(from_start=True):
            mk = run.report.feed(line.text)
            if mk is None:
                continue
            if mk.kind == INIT and run.init_s is None:
                run.init_s = line.t
            elif mk.kind == DONE and run.tests_done_s is None:
                run.tests_done_s = line.t
                if not until_exit:
                    return
            elif mk.kind == STOPPED and not until_exit:
                return
        run.returncode = await vm.wait(10.0)
        run.exit_s = vm.elapsed()

    try:
        async with asyncio.timeout(timeout):
            await follow()
    except (TimeoutError, QemuError):
        run.timed_out = True
    return run
