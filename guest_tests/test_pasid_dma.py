"""A real QEMU 11.1 guest binds its own vPASIDs on vioasid's PASID DMA functions and DMAs.

One function of each type (dedicated, mdev, translating, enqcmd) over vfio-user; the guest's
``vioasid_dma.ko`` and ``guest_tests/pasid_tests.sh`` (docs/pasid-dma.md) run bind/unbind,
copy/fill/compare with random data at unaligned offsets and multi-page lengths, PASID isolation,
read-only -> write fault with the vPASID, unmapped -> fault, after unbind -> fault, remap then DMA
(50 times), one PASID on two functions, 100 PASIDs on one function, batches, every function.
Each result is checked in the guest (its own buffer reads) and by the host here: every guest bind
is a vioasid bind of that vPASID on that function, every fault the guest saw is one vioasid
recorded with the same vPASID, address, direction and reason, the engine's invariants hold and
nothing stays bound after the guest is gone. Needs QEMU 11.1 (vfio-user-pci); no timed asserts.
"""

from __future__ import annotations

import json

import pytest

from images.build import GuestImage
from qemu_glue.pasid_guest import run_pasid_guest
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.qemu.vmspec import IommuMode

pytestmark = pytest.mark.guest


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [IommuMode.SCALABLE_FS, IommuMode.SCALABLE_SS])
async def test_guest_pasid_dma(
    pasid_image: GuestImage, pasid_qemu: QemuChoice, mode: IommuMode
) -> None:
    image = pasid_image
    run = await run_pasid_guest(image.kernel, image.initrd, mode=mode, qemu=pasid_qemu)
    summary = run.to_json()
    print(json.dumps(summary))
    assert run.done is not None, run.console_tail
    assert not run.failed, run.failed
    names = {t["name"] for t in run.tests if t.get("result") == "pass"}
    assert {
        "bind-unbind", "copy", "fill", "compare", "isolation", "ro-write-fault",
        "unmapped-fault", "unbind-fault", "remap", "shared-pasid", "many-pasids", "batch",
        "every-function",
    } <= names  # fmt: skip
    assert run.binds and summary["bindings"], "no PASID was bound"
    assert not run.host_errors, run.host_errors
    assert run.guest_faults() and summary["faults_host"] >= summary["faults_expected"]
    assert not run.invariants and run.bound_at_exit == 0
    assert summary["jobs"]["ok"] > 100
    fns = {f["type"]: f for f in summary["functions"]}
    assert set(fns) == {"dedicated", "mdev", "translating", "enqcmd"}
    assert all(f["pasid_enabled"] and f["jobs"]["ok"] > 0 for f in fns.values()), fns
