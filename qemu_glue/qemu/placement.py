"""Host CPU placement of a guest's threads: vCPUs and the IOTLB reader together, the rest apart.

Why (docs/performance.md, "Fifth round"): in strict mode every guest unmap is a vhost-user
``IOTLB_MSG`` round trip that QEMU's vCPU thread waits on. Two threads that hand a message back
and forth on one CPU cost about 11 µs per round trip on this project's machine; on two CPUs,
each wake-up finds the other CPU idle and costs 20 to 30 µs more. So ``--pin`` puts each vCPU
thread (QMP ``query-cpus-fast`` ``thread-id``) and vioasid's IOTLB reader thread on the vCPU
CPUs, and every other thread of QEMU (main loop, RCU, I/O workers) and of this process (the
event loop serving the rings and the file I/O) on the remaining CPUs.

``--pin`` takes ``off`` (default), ``auto`` (the first allowed CPU for a one-vCPU guest, one
CPU per vCPU otherwise, always leaving one for everything else) or a CPU list (``0``,
``2-3``, ``0,2``) for the vCPUs. Affinity is set with ``sched_setaffinity`` per thread id
(``os.sched_setaffinity``), the mechanism behind ``taskset -p`` and libvirt's ``vcpupin`` /
``emulatorpin``. :meth:`Pinned.restore` gives this process's threads their old CPU sets back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PIN_CHOICES_HELP = "off | auto | CPU list such as 0 or 2-3"


class PinError(ValueError):
    """A ``--pin`` value that cannot be used (one line, for the command line)."""


def parse_cpu_list(text: str) -> set[int]:
    """``0``, ``0,2``, ``2-5`` → a set of CPU numbers (the kernel's cpulist syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise PinError(f"empty item in CPU list {text!r}")
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise PinError(f"not a CPU list: {text!r} (use e.g. 0, 0,2 or 2-3)") from None
        if lo < 0 or hi < lo:
            raise PinError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(lo, hi + 1))
    return cpus


