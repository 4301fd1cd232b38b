"""Live migration of a real guest's own vPASIDs on PASID DMA functions (QEMU 11.1, TCG).

The guest (images/guest/pasid_loop.sh) binds one PASID on each of four functions (dedicated,
translating, mdev, enqcmd) and runs random-data copy jobs on all of them in a loop, checking
each in the guest, while :func:`qemu_glue.migration.pasid_demo.run_pasid_migration` moves it
A -> B -> A between two engines with different occupancy. Every job verifies, vPASIDs stay, the
mdev and enqcmd pPASIDs become B's (and A's again), dedicated and translating keep pPASID ==
vPASID as the policy says, and the jobs the guest ran around each switch-over (submitted on
the source just before it stopped, read back on the destination) verify too. The refusal test
runs the four failure injections first: each leaves the source running with its functions
working (the guest's rounds go on) and the destination's engine with no pPASID of the guest.
"""

from __future__ import annotations

import pytest

from images.build import GuestImage, ensure_image
from qemu_glue.migration.pasid_demo import (
    FAILURE_MODES,
    PasidAttempt,
    PasidDemoOptions,
    run_pasid_migration,
)
from qemu_glue.qemu.binary import choose
from vioasid.model.engine import Host

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not choose().features.vfio_user:
        pytest.skip("needs QEMU 11.1 (vfio-user-pci)")
    return ensure_image()


def _show(res: object) -> None:
    for m in res.to_json()["migrations"]:  # type: ignore[attr-defined]
        print(
            f"\n{m['source']} -> {m['destination']}: downtime {m['downtime_ms']} ms (QEMU), "
            f"vioasid {m['vioasid_downtime_ms']} ms, pages {m['dma_pages']}, "
            f"bindings {m['bindings']}"
        )


@pytest.mark.asyncio
async def test_pasid_functions_migrate_a_b_a(image: GuestImage) -> None:
    opts = PasidDemoOptions(count=2, kernel=image.kernel, initrd=image.initrd)
    res = await run_pasid_migration(opts, lambda m: print(f"  {m}"))
    _show(res)
    tail = "\n".join(res.console_tail)
    assert res.problems == [], f"{res.problems}\n{tail}"
    migs = res.migrations
    assert [(a.source, a.destination) for a in migs] == [("host-a", "host-b"), ("host-b", "host-a")]
    types = set()
    for a in migs:
        r = a.result
        assert r.ok and r.status == "completed" and a.checks == [], (r.error, a.checks)
        assert len(r.bindings) >= 3 and r.vpasids_identical
        for b in r.bindings:
            types.add(b.type)
            if b.type in ("dedicated", "translating"):
                assert b.ppasid_after == b.vpasid == b.ppasid_before  # policy: pPASID == X
            else:  # B's tenants hold 8 pPASIDs of those spaces, A's 2: they must move
                assert b.ppasid_after != b.ppasid_before, b
        assert r.dst_status == "running" and r.source_status == "postmigrate"
    assert types == {"dedicated", "translating", "mdev", "enqcmd"}
    # back on A: the same pPASIDs as before the first hop (A's occupancy is unchanged)
    first, back = migs[0].result.bindings, migs[1].result.bindings
    assert [b.ppasid_before for b in first] == [b.ppasid_after for b in back]
    # every job the guest ran verified, on each host, including those across each switch-over
    loop = res.loop
    assert loop.done is not None and loop.failed == 0 and loop.failures == [], tail
    assert loop.ok == 4 * loop.rounds and res.rounds_after_last > 0
    assert all(a.rounds_before < loop.rounds for a in migs)
    assert res.device_jobs["failed"] == 0 and res.device_jobs["ok"] >= loop.ok
    assert res.leftover_bindings == {"host-a": 0, "host-b": 0}
    assert res.ok


@pytest.mark.asyncio
async def test_pasid_migration_refusals_keep_the_source(image: GuestImage) -> None:
    seen: list[tuple[str | None, int, list[str]]] = []

    async def on_attempt(att: PasidAttempt, src: Host, dst: Host) -> None:
        # right after the refusal, before anything is cleaned up by the demo
        mine = [b for b in dst.bindings() if b.vm == "guest"]
        seen.append((att.forced, len(mine), list(att.checks)))

    opts = PasidDemoOptions(count=1, failures=FAILURE_MODES, kernel=image.kernel,
                            initrd=image.initrd)  # fmt: skip
    res = await run_pasid_migration(opts, lambda m: print(f"  {m}"), on_attempt=on_attempt)
    tail = "\n".join(res.console_tail)
    assert res.problems == [], f"{res.problems}\n{tail}"
    refused = [a for a in res.attempts if a.forced]
    assert [a.forced for a in refused] == list(FAILURE_MODES)
    for a in refused:
        r = a.result
        print(f"\n{a.forced}: {r.status} at {r.refused_at}: {r.error}")
        assert not r.ok and a.checks == [], (a.forced, r.error, a.checks)
        assert r.source_status == "running"
    by = {a.forced: a.result for a in refused}
    assert "xhaust" in (by["exhausted"].error or "")
    assert "held by VM tenant" in (by["conflict"].error or "")  # a pPASID conflict
    assert "aborted" in (by["import-aborted"].error or "")
    assert by["dst-dies"].status in ("failed", "refused")
    # killed once the source had completed: the source, left in postmigrate, runs again
    assert by["dst-dies-late"].status == "failed"
    assert "did not take over" in (by["dst-dies-late"].error or "")
    # the destination held no pPASID of the guest right after each refusal
    assert [(f, n) for f, n, _ in seen if f] == [(f, 0) for f in FAILURE_MODES]
    # the source's functions kept working: the guest's jobs never failed, and the one real
    # migration afterwards still carried every binding
    assert res.loop.failed == 0 and res.loop.failures == [] and res.loop.done is not None
    assert len(res.migrations) == 1 and res.migrations[0].result.ok
    assert res.ok
