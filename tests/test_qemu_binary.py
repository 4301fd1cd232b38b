"""Which QEMU vioasid starts and what it offers: the probe, the order, the one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from qemu_glue.qemu import binary, install
from qemu_glue.qemu.binary import QEMU_10_FEATURES, QemuFeatures, QemuNotFound, choose, probe
from qemu_glue.qemu.process import QemuError, launch
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, VmSpec
from vioasid.cli import main

FAKE = str(Path(__file__).with_name("fake_qemu.py"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VIOASID_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VIOASID_QEMU", raising=False)
    return tmp_path / "cache" / "qemu"


def _fake_copy(tmp_path: Path, version: str, name: str = "qemu") -> Path:
    """A fake QEMU of a given version (a shell wrapper around tests/fake_qemu.py)."""
    p = tmp_path / name
    p.write_text(f'#!/bin/sh\nFAKE_QEMU_VERSION={version} exec "{FAKE}" "$@"\n')
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def test_probe_reads_10_and_11_property_names(tmp_path: Path, cache: Path) -> None:
    f10 = probe(str(_fake_copy(tmp_path, "10.0.2", "q10")))
    f11 = probe(str(_fake_copy(tmp_path, "11.1.3", "q11")))
    assert (f10.version, f10.scalable_prop, f10.fsts_prop, f10.vfio_user) == (
        "10.0.2", "x-scalable-mode", "x-flts", False,
    )  # fmt: skip
    assert (f11.version, f11.scalable_prop, f11.fsts_prop, f11.vfio_user) == (
        "11.1.3", "scalable-mode", "fsts", True,
    )  # fmt: skip
    assert f11.has_iommu("pasid-bits") and not f10.has_iommu("pasid-bits")


def test_probe_is_cached_by_path_and_mtime(tmp_path: Path, cache: Path) -> None:
    q = _fake_copy(tmp_path, "10.0.2")
    probe(str(q))
    entries = json.loads((cache / binary.PROBE_FILE).read_text())
    assert len(entries) == 1
    # The same file answers from the cache even if it could no longer run ...
    q.write_text(q.read_text().replace("10.0.2", "11.1.3"))
    os.utime(q, ns=(1, 1))  # ... but a changed file (new mtime) is probed again.
    assert probe(str(q)).version == "11.1.3"
    assert len(json.loads((cache / binary.PROBE_FILE).read_text())) == 2


def test_argv_uses_the_probed_names() -> None:
    f11 = QemuFeatures("11.1.3", ("fsts", "pasid-bits", "scalable-mode", "aw-bits"), ())
    arg = IommuSpec(mode=IommuMode.SCALABLE_FS, pasid_bits=20).device_arg(f11)
    assert "scalable-mode=on" in arg and "fsts=on" in arg and "pasid-bits=20" in arg
    assert "x-" not in arg
    arg10 = IommuSpec(mode=IommuMode.SCALABLE_FS).device_arg(QEMU_10_FEATURES)
    assert "x-scalable-mode=on" in arg10 and "x-flts=on" in arg10


def test_a_missing_feature_is_one_line_naming_it_and_the_version() -> None:
    with pytest.raises(QemuNotFound) as exc:
        IommuSpec(mode=IommuMode.SCALABLE_SS, pasid_bits=20).device_arg(QEMU_10_FEATURES)
    msg = str(exc.value)
    assert "pasid-bits" in msg and "11.1" in msg and "10.0" in msg and "\n" not in msg


@pytest.mark.asyncio
async def test_launch_refuses_before_starting_qemu(tmp_path: Path, cache: Path) -> None:
    spec = VmSpec(
        name="fake",
        qemu_binary=str(_fake_copy(tmp_path, "10.0.2")),
        iommu=IommuSpec(pasid_bits=20),
        ram_path=tmp_path / "ram",
    )
    with pytest.raises(QemuError, match="pasid-bits"):
        async with launch(spec):
            pass


def test_order_flag_env_cache_system(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = _fake_copy(tmp_path, "10.0.2", "flag")
    env = _fake_copy(tmp_path, "11.1.3", "env")
    # A complete private install in the cache.
    root = cache / "11.1.3"
    (root / "bin").mkdir(parents=True)
    shutil.copy(_fake_copy(tmp_path, "11.1.3", "cached"), root / "bin" / install.WRAPPER)
    (root / install.MARKER).write_text(json.dumps({"version": "11.1.3", "debian_version": "x"}))
    system_dir = tmp_path / "sys"
    system_dir.mkdir()
    shutil.copy(_fake_copy(tmp_path, "10.0.2", "s"), system_dir / binary.SYSTEM_NAME)
    monkeypatch.setenv("PATH", f"{system_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("VIOASID_QEMU", str(env))
    assert choose(str(flag)).source == "flag"
    assert choose().source == "env"
    monkeypatch.delenv("VIOASID_QEMU")
    c = choose()
    assert (c.source, c.version) == ("cache", "11.1.3")
    (root / install.MARKER).unlink()  # an incomplete install is never used
    c = choose()
    assert (c.source, c.version, c.path) == (
        "system", "10.0.2", str(system_dir / binary.SYSTEM_NAME),
    )  # fmt: skip


def test_old_system_qemu_is_refused(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "sys"
    d.mkdir()
    shutil.copy(_fake_copy(tmp_path, "7.2.0", "s"), d / binary.SYSTEM_NAME)
    monkeypatch.setenv("PATH", f"{d}:{os.environ['PATH']}")
    with pytest.raises(QemuNotFound, match=r"7\.2\.0.*>= 10\.0"):
        choose()


def test_interrupted_install_leaves_nothing_usable(tmp_path: Path, cache: Path) -> None:
    partial = cache / "11.1.3.partial-abc"
    (partial / "bin").mkdir(parents=True)
    (partial / "bin" / install.WRAPPER).write_text("#!/bin/sh\nexit 1\n")
    half = cache / "11.1.3"
    (half / "bin").mkdir(parents=True)
    (half / "bin" / install.WRAPPER).write_text("#!/bin/sh\nexit 1\n")  # no marker
    assert install.installed(cache) == []
    assert install.newest_installed(cache) is None
    install._clean_partials(cache)
    assert not partial.exists()


def test_qemu_path_cli(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = _fake_copy(tmp_path, "11.1.3")
    assert main(["qemu", "path", "--json", "--qemu", str(q)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "11.1.3" and out["source"] == "flag"
    assert out["features"]["fsts"] == "fsts" and out["features"]["vfio-user-pci"] is True
    assert main(["qemu", "path", "--qemu", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err


def test_wrapper_runs_the_unpacked_binary_through_its_loader(tmp_path: Path) -> None:
    text = install._wrapper_text(tmp_path / "root")
    assert "ld-linux-x86-64.so.2" in text and "--library-path" in text
    assert "QEMU_MODULE_DIR=" in text and '-L "' in text and '"$@"' in text


def test_upstream_version() -> None:
    assert install.upstream_version("1:11.1.3+ds-2~bpo13+1") == "11.1.3"
    assert install.version_tuple("11.1.3") >= install.MIN_VERSION > install.version_tuple("10.0")