def format_cpus(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpu_list` (ranges folded): ``{0, 1, 2, 5}`` → ``0-2,5``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def check_pin(text: str) -> str:
    """The ``--pin`` argument type: ``off``, ``auto`` or a valid CPU list (else PinError)."""
    if text not in ("off", "auto"):
        parse_cpu_list(text)
    return text


@dataclass(frozen=True)
class Placement:
    """Which CPUs the vCPUs (and the IOTLB reader) get, and which everything else gets."""

    vcpu_cpus: tuple[int, ...]
    other_cpus: frozenset[int]

    def vcpu_cpu(self, index: int) -> int:
        """The CPU of vCPU ``index`` (round robin over :attr:`vcpu_cpus`)."""
        return self.vcpu_cpus[index % len(self.vcpu_cpus)]

    def to_json(self) -> dict[str, object]:
        return {
            "vcpu_cpus": format_cpus(self.vcpu_cpus),
            "other_cpus": format_cpus(self.other_cpus),
        }


def plan(pin: str, allowed: set[int], vcpus: int = 1) -> Placement | None:
    """The placement ``pin`` asks for on the CPUs this process may use; None for ``off``, or for
    ``auto`` with fewer than two CPUs (nothing to separate). PinError for a CPU list outside
    ``allowed`` or one that leaves no CPU for the other threads."""
    if pin == "off":
        return None
    if pin == "auto":
        if len(allowed) < 2:
            log.info("--pin auto: only CPU %s is allowed, nothing to place", format_cpus(allowed))
            return None
        ordered = sorted(allowed)
        take = max(1, min(vcpus, len(ordered) - 1))
        chosen = ordered[:take]
    else:
        wanted = parse_cpu_list(pin)
        outside = wanted - allowed
        if outside:
            raise PinError(
                f"--pin {pin}: CPU {format_cpus(outside)} is not one this process may use "
                f"(allowed: {format_cpus(allowed)})"
            )
        chosen = sorted(wanted)
    other = frozenset(allowed - set(chosen))
    if not other:
        raise PinError(
            f"--pin {pin}: leaves no CPU for QEMU's other threads and vioasid's data path "
            f"(allowed: {format_cpus(allowed)})"
        )
    return Placement(tuple(chosen), other)


def thread_ids(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (``/proc/PID/task``); [] if it is gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return ""


def set_affinity(tid: int, cpus: Iterable[int]) -> bool:
    """``sched_setaffinity`` for one thread; False (logged) if it is gone or refused."""
    try:
        os.sched_setaffinity(tid, set(cpus))
        return True
    except OSError as exc:
        log.debug("sched_setaffinity(%d): %s", tid, exc)
        return False


@dataclass
class Pinned:
    """What :func:`pin_vm` did, and this process's old CPU sets to :meth:`restore`."""

    placement: Placement
    vcpu_threads: dict[int, int] = field(default_factory=dict)  # thread id → CPU
    qemu_other_threads: int = 0
    own_threads: int = 0
    reader_threads: list[int] = field(default_factory=list)
    _saved: dict[int, set[int]] = field(default_factory=dict)
    _default: set[int] | None = None  # the caller's CPU set, for threads started since

    def restore(self) -> None:
        """This process's threads back on the CPUs they had, and threads started since on the
        caller's old CPU set (QEMU is left as it is: it ends)."""
        if self._default is None:
            return
        for tid in thread_ids(os.getpid()):
            set_affinity(tid, self._saved.get(tid, self._default))
        self._saved.clear()
        self._default = None

    def to_json(self) -> dict[str, object]:
        return {
            **self.placement.to_json(),
            "vcpu_threads": {str(t): c for t, c in self.vcpu_threads.items()},
            "qemu_other_threads": self.qemu_other_threads,
            "vioasid_threads": self.own_threads,
            "iotlb_reader_threads": list(self.reader_threads),
        }


async def vcpu_thread_ids(qmp: Any) -> list[int]:
    """Thread id of each vCPU, in ``cpu-index`` order (QMP ``query-cpus-fast``)."""
    cpus = await qmp.execute("query-cpus-fast")
    ordered = sorted(cpus, key=lambda c: int(c.get("cpu-index", 0)))
    return [int(c["thread-id"]) for c in ordered]


async def pin_vm(
    qmp: Any,
    qemu_pid: int,
    placement: Placement,
    *,
    readers: Iterable[int] = (),
    own: bool = False,
) -> Pinned:
    """Place a running QEMU's threads (and, with ``own``, this process's): vCPU threads and the
    IOTLB reader threads ``readers`` (thread ids of this process) on the vCPU CPUs, every other
    thread on the other CPUs. Threads started later inherit their creator's CPU set."""
    done = Pinned(placement)
    vcpus = await vcpu_thread_ids(qmp)
    for i, tid in enumerate(vcpus):
        cpu = placement.vcpu_cpu(i)
        if set_affinity(tid, {cpu}):
            done.vcpu_threads[tid] = cpu
    for tid in thread_ids(qemu_pid):
        if tid not in done.vcpu_threads and set_affinity(tid, placement.other_cpus):
            done.qemu_other_threads += 1
    if own:
        me = os.getpid()
        done._default = os.sched_getaffinity(0)
        keep = set(readers)
        for tid in thread_ids(me):
            with contextlib.suppress(OSError):
                done._saved[tid] = os.sched_getaffinity(tid)
            if tid in keep:
                if set_affinity(tid, placement.vcpu_cpus):
                    done.reader_threads.append(tid)
            elif set_affinity(tid, placement.other_cpus):
                done.own_threads += 1
    log.info(
        "placed: vCPU threads %s on CPU %s; %d other QEMU and %d vioasid threads on CPU %s; "
        "IOTLB reader %s",
        list(done.vcpu_threads),
        format_cpus(placement.vcpu_cpus),
        done.qemu_other_threads,
        done.own_threads,
        format_cpus(placement.other_cpus),
        done.reader_threads or "-",
    )
    return done
