"""The seed's systems on real QEMU 11.1 guests (``vioasid demo --seed``), one test per case.

One run of :func:`qemu_glue.seed_demo.run_seed` (three guests' worth of boots: the one-guest
per-device run and its ``global`` twin side by side, then two guests sharing one parent) feeds
every test here: each device type's pPASID/tag/table, the ENQCMD portal with the VM's CPU PASID
table, the trouble case (conflict errno and dmesg line in the guest, no table changed, the first
binding still working) and its legal variants, exhaustion, the two policies, and the two-VM
shared parent (random-data jobs in both guests concurrently >= 20 s, SIGKILL of one). The host's
own checks (invariants after every bind command, unchanged tables after a refusal, every DMA in
the requester's RAM) are part of each case's verdict. Needs QEMU 11.1; no timed asserts (the
20 s is a duration the run must reach, not a speed).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from images.build import GuestImage
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.seed_demo import CASES, CONCURRENT_S, SeedOptions, run_seed

pytestmark = [pytest.mark.guest, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def seed(
    tmp_path_factory: pytest.TempPathFactory, pasid_image: GuestImage, pasid_qemu: QemuChoice
) -> dict[str, Any]:
    img, q = pasid_image, pasid_qemu
    trace = tmp_path_factory.mktemp("seed") / "trace.jsonl"
    with open(trace, "w") as t:
        opts = SeedOptions(kernel=img.kernel, initrd=img.initrd, qemu=q, trace=t, timeout=900)
        out = asyncio.run(run_seed(opts))
    print(json.dumps(out))
    out["_trace"] = trace
    return out


def _case(seed: dict[str, Any], name: str) -> dict[str, Any]:
    by: dict[str, dict[str, Any]] = {c["name"]: c for c in seed["cases"]}
    assert name in by, sorted(by)
    c = by[name]
    assert c["pass"], c["observed"]
    return c


def _ok(c: dict[str, Any], dev: str, x: int) -> dict[str, Any]:
    return next(b for b in c["bindings"] if b["device"] == dev and b["vpasid"] == x)


def test_every_case_is_reported(seed: dict[str, Any]) -> None:
    assert [c["name"] for c in seed["cases"]] == list(CASES)
    assert all(set(c) >= {"name", "expected", "observed", "pass"} for c in seed["cases"])


def test_dedicated(seed: dict[str, Any]) -> None:
    b = _ok(_case(seed, "dedicated"), "dma0", 5)
    assert (b["ppasid"], b["tag"], b["table"], b["row"]) == (5, 5, "per-rid", 1)


def test_translating(seed: dict[str, Any]) -> None:
    b = _ok(_case(seed, "translating"), "dma1", 5)
    assert (b["ppasid"], b["tag"], b["table"], b["row"]) == (5, 5, "per-rid", 2)


def test_mdev(seed: dict[str, Any]) -> None:
    b = _ok(_case(seed, "mdev"), "dma2", 5)
    assert (b["ppasid"], b["tag"], b["table"], b["assign"]) == (1, 1, "per-rid", "mdev")


def test_enqcmd_portal(seed: dict[str, Any]) -> None:
    c = _case(seed, "enqcmd-portal")
    a, m = _ok(c, "dma4", 5), _ok(c, "dma5", 5)
    assert a["ppasid"] == m["ppasid"] == 1 and a["table"] == m["table"] == "global"
    assert "refused at both portals" in c["observed"]


def test_trouble_case(seed: dict[str, Any]) -> None:
    c = _case(seed, "trouble-case")
    b = _ok(c, "dma3", 5)
    assert (b["status"], b["in_the_way"], b["ppasid"]) == ("pasid-conflict", 1, None)
    assert "Device_or_resource_busy" in c["observed"]
    assert "bind pasid 5 refused: pasid-conflict (pPASID 1 in the way)" in c["observed"]
    assert "no table changed" in c["observed"]
    vm = c["tables"]["vms"]["guest"]  # the engine's dump right after the refusal
    assert vm["cpu_table"] == {"5": 1} and vm["devices"]["00:08.0"]["bindings"] == {}
    assert vm["devices"]["00:05.0"]["bindings"]["5"] == 5


def test_trouble_case_legal(seed: dict[str, Any]) -> None:
    c = _case(seed, "trouble-case-legal")
    assert _ok(c, "dma4", 6)["ppasid"] == 2 and _ok(c, "dma0", 6)["ppasid"] == 6
    b = _ok(c, "dma3", 9)
    assert (b["status"], b["ppasid"], b["table"]) == ("ok", 9, "global")


def test_exhausted(seed: dict[str, Any]) -> None:
    c = _case(seed, "exhausted")
    assert [_ok(c, "dma6", x)["ppasid"] for x in (11, 12, 13)] == [1, 2, 3]
    assert _ok(c, "dma6", 14)["status"] == "exhausted"
    assert "No_space_left_on_device" in c["observed"]


def test_policy_per_device_and_global(seed: dict[str, Any]) -> None:
    pd, gl = _case(seed, "policy-per-device"), _case(seed, "policy-global")
    assert [_ok(pd, d, 5)["ppasid"] for d in ("dma0", "dma1", "dma2", "dma4")] == [5, 5, 1, 1]
    assert [_ok(gl, d, 5)["ppasid"] for d in ("dma0", "dma1", "dma2", "dma4")] == [5, 5, 5, 5]
    assert _ok(pd, "dma0", 7)["ppasid"] == 7
    assert _ok(gl, "dma0", 7)["status"] == "pasid-conflict"


def test_shared_parent_two_guests(seed: dict[str, Any]) -> None:
    c = _case(seed, "shared-parent")
    pps = sorted(b["ppasid"] for b in c["bindings"] if b["vpasid"] == 1)
    assert pps == [1, 2] and {b["vm"] for b in c["bindings"]} == {"tenant-a", "tenant-b"}
    assert seed["tenants"]["concurrent_s"] >= CONCURRENT_S
    killed, survivor = seed["tenants"]["killed"], seed["tenants"]["survivor"]
    assert killed and survivor
    both = c["tables"]["functions"]["host/6a:00.0"]["table"]
    assert sorted(o["vm"] for o in both.values()) == ["tenant-a", "tenant-b"]
    status = seed["tenants"]["status_before_kill"]  # the daemon's dump (vioasid status --json)
    held = status["functions"]["host/6a:00.0"]["table"]
    assert sorted(o["vm"] for o in held.values()) == ["tenant-a", "tenant-b"]
    assert status["allocators"]["functions"]["6a:00.0"]["per_rid"] == [1, 2]
    after = seed["tenants"]["tables_after_kill"]["functions"]["host/6a:00.0"]["table"]
    assert [o["vm"] for o in after.values()] == [survivor]


def test_trace_names_ppasid_tag_and_table(seed: dict[str, Any]) -> None:
    lines = [json.loads(x) for x in Path(seed["_trace"]).read_text().splitlines()]
    binds = [e for e in lines if e["event"] == "bind-command" and e["status"] == "ok"]
    jobs = [e for e in lines if e["event"] == "job"]
    assert binds and jobs
    assert any(e["type"] == "mdev" and e["space"] == "per-rid" and e["tag"] != e["vpasid"]
               for e in binds)  # fmt: skip
    assert any(e["type"] == "enqcmd" and e["space"] == "global" for e in binds)
    assert {e["vm"] for e in binds} >= {"guest", "guest-global", "tenant-a", "tenant-b"}


def test_all_passed(seed: dict[str, Any]) -> None:
    assert seed["ok"], [c["name"] for c in seed["cases"] if not c["pass"]]
