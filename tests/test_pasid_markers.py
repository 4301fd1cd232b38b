# ruff: noqa: E501
"""The PASID DMA marker lines (images/guest/pasid_tests.sh, pasid_bench.sh) and the driver's
result lines, as images/guest/markers.py parses them; lines taken from a real guest run."""

from __future__ import annotations

import re
from pathlib import Path

from images.guest.markers import (
    PASID_CHECKS,
    Fault,
    GuestReport,
    parse_driver_result,
)

SCRIPTS = Path(__file__).resolve().parent.parent / "images" / "guest"

# the long marker lines stay whole, as the guest prints them (E501 off for this file)

RUN = """\
VIOASID-MODULES loaded=virtio_blk,vioasid_dma
VIOASID-PASID-DEVICES count=2 types=dma0:translating,dma1:enqcmd
VIOASID-PASID-TEST name=devices result=pass dev=dma0 pasid=0 detail=2 function(s): dma0:translating,dma1:enqcmd
VIOASID-PASID-BIND dev=dma0 pasid=1
[   10.645108] vioasid-dma 0000:00:05.0: unbind pasid 1 refused: not-bound (status 0x5)
VIOASID-PASID-BIND dev=dma0 pasid=1
VIOASID-PASID-TEST name=bind-unbind result=pass dev=dma0 pasid=1 detail=bind, unbind, unbind refused (not-bound), rebind
VIOASID-PASID-BIND dev=dma0 pasid=2
VIOASID-PASID-TEST name=isolation result=pass dev=dma0 pasid=2 fault_reason=0x71 fault_addr=0x10000000 fault_pasid=2 fault_write=0 detail=PASID 2 faults at PASID 1's IOVA
VIOASID-PASID-TEST name=ro-write-fault result=pass dev=dma0 pasid=1 fault_reason=0x85 fault_addr=0x10001004 fault_pasid=1 fault_write=1 detail=write fault at 0x10001004
VIOASID-PASID-TEST name=shared-pasid result=skip dev=dma0 pasid=0 detail=needs two functions
VIOASID-PASID-DONE passed=4 failed=0 skipped=1
VIOASID-PASID-BENCH name=pasid_jobs_4k_per_s value=2560.0 unit=jobs/s ops=5376 seconds=2.10
VIOASID-PASID-BENCH-DONE ok=1
"""


def test_report_of_a_real_run() -> None:
    rep = GuestReport.from_lines(RUN.splitlines())
    assert rep.modules == ["virtio_blk", "vioasid_dma"]
    assert rep.pasid_devices == {"dma0": "translating", "dma1": "enqcmd"}
    assert rep.pasid_binds == [("dma0", 1), ("dma0", 1), ("dma0", 2)]
    assert [r.name for r in rep.pasid_results] == [
        "devices",
        "bind-unbind",
        "isolation",
        "ro-write-fault",
        "shared-pasid",
    ]
    iso = rep.pasid_result("isolation")
    assert iso is not None and iso.passed and iso.pasid == 2
    assert iso.fault == Fault(0x71, 0x10000000, 2, False)
    ro = rep.pasid_result("ro-write-fault")
    assert ro is not None and ro.fault == Fault(0x85, 0x10001004, 1, True)
    skip = rep.pasid_result("shared-pasid")
    assert skip is not None and not skip.passed and skip.fault is None
    assert rep.pasid_done == (4, 0, 1)
    assert rep.pasid_ok
    assert rep.pasid_bench == {"pasid_jobs_4k_per_s": 2560.0}
    assert rep.pasid_bench_done is True and rep.errors == []


def test_failures_and_unfinished_runs_are_not_ok() -> None:
    failed = RUN.replace("name=isolation result=pass", "name=isolation result=fail")
    assert not GuestReport.from_lines(failed.splitlines()).pasid_ok
    unfinished = [ln for ln in RUN.splitlines() if "PASID-DONE" not in ln]
    assert not GuestReport.from_lines(unfinished).pasid_ok
    assert not GuestReport.from_lines([]).pasid_ok
    bad_bench = GuestReport.from_lines(
        ["VIOASID-PASID-BENCH name=x value=fast", "VIOASID-PASID-BENCH-DONE ok=0 detail=batch: x"]
    )
    assert bad_bench.pasid_bench == {} and bad_bench.pasid_bench_done is False
    assert len(bad_bench.errors) == 2


def test_driver_result_lines() -> None:
    ok = parse_driver_result("ok pasid=7\n")
    assert ok is not None and ok.kind == "ok" and ok.fields == {"pasid": "7"}
    eq = parse_driver_result("ok equal=0")
    assert eq is not None and eq.fields["equal"] == "0"
    err = parse_driver_result("error pasid-conflict bind pasid 3 refused (pPASID 3 in the way)")
    assert err is not None and err.kind == "error" and err.error == "pasid-conflict"
    assert err.message == "bind pasid 3 refused (pPASID 3 in the way)"
    f = parse_driver_result("fault reason=0x59 addr=0x10100000 pasid=1 write=1")
    assert f is not None and f.fault == Fault(0x59, 0x10100000, 1, True)
    for junk in ("", "fault reason=zz addr=0x1 pasid=1 write=1", "error", "okay", "fault"):
        assert parse_driver_result(junk) is None, junk


def test_the_script_runs_the_checks_markers_name() -> None:
    text = (SCRIPTS / "pasid_tests.sh").read_text()
    order = re.findall(r"^\s*want ([a-z-]+) && check_", text, flags=re.M)
    assert tuple(order) == PASID_CHECKS
    for name in PASID_CHECKS:  # every check reports under its own name
        n = re.escape(name)  # verdict or finish (cleanup, then verdict) say pass/fail
        reports = rf"(result {n} (pass|fail|skip)|(verdict|finish) {n} )"
        assert re.search(reports, text), name
