"""VmSpec → QEMU argv (fast, no QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_glue.qemu.qmp import parse_query_pci, parse_xp
from qemu_glue.qemu.vmspec import (
    Accel,
    IommuMode,
    IommuSpec,
    RawArgs,
    VhostUserBlk,
    VirtioBlk,
    VmSpec,
    kernel_cmdline,
)

RAM = Path("/dev/shm/t-ram")
QMP = Path("/tmp/t/qmp.sock")


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _iommu(argv: list[str]) -> str:
    (dev,) = [d for d in _opt(argv, "-device") if d.startswith("intel-iommu")]
    return dev


def test_defaults_shared_ram_tcg_qmp() -> None:
    argv = VmSpec(ram_path=RAM, qmp_socket=QMP).argv()
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-accel") == ["tcg"]
    assert _opt(argv, "-machine") == ["q35,memory-backend=mem"]
    assert _opt(argv, "-object") == [
        f"memory-backend-file,id=mem,size=512M,mem-path={RAM},share=on"
    ]
    assert _opt(argv, "-cpu") == ["max"]
    assert _opt(argv, "-qmp") == [f"unix:{QMP},server=on,wait=off"]
    assert _opt(argv, "-serial") == ["stdio"]
    assert "-no-reboot" in argv and "-incoming" not in argv and "-kernel" not in argv


def test_argv_needs_resolved_paths() -> None:
    with pytest.raises(ValueError):
        VmSpec().argv()
    with pytest.raises(ValueError):
        VmSpec(ram_path=RAM, qmp_socket=QMP, initrd=Path("i")).argv()


@pytest.mark.parametrize(
    ("mode", "cm", "expect", "absent"),
    [
        (IommuMode.SCALABLE_SS, False, ["x-scalable-mode=on"], ["x-flts", "caching-mode"]),
        (IommuMode.SCALABLE_FS, False, ["x-scalable-mode=on", "x-flts=on", "aw-bits=48"], []),
        (IommuMode.LEGACY, True, ["caching-mode=on"], ["x-scalable-mode", "x-flts"]),
    ],
)
def test_iommu_modes(mode: IommuMode, cm: bool, expect: list[str], absent: list[str]) -> None:
    spec = VmSpec(ram_path=RAM, qmp_socket=QMP, iommu=IommuSpec(mode=mode, caching_mode=cm))
    props = _iommu(spec.argv()).split(",")
    assert props[0] == "intel-iommu" and "intremap=on" in props
    for e in expect:
        assert e in props
    for a in absent:
        assert not any(p.startswith(a) for p in props)


def test_no_iommu() -> None:
    argv = VmSpec(ram_path=RAM, qmp_socket=QMP, iommu=None).argv()
    assert not any(d.startswith("intel-iommu") for d in _opt(argv, "-device"))


def test_devices_and_boot() -> None:
    spec = VmSpec(
        ram_path=RAM,
        qmp_socket=QMP,
        memory_mib=1024,
        accel=Accel.KVM,
        devices=(
            VirtioBlk(Path("/d.raw"), addr="04.0"),
            VhostUserBlk(Path("/s.sock"), id="vub", num_queues=2),
            RawArgs(("-device", "virtio-rng-pci")),
        ),
        kernel=Path("/k"),
        initrd=Path("/i"),
        append="console=ttyS0",
        incoming_defer=True,
        trace_events=("vtd_dmar_translate", "vtd_inv_*"),
        trace_file=Path("/tr"),
        serial_file=Path("/ser.log"),
    )
    argv = spec.argv()
    assert _opt(argv, "-cpu") == ["host"] and _opt(argv, "-accel") == ["kvm"]
    assert "size=1024M" in _opt(argv, "-object")[0]
    assert _opt(argv, "-drive") == ["file=/d.raw,format=raw,if=none,id=drv-disk0"]
    devs = _opt(argv, "-device")
    assert (
        "virtio-blk-pci,id=disk0,drive=drv-disk0,disable-legacy=on,iommu_platform=on,addr=04.0"
        in devs
    )
    vub = next(d for d in devs if d.startswith("vhost-user-blk-pci"))
    assert "chardev=chr-vub" in vub and "num-queues=2" in vub
    assert "iommu_platform=on" in vub and "disable-legacy=on" in vub
    assert _opt(argv, "-chardev") == ["socket,id=chr-vub,path=/s.sock"]
    assert "virtio-rng-pci" in devs
    assert _opt(argv, "-kernel") == ["/k"] and _opt(argv, "-initrd") == ["/i"]
    assert _opt(argv, "-append") == ["console=ttyS0"]
    assert _opt(argv, "-incoming") == ["defer"]
    assert _opt(argv, "-trace") == ["enable=vtd_dmar_translate", "enable=vtd_inv_*"]
    assert _opt(argv, "-D") == ["/tr"]
    assert _opt(argv, "-serial") == ["file:/ser.log"]


def test_kernel_cmdline() -> None:
    c = kernel_cmdline(IommuMode.SCALABLE_FS, tests=["page", "large"], loop=True)
    assert "intel_iommu=on,sm_on" in c and "iommu.strict=1" in c
    assert "vioasid.tests=page,large" in c and "vioasid.loop=1" in c
    assert "intel_iommu=on,sm_off" in kernel_cmdline(IommuMode.LEGACY, strict=False)
    assert "intel_iommu" not in kernel_cmdline(None)
    assert "no_timer_check" in kernel_cmdline(None).split()  # loaded TCG hosts panic without


def test_parse_xp_and_query_pci() -> None:
    assert parse_xp("00000000fed90020: 0x0000000001a7a400\r\n") == 0x1A7A400
    reply = [
        {
            "bus": 0,
            "devices": [
                {
                    "bus": 0,
                    "slot": 1,
                    "function": 0,
                    "qdev_id": "disk0",
                    "id": {"vendor": 0x1AF4, "device": 0x1042},
                    "class_info": {"class": 0x100, "desc": "SCSI controller"},
                },
                {
                    "bus": 0,
                    "slot": 0x1E,
                    "function": 0,
                    "qdev_id": "br",
                    "id": {"vendor": 0x8086, "device": 0x244E},
                    "class_info": {"class": 0x604},
                    "pci_bridge": {
                        "devices": [{"bus": 1, "slot": 2, "function": 1, "qdev_id": "x", "id": {}}]
                    },
                },
            ],
        }
    ]
    devs = parse_query_pci(reply)
    assert [d.bdf for d in devs] == ["00:01.0", "00:1e.0", "01:02.1"]
    assert devs[0].rid == 0x08 and devs[2].rid == 0x111
