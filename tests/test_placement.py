"""``--pin``: CPU lists, the placement plan, and the threads of a real QEMU (and of this process)
placed by ``pin_vm`` (qemu_glue/qemu/placement.py)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from qemu_support import qemu_or_skip

from qemu_glue.commands.options import pin_option
from qemu_glue.qemu.placement import (
    PinError,
    Placement,
    check_pin,
    format_cpus,
    parse_cpu_list,
    pin_vm,
    plan,
    thread_ids,
    vcpu_thread_ids,
)
from qemu_glue.qemu.process import QemuProcess
from qemu_glue.qemu.vmspec import VmSpec
from vioasid.commands.common import UsageError


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0,2", {0, 2}), ("2-4", {2, 3, 4}), ("1, 3-4 ,7", {1, 3, 4, 7}), ("5-5", {5})],
)
def test_cpu_lists_parse_and_fold_back(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpus(cpus)) == cpus


def test_format_folds_ranges() -> None:
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert format_cpus([]) == ""


@pytest.mark.parametrize("bad", ["", "a", "1-", "-1", "3-1", "1,,2", "0x1", "1.5"])
def test_bad_cpu_lists_are_one_line_errors(bad: str) -> None:
    with pytest.raises(PinError) as e:
        check_pin(bad)
    assert "\n" not in str(e.value)


def test_off_and_auto_are_words_not_lists() -> None:
    assert check_pin("off") == "off"
    assert check_pin("auto") == "auto"
    assert plan("off", {0, 1, 2, 3}) is None


def test_auto_keeps_one_cpu_for_the_rest() -> None:
    assert plan("auto", {0}) is None  # nothing to separate
    assert plan("auto", {0, 1}) == Placement((0,), frozenset({1}))
    assert plan("auto", {4, 6, 9}) == Placement((4,), frozenset({6, 9}))
    p = plan("auto", {0, 1, 2, 3}, vcpus=2)
    assert p == Placement((0, 1), frozenset({2, 3}))
    p = plan("auto", {0, 1, 2}, vcpus=8)  # more vCPUs than CPUs: all but one, round robin
    assert p is not None and p.vcpu_cpus == (0, 1) and p.other_cpus == {2}
    assert [p.vcpu_cpu(i) for i in range(4)] == [0, 1, 0, 1]


def test_explicit_lists_are_checked_against_the_allowed_cpus() -> None:
    assert plan("1", {0, 1, 2}) == Placement((1,), frozenset({0, 2}))
    with pytest.raises(PinError, match="not one this process may use"):
        plan("3", {0, 1})
    with pytest.raises(PinError, match="leaves no CPU"):
        plan("0-1", {0, 1})


def test_pin_option_is_a_usage_error_for_cpus_we_do_not_have() -> None:
    class Args:
        pin = str(max(os.sched_getaffinity(0)) + 1000)

    with pytest.raises(UsageError, match="not one this process may use"):
        pin_option(Args())  # type: ignore[arg-type]


def _two_cpus() -> Placement:
    p = plan("auto", os.sched_getaffinity(0))
    if p is None:
        pytest.skip("needs two CPUs")
    return p


@pytest.mark.asyncio
async def test_pin_vm_places_qemu_threads_and_ours_and_restores_ours() -> None:
    q = qemu_or_skip()
    placement = _two_cpus()
    spec = VmSpec(name="pin", memory_mib=64, iommu=None, extra_args=("-S",),
                  qemu_binary=q.path, qemu_features=q.features)  # fmt: skip
    me = threading.get_native_id()
    before = os.sched_getaffinity(me)
    # a second thread of ours stands in for the IOTLB reader thread
    ready, release = threading.Event(), threading.Event()
    helper_tid: list[int] = []

    def run() -> None:
        helper_tid.append(threading.get_native_id())
        ready.set()
        release.wait(30)

    t = threading.Thread(target=run, name="fake-reader")
    t.start()
    try:
        ready.wait(5)
        async with await QemuProcess.start(spec) as vm:
            qmp = vm.require_qmp()
            pinned = await pin_vm(qmp, vm.pid, placement, readers=helper_tid, own=True)
            vcpus = await vcpu_thread_ids(qmp)
            assert vcpus and set(pinned.vcpu_threads) == set(vcpus)
            for tid in vcpus:
                assert os.sched_getaffinity(tid) == {placement.vcpu_cpus[0]}
            others = [tid for tid in thread_ids(vm.pid) if tid not in vcpus]
            assert others and pinned.qemu_other_threads == len(others)
            for tid in others:
                assert os.sched_getaffinity(tid) == set(placement.other_cpus)
            assert os.sched_getaffinity(helper_tid[0]) == set(placement.vcpu_cpus)
            assert os.sched_getaffinity(me) == set(placement.other_cpus)
            assert pinned.reader_threads == helper_tid
            js = pinned.to_json()
            assert js["vcpu_cpus"] == format_cpus(placement.vcpu_cpus)
            # a thread started while placed inherits the other CPUs; restore() gives it ours back
            late_tid: list[int] = []
            late_go = threading.Event()

            def late() -> None:
                late_tid.append(threading.get_native_id())
                late_go.wait(30)

            t2 = threading.Thread(target=late, name="late")
            t2.start()
            try:
                while not late_tid:
                    await asyncio.sleep(0.001)
                assert os.sched_getaffinity(late_tid[0]) == set(placement.other_cpus)
                pinned.restore()
                assert os.sched_getaffinity(me) == before
                assert os.sched_getaffinity(helper_tid[0]) == before
                assert os.sched_getaffinity(late_tid[0]) == before
            finally:
                late_go.set()
                t2.join(5)
    finally:
        release.set()
        t.join(5)
        os.sched_setaffinity(me, before)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["demo", "--pin", "4096"], "not one this process may use"),
        (["demo", "--pin", "auto", "--seed"], "--seed run several guests"),
        (["demo", "--pin", "auto", "--migrate"], "--migrate and --seed"),
    ],
)
def test_cli_refuses_a_pin_it_cannot_honour_in_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from vioasid import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_cli_rejects_a_malformed_cpu_list(capsys: pytest.CaptureFixture[str]) -> None:
    from vioasid import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["boot", "--kernel", "/nonexistent", "--pin", "7-3"])
    assert exc.value.code == 2
    assert "bad CPU range '7-3'" in capsys.readouterr().err
