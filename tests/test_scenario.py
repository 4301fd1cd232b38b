"""`vioasid scenario`: every example is self-checking and passes; the output contract; invalid
files exit 2 naming the field before any step runs; unmet expectations exit 1."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from vioasid.cli import main
from vioasid.model.scenario import ScenarioError, check_expect, parse_scenario, parse_size

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))
SUMMARY = re.compile(r"^scenario: (\d+) steps, (\d+) expectations met, (\d+) failed$")

HEADER = """
[[host]]
name = "h1"
  [[host.function]]
  rid = "3a:00.0"
  [[host.function]]
  rid = "3b:00.0"
  enqcmd = true
[[vm]]
name = "vm1"
host = "h1"
memory = "8M"
  [[vm.device]]
  rid = "00:03.0"
  function = "3a:00.0"
  assign = "vfio-pci"
  [[vm.device]]
  rid = "00:04.0"
  function = "3b:00.0"
  assign = "mdev"
"""


def _run(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], str]:
    f = tmp_path / "s.toml"
    f.write_text(text)
    rc = main(["scenario", str(f)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_there_are_examples() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"trouble-case", "mdev-shared-parent", "policies-side-by-side", "migration"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_meets_every_expectation(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["scenario", str(path)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    m = SUMMARY.match(lines[-1])
    assert m, lines[-1]
    steps, met, failed = map(int, m.groups())
    results = [json.loads(line) for line in lines[:-1]]
    assert [r["step"] for r in results] == list(range(steps))
    assert failed == 0 and met > 0 and rc == 0, [r for r in results if r.get("expect") == "failed"]
    assert met == sum(1 for r in results if r.get("expect") == "met")
    for r in results:
        assert isinstance(r["ok"], bool) and r["op"]
        if r["op"] == "bind" and r["ok"]:
            assert isinstance(r["ppasid"], int) and r["space"] in ("per-rid", "global")
        if r["op"] == "dma":
            assert ("fault" in r) != ("hpa" in r)
            if "hpa" in r:
                assert r["hpa"].startswith("0x") and r["gpa"].startswith("0x")
            else:
                f = r["fault"]
                assert {"reason", "name", "device", "vpasid", "addr"} <= set(f)
        if not r["ok"] and "fault" not in r:
            assert r["error"]["kind"] in (
                "pasid-conflict",
                "invalid",
                "not-found",
                "exhausted",
                "migration-failed",
            )


def test_two_vms_never_share_an_hpa(capsys: pytest.CaptureFixture[str]) -> None:
    for path in EXAMPLES:
        steps = tomllib.loads(path.read_text()).get("step", [])
        main(["scenario", str(path)])
        results = [json.loads(x) for x in capsys.readouterr().out.splitlines()[:-1]]
        owner: dict[int, str] = {}
        for step, r in zip(steps, results, strict=True):
            if "hpa" in r:
                page = int(r["hpa"], 16) >> 12
                assert owner.setdefault(page, step["vm"]) == step["vm"], (path.name, r)


def test_unmet_expectation_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, _ = _run(
        tmp_path,
        HEADER
        + """
