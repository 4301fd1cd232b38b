"""Live migration with real QEMU (TCG): the guest writes and verifies data while it moves.

One run of :func:`qemu_glue.migration.demo.run_migration_demo` (two daemons, at most two QEMUs
at a time): first two refused attempts — a corrupted vPASID state stream and a destination that
cannot re-create a binding — each of which must leave the source running with its state intact,
the destination daemon empty and its QEMU stopped; then two migrations A → B → A while the
guest's disk tests loop. Every guest check passes (also after the migrations), the backing file
holds the last generation, vPASIDs are identical on both sides, every pPASID was re-allocated
(the hosts' tenants differ), DMA through each binding reaches the same guest page afterwards,
and the reserved range holding the tables arrived intact. Figures are printed (``-s``), not
asserted.
"""

from __future__ import annotations

import pytest

from images.build import GuestImage
from qemu_glue.migration.demo import DemoOptions, run_migration_demo

pytestmark = pytest.mark.guest


@pytest.mark.asyncio
async def test_migrate_while_guest_tests_run(image: GuestImage) -> None:
    opts = DemoOptions(
        count=2, failures=("corrupt", "conflict"), kernel=image.kernel, initrd=image.initrd
    )
    res = await run_migration_demo(opts, lambda m: print(f"  {m}"))
    doc = res.to_json()
    for m in doc["migrations"]:
        print(
            f"\n{m['source']} -> {m['destination']}: downtime {m['downtime_ms']} ms (QEMU), "
            f"{m['observed_downtime_ms']} ms STOP->RESUME, vPASID switch-over "
            f"{m['vpasid_switchover_ms']} ms (pre-copied: {m['precopied']})"
        )
    tail = "\n".join(res.console_tail)
    assert res.problems == [], f"{res.problems}\n{tail}"

    refused = [a for a in res.attempts if a.forced]
    assert [a.forced for a in refused] == ["corrupt", "conflict"]
    for a in refused:
        assert not a.result.ok and a.result.status == "cancelled"
        assert a.result.source_status == "running"
        assert a.checks == []  # source daemon unchanged, destination daemon empty
    assert "checksum" in (refused[0].result.error or "")

    migs = res.migrations
    assert len(migs) == 2 and [(a.source, a.destination) for a in migs] == [
        ("host-a", "host-b"),
        ("host-b", "host-a"),
    ]
    for a in migs:
        r = a.result
        assert r.ok and r.status == "completed", r.error
        assert a.checks == []
        assert r.vpasids_identical and r.vpasids_carried == res.bindings
        assert r.ppasids_changed == res.bindings  # tenants differ: every pPASID moved
        assert a.dma_ok == res.bindings
        assert r.reserve_intact is True
        assert r.source_status == "postmigrate"

    # QEMU handed each source back-end a dirty log and turned logging on (checked in a.checks);
    # how many pages it marked depends on the guest doing I/O in that ~1 s window: printed only
    print(f"dirty pages marked: {[a.dirty_pages_marked for a in migs]}")
    assert res.report.errors == []
    assert res.report.failed == 0, [x for x in res.report.results if not x.passed]
    assert res.tests_after_migration > 0
    assert len(res.report.done) >= 2
    assert res.disk_ok, res.disk_mismatches
    assert res.ok
