"""`vioasid walk`, `dump` and `example-image` through main(argv) and a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vioasid.cli import main
from vioasid.model.example import EXAMPLES, build_example

CLI = "import sys; from vioasid.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("img") / "example.img"
    mem, rtaddr = build_example()
    path.write_bytes(bytes(mem.regions[0].buf))
    return path, rtaddr


def walk(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    rc = main(["walk", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else {}), err


def test_walk_translated(image: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    path, rt = image
    rc, out, _ = walk(
        capsys, "--memory", str(path), "--rtaddr", hex(rt), "--bdf", "00:03.0", "--addr", "0x1234"
    )
    assert rc == 0
    assert out["translated"] is True and out["address"] == "0x201234"
    assert out["page_size"] == 4096 and out["pgtt"] == "first-stage" and out["did"] == 1
    assert out["write"] is True


@pytest.mark.parametrize(
    ("extra", "pgtt", "address"),
    [
        (["--addr", "0x100040", "--pasid", "5"], "second-stage", "0x300040"),
        (["--addr", "0x345678", "--pasid", "9"], "pass-through", "0x345678"),
        (["--addr", "0x2000", "--pasid", "12"], "nested", "0x602000"),
        (["--addr", "1073746484"], "first-stage", "0x401234"),  # decimal address
    ],
)
def test_walk_modes(
    image: tuple[Path, int],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    pgtt: str,
    address: str,
) -> None:
    path, rt = image
    rc, out, _ = walk(
        capsys, "--memory", str(path), "--rtaddr", str(rt), "--bdf", "00:03.0", *extra
    )
    assert rc == 0 and out["pgtt"] == pgtt and out["address"] == address


def test_walk_fault(image: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    path, rt = image
    on = ("--memory", str(path), "--rtaddr", hex(rt), "--bdf", "00:03.0")
    rc, out, _ = walk(capsys, *on, "--addr", "0x40001234", "--write")
    assert rc == 0 and out["translated"] is False
    fault = out["fault"]
    assert isinstance(fault, dict) and fault["reason"] == 0x85 and fault["name"] == "sm-write"
    rc, out, _ = walk(capsys, *on, "--addr", "0x1000", "--supervisor")
    assert rc == 0 and out["fault"]["reason"] == 0x5D  # type: ignore[index]


@pytest.mark.parametrize(
    "argv",
    [
        ["--bdf", "00:33.0", "--addr", "0"],
        ["--bdf", "zz", "--addr", "0"],
        ["--bdf", "00:03.0", "--addr", "nope"],
        ["--bdf", "00:03.0", "--addr", "0", "--pasid", "0x100000"],
        ["--bdf", "00:03.0", "--addr", str(1 << 64)],
    ],
)
def test_walk_usage_errors(
    image: tuple[Path, int], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path, rt = image
    rc, out, err = walk(capsys, "--memory", str(path), "--rtaddr", hex(rt), *argv)
    assert rc == 2 and out == {}
    assert len(err.strip().splitlines()) == 1 and err.startswith("vioasid walk:")


def test_walk_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = walk(
        capsys,
        "--memory",
        str(tmp_path / "nope"),
        "--rtaddr",
        "0x400",
        "--bdf",
        "00:03.0",
        "--addr",
        "0",
    )
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_every_example_agrees(image: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    path, rt = image
    for ex in EXAMPLES:
        argv = ["--memory", str(path), "--rtaddr", hex(rt), "--bdf", ex.bdf, "--addr", hex(ex.addr)]
        if ex.pasid is not None:
            argv += ["--pasid", str(ex.pasid)]
        if ex.write:
            argv.append("--write")
        rc, out, _ = walk(capsys, *argv)
        assert rc == 0
        if "fault 0x" in ex.note:
            code = int(ex.note.rsplit("0x", 1)[1], 16)
            assert out["translated"] is False and out["fault"]["reason"] == code  # type: ignore[index]
        else:
            assert out["translated"] is True, (ex, out)


def test_dump_json_and_table(image: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    path, rt = image
    assert main(["dump", "--memory", str(path), "--rtaddr", hex(rt), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "scalable" and not d["truncated"]
    devs = {x["bdf"]: x for x in d["devices"]}
    assert set(devs) == {"00:03.0", "00:04.0", "00:10.0"}
    pasids = {p["pasid"]: p for p in devs["00:03.0"]["pasids"]}
    assert {k: v["pgtt"] for k, v in pasids.items()} == {
        0: "first-stage",
        5: "second-stage",
        9: "pass-through",
        12: "nested",
    }
    assert pasids[0]["did"] == 1
    assert main(["dump", "--memory", str(path), "--rtaddr", hex(rt)]) == 0
    text = capsys.readouterr().out
    assert "00:03.0  12" in text and "nested" in text


def _vioasid(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``vioasid ARGV...`` in a child process (the real entry point, exit status and streams)."""
    return subprocess.run(
        [sys.executable, "-c", CLI, *argv], capture_output=True, text=True, check=check
    )


def test_example_image_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "ex.img"
    p = _vioasid("example-image", str(out), "--json", check=True)
    info = json.loads(p.stdout)
    assert out.stat().st_size == info["size"] == 8 << 20
    first = info["requests"][0]
    p = _vioasid(
        "walk", "--memory", str(out), "--rtaddr", info["rtaddr"],
        "--bdf", first["bdf"], "--addr", first["addr"],
    )  # fmt: skip
    assert p.returncode == 0 and json.loads(p.stdout)["address"] == "0x201234"
    p = _vioasid("walk", "--memory", str(out), "--rtaddr", "x", "--bdf", "00:03.0", "--addr", "0")
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1


def test_dump_legacy_and_example_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vioasid.model.guest_driver import GuestIommuDriver, PageAllocator, SecondStagePageTable
    from vioasid.model.memory import GuestMemory

    mem = GuestMemory.from_bytes(1 << 20)
    alloc = PageAllocator(mem, 0x80000, 0x80000)
    drv = GuestIommuDriver(mem, alloc, scalable=False)
    ss = SecondStagePageTable(mem, alloc, levels=3)
    ss.map(0x1000, 0x5000, 0x1000)
    drv.set_legacy_context(0x18, did=3, ssptptr=ss.root, aw=1)
    path = tmp_path / "legacy.img"
    path.write_bytes(bytes(mem.regions[0].buf))
    assert main(["dump", "--memory", str(path), "--rtaddr", hex(drv.rtaddr), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "legacy"
    assert d["devices"] == [
        {
            "bdf": "00:03.0",
            "sid": 0x18,
            "tt": "multi-level",
            "did": 3,
            "aw": 1,
            "ssptptr": hex(ss.root),
            "fpd": False,
        }
    ]
    rc, out, _ = walk(
        capsys,
        "--memory",
        str(path),
        "--rtaddr",
        hex(drv.rtaddr),
        "--bdf",
        "00:03.0",
        "--addr",
        "0x1008",
    )
    assert rc == 0 and out["address"] == "0x5008" and out["mode"] == "legacy"
    assert main(["example-image", str(tmp_path / "ex.img")]) == 0
    text = capsys.readouterr().out
    assert "rtaddr 0x" in text and "vioasid walk --memory" in text