[[step]]
op = "map"
vm = "vm1"
vpasid = 5
va = 0x400000
gpa = 0x200000
size = 0x1000
[[step]]
op = "bind"
vm = "vm1"
device = "00:04.0"
vpasid = 5
expect = { ppasid = 7 }
[[step]]
op = "enqcmd"
vm = "vm1"
device = "00:04.0"
vpasid = 5
expect = { ppasid = 1 }
""",
        capsys,
    )
    assert rc == 1
    assert lines[-1] == "scenario: 3 steps, 1 expectations met, 1 failed"
    bad = json.loads(lines[1])
    assert bad["expect"] == "failed" and bad["mismatch"]["ppasid"] == {"expected": 7, "got": 1}


INVALID = [
    ("", "host"),
    ('[[host]]\nname = "h"\nallocation = "fifo"\n', "host[0].allocation"),
    ('[[host]]\nname = "h"\npasid_bits = 21\n', "host[0].pasid_bits"),
    ('[[host]]\nname = "h"\n[[host.function]]\nrid = "zz:00.0"\n', "host[0].function[0].rid"),
    ('[[host]]\nname = "h"\ncolour = 1\n', "host[0].colour"),
    (HEADER + '[[vm]]\nname = "vm2"\nhost = "h9"\n', "vm[1].host"),
    (HEADER + '[[vm]]\nname = "vm2"\nhost = "h1"\nmemory = "lots"\n', "vm[1].memory"),
    (
        HEADER + '[[vm]]\nname = "vm2"\nhost = "h1"\n[[vm.device]]\nrid = "00:03.0"\n'
        'function = "3a:00.0"\n',
        "vm[1].device[0]",
    ),
    (HEADER + '[[step]]\nop = "fly"\n', "step[0].op"),
    (HEADER + '[[step]]\nop = "bind"\nvm = "vm1"\ndevice = "00:03.0"\n', "step[0].vpasid"),
    (
        HEADER + '[[step]]\nop = "bind"\nvm = "vm1"\ndevice = "00:03.0"\nvpasid = "5"\n',
        "step[0].vpasid",
    ),
    (
        HEADER + '[[step]]\nop = "bind"\nvm = "vm1"\ndevice = "00:09.0"\nvpasid = 5\n',
        "step[0].device",
    ),
    (HEADER + '[[step]]\nop = "bind"\nvm = "vm7"\ndevice = "00:03.0"\nvpasid = 5\n', "step[0].vm"),
    (
        HEADER + '[[step]]\nop = "dma"\nvm = "vm1"\ndevice = "00:03.0"\nvpasid = 0\naddr = 0\n',
        "step[0].vpasid",
    ),
    (
        HEADER
        + '[[step]]\nop = "map"\nvm = "vm1"\nvpasid = 1\nva = 0x1001\ngpa = 0\nsize = 4096\n',
        "step[0].va",
    ),
    (
        HEADER + '[[step]]\nop = "map"\nvm = "vm1"\nvpasid = 1\nva = 0\ngpa = 0\nsize = 4096\n'
        'perm = "x"\n',
        "step[0].perm",
    ),
    (HEADER + '[[step]]\nop = "migrate"\nvm = "vm1"\nto = "h2"\nfunctions = {}\n', "step[0].to"),
    (
        HEADER + '[[step]]\nop = "migrate"\nvm = "vm1"\nto = "h1"\nfunctions = { "00:03.0" = '
        '"99:00.0" }\n',
        "step[0].functions",
    ),
    (HEADER + '[[step]]\nop = "dump"\nexpect = 3\n', "step[0].expect"),
    (
        HEADER + '[[step]]\nop = "dma"\nvm = "vm1"\ndevice = "00:03.0"\nvpasid = 1\naddr = 0\n'
        "write = 1\n",
        "step[0].write",
    ),
    ("[[host]\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "field"), INVALID)
def test_invalid_file_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, field: str
) -> None:
    rc, lines, err = _run(tmp_path, text + '\n[[step]]\nop = "dump"\n', capsys)
    assert rc == 2
    assert lines == []  # no step ran
    assert field in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "/nonexistent/x.toml"]) == 2
    assert "x.toml" in capsys.readouterr().err


def test_failed_steps_report_errors_and_runner_continues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, lines, _ = _run(
        tmp_path,
        HEADER
        + """
[[step]]
op = "unbind"
vm = "vm1"
device = "00:03.0"
vpasid = 5
expect = { ok = false, error = { kind = "not-found" } }
[[step]]
op = "unmap"
vm = "vm1"
vpasid = 5
va = 0
size = 0x1000
expect = { error = "not-found" }
[[step]]
op = "enqcmd"
vm = "vm1"
device = "00:03.0"
vpasid = 5
expect = { error = "invalid" }
[[step]]
op = "map"
vm = "vm1"
vpasid = 5
va = 0x200000
gpa = 0x200000
size = 0x200000
[[step]]
op = "unmap"
vm = "vm1"
vpasid = 5
va = 0x200000
size = 0x1000
expect = { ok = false, error = "invalid" }
[[step]]
op = "migrate"
vm = "vm1"
to = "h1"
functions = {}
expect = { error = "invalid" }
""",
        capsys,
    )
    assert rc == 0 and lines[-1] == "scenario: 6 steps, 5 expectations met, 0 failed"


def test_expect_matching_rules() -> None:
    result = {
        "ok": False,
        "error": {"kind": "pasid-conflict", "message": "m"},
        "gpa": "0x10",
        "fault": {"reason": 0x59, "name": "pasid-entry-p", "vpasid": 5},
    }
    assert check_expect({"ok": False, "error": "pasid-conflict"}, result) == {}
    assert check_expect({"gpa": 0x10, "fault": {"reason": 0x59}}, result) == {}
    assert check_expect({"fault": True, "hpa": False}, result) == {}
    assert check_expect({"fault": {"name": "pasid-entry-p"}}, result) == {}
    assert set(check_expect({"ok": True, "gpa": "0x11", "x": 1}, result)) == {"ok", "gpa", "x"}


def test_parse_size() -> None:
    assert parse_size("64M", "m") == 64 << 20 and parse_size("1G", "m") == 1 << 30
    assert parse_size("4096K", "m") == 4 << 20 and parse_size(8 << 20, "m") == 8 << 20
    for bad in ("1K", "3.5M", True, "64X"):
        with pytest.raises(ScenarioError):
            parse_size(bad, "m")


def test_defaults() -> None:
    s = parse_scenario({"host": [{"name": "h"}], "vm": [{"name": "v", "host": "h"}]})
    assert s.hosts[0].allocation == "per-device" and s.hosts[0].pasid_bits == 20
    assert s.vms[0].memory == 64 << 20
