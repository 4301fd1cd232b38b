"""The guest's pattern generator and marker lines agree with the host's Python (fast).

The awk pattern generator is cut out of guest_tests/disk_tests.sh and run under the host's
busybox, so a drift between the shell and images.guest.patterns fails here, not in a guest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from images.guest import markers, patterns

SCRIPTS = Path(patterns.__file__).resolve().parent


def _shell_pattern(tmp_path: Path, offset: int, length: int, gen: int) -> bytes:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not installed")
    src = (SCRIPTS / "disk_tests.sh").read_text()
    m = re.search(r"^pattern\(\) \{.*?^\}", src, re.S | re.M)
    assert m, "pattern() not found in disk_tests.sh"
    out = tmp_path / "p"
    script = f"gen={gen}; work={tmp_path}\n{m.group(0)}\npattern {offset} {length} {out}\n"
    subprocess.run([busybox, "sh", "-c", script], check=True, capture_output=True)
    return out.read_bytes()


@pytest.mark.parametrize(
    ("offset", "length", "gen"),
    [(0, 1024, 0), (4 * 1024 * 1024 + 1000, 3000, 5), (16 * 1024 * 1024 + 7, 70000, 123)],
)
def test_shell_pattern_equals_python(tmp_path: Path, offset: int, length: int, gen: int) -> None:
    assert _shell_pattern(tmp_path, offset, length, gen) == patterns.pattern(offset, length, gen)


def test_pattern_is_sliceable_and_distinct() -> None:
    whole = patterns.pattern(0, 8192)
    assert patterns.pattern(1000, 3000) == whole[1000:4000]
    assert patterns.record(3) == whole[3 * 512 : 4 * 512]
    assert patterns.record(3).startswith(b"VIOASID g=0 lba=3 ") and len(patterns.record(3)) == 512
    assert patterns.record(3, gen=1) != patterns.record(3) != patterns.record(4)


def test_table_is_consistent() -> None:
    seen: list[tuple[int, int]] = []
    for t in patterns.TESTS:
        end = t.offset + t.length
        assert end <= patterns.stop_offset(), t.name
        assert all(end <= a or t.offset >= b for a, b in seen), f"{t.name} overlaps"
        seen.append((t.offset, end))
        if t.mode in ("direct", "parallel"):  # O_DIRECT needs sector-aligned, whole requests
            assert t.offset % 512 == 0 and t.bs % 512 == 0 and t.length % t.bs == 0, t.name
        if t.mode == "parallel":
            assert t.length % (4 * t.bs) == 0
    conf = patterns.tests_conf().splitlines()
    assert conf[0].split() == ["page", str(1024 * 1024), "4096", "4096", "direct"]
    assert patterns.select(["large", "page"]) == [patterns.TESTS[0], patterns.TESTS[5]]
    with pytest.raises(KeyError):
        patterns.select(["nope"])


def test_check_disk_catches_a_wrong_byte(tmp_path: Path) -> None:
    disk = patterns.make_disk(tmp_path / "d.raw")
    with open(disk, "r+b") as f:
        for off, data in patterns.expected_blocks(gen=2):
            f.seek(off)
            f.write(data)
    assert patterns.check_disk(disk, gen=2) == []
    assert {m.test for m in patterns.check_disk(disk, gen=1)} == {t.name for t in patterns.TESTS}
    large = patterns.select(["large"])[0]
    with open(disk, "r+b") as f:
        f.seek(large.offset + 777)
        f.write(b"#")
    (bad,) = patterns.check_disk(disk, gen=2)
    assert bad.test == "large" and bad.first_bad == large.offset + 777


def test_stop_sector(tmp_path: Path) -> None:
    disk = patterns.make_disk(tmp_path / "d.raw", 4 * 1024 * 1024)
    patterns.request_stop(disk)
    data = disk.read_bytes()
    assert data[-512:].startswith(patterns.STOP_MAGIC) and data[:-512] == bytes(len(data) - 512)


def test_markers_report() -> None:
    lines = [
        "[    1.0] junk",
        "VIOASID-INIT uptime=3.81 kernel=6.12",
        "VIOASID-TEST name=page gen=0 result=pass detail=md5=ab bytes=4096",
        "[   5.1] VIOASID-TEST name=large gen=0 result=fail detail=md5 want=a got=b bytes=0",
        "VIOASID-TESTS-DONE gen=0 passed=1 failed=1",
    ]
    rep = markers.GuestReport.from_lines(lines)
    assert rep.init_seen and rep.init_uptime_s == pytest.approx(3.81)
    assert (rep.passed, rep.failed, rep.done) == (1, 1, [(0, 1, 1)])
    assert rep.results[1].detail == "md5 want=a got=b bytes=0" and not rep.ok
    ok = markers.GuestReport.from_lines([*lines[:3], "VIOASID-TESTS-DONE gen=0 passed=1 failed=0"])
    assert ok.ok and ok.last_gen == 0
    assert markers.parse_marker("no marker") is None
    err = markers.parse_marker("VIOASID-ERROR detail=no block device /dev/vda")
    assert err is not None and err.fields["detail"] == "no block device /dev/vda"
