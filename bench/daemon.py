"""Daemon benchmark: round-trip time of one ``dma`` and batched translation throughput.

Starts ``vioasid serve`` as a subprocess (its own core), registers a guest whose RAM is a memfd
with a first-stage table for vPASID 5 written by the guest-driver model, binds it, then measures
over the unix socket:

* ``rtt_p50_us`` / ``rtt_p99_us``: one request with one ``dma`` entry, reply awaited, repeated;
* ``dma_batched_per_s``: translations per second, 64 ``dma`` entries per message, one client
  (a few messages in flight);
* ``dma_batched_per_s_4_clients``: the same with four clients at once;
* ``daemon_cpu_per_dma_us``: the daemon process's CPU time (user + system, from /proc) per
  single-``dma`` request, a figure that does not depend on how busy the machine is otherwise;
* ``rtt_p50_us_noisy`` / ``rtt_p99_us_noisy``: the same round trip while a noisy neighbour (a
  process of its own, another VM) floods the daemon: it subscribes to its VM's faults and never
  reads, and sends batches of faulting ``dma`` requests as fast as the daemon takes them
  (reconnecting when the daemon drops it for not reading its replies); next to
  ``rtt_p50_us_idle`` / ``rtt_p99_us_idle`` measured just before, in the same run;
  ``noisy_events_dropped`` is how many events the daemon dropped for it meanwhile.

Every line carries ``load1``, the 1-minute load average when it was measured: on a shared
2-core machine, round trips stretch with the number of runnable processes; and ``loop``, the
event loop both the daemon and this client ran on (``--loop``, default as ``vioasid serve``
picks it: uvloop when installed, the optional ``fast`` extra, else stdlib ``asyncio``; the
targets are for stdlib asyncio).

Prints JSON lines ``{"name": ..., "value": ..., "unit": ...}``. Targets on a 2-core machine:
p50 <= 100 us, >= 200,000 translations/s batched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from vioasid.client import Client, ClientError, DmaRequest, MemoryRegion
from vioasid.daemon import eventloop
from vioasid.formats import wire
from vioasid.formats.pasid import PGTT_FIRST_STAGE
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory

SID = 0x18
DEV = "00:03.0"
VPASID = 5
VA = 0x4000_0000
GPA = 0x10_0000
PAGES = 64
BATCH = 64
GUEST_SIZE = 16 << 20
VIOASID = (sys.executable, "-c", "import sys; from vioasid.cli import main; sys.exit(main())")
LOOP = "asyncio"  # the event loop the daemon and this client run on (--loop)
MEMORY = "memfd"  # how the guest's RAM is handed over (--memory)


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    extra["load1"] = round(os.getloadavg()[0], 2)
    extra["loop"] = LOOP
    extra["memory"] = MEMORY
    print(json.dumps({"name": name, "value": round(value, 1), "unit": unit, **extra}), flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Guest:
    """Guest RAM with vPASID 5 mapping ``PAGES`` pages at VA: a memfd (the daemon seals it
    against shrinking) or, ``plain``, a file in a temporary directory (the daemon checks its
    size before each request instead)."""

    def __init__(self, plain: bool = False) -> None:
        if plain:
            with tempfile.NamedTemporaryFile(prefix="vioasid-bench-", dir="/dev/shm") as f:
                self.fd = os.open(f.name, os.O_RDWR | os.O_CLOEXEC)
        else:
            self.fd = os.memfd_create("vioasid-bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, GUEST_SIZE)
        self.mem = GuestMemory()
        self.mem.add_fd(self.fd, 0, GUEST_SIZE, 0)
        pages = PageAllocator(self.mem, GUEST_SIZE // 2, GUEST_SIZE // 2)
        self.driver = GuestIommuDriver.for_pasid_bits(self.mem, pages, 20)
        self.driver.attach_device(SID)
        table = FirstStagePageTable(self.mem, pages)
        table.map(VA, GPA, PAGES * 4096)
        self.driver.set_pasid_entry(SID, VPASID, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=table.root)


async def setup(client: Client, guest: Guest, name: str, function: str = "3a:00.0") -> int:
    vm = await client.register_vm(name, [MemoryRegion(guest.fd, 0, GUEST_SIZE)])
    await client.attach_device(vm, DEV, function, "vfio-pci")
    await client.set_root_table(vm, guest.driver.rtaddr)
    await client.pasid_entry(vm, DEV, VPASID)
    return vm


def batch_payload() -> bytes:
    return b"".join(
        DmaRequest(DEV, VPASID, VA + (i % PAGES) * 4096 + 8 * i, write=bool(i & 1)).pack()
        for i in range(BATCH)
    )


async def rtt(client: Client, vm: int, n: int) -> list[float]:
    entry = DmaRequest(DEV, VPASID, VA + 0x10).pack()
    out = []
    for _ in range(200):  # warm-up (caches, allocations)
        await client.dma_packed_nowait(vm, 1, entry)
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await client.dma_packed_nowait(vm, 1, entry)
        out.append((clock() - t0) / 1000)
    return out


async def throughput(client: Client, vm: int, seconds: float, depth: int = 4) -> int:
    """Translations completed in ``seconds`` with ``depth`` messages in flight."""
    payload = batch_payload()
    loop = asyncio.get_running_loop()
    done = 0
    end = loop.time() + seconds
    inflight = [client.dma_packed_nowait(vm, BATCH, payload) for _ in range(depth)]
    while loop.time() < end:
        res = await inflight.pop(0)
        if res.count != BATCH or res.results[0] != wire.DmaStatus.OK:
            raise RuntimeError("a benchmark translation failed")
        done += BATCH
        inflight.append(client.dma_packed_nowait(vm, BATCH, payload))
    for fut in inflight:
        await fut
    return done


async def flood(sock: str, batch: int) -> None:
    """The noisy neighbour: its own VM, subscribed to faults, never reads, floods faults."""
    guest = Guest()
    bad = b"".join(DmaRequest(DEV, VPASID, 0x7000_0000 + i * 4096).pack() for i in range(batch))
    while True:
        try:
            c = await Client.connect(sock, timeout=60)
            vm = await setup(c, guest, "noisy", "3b:00.0")
            await c.subscribe(vm)
            msg = (
                wire.DMA_FRAME_S.pack(
                    int(wire.Request.DMA), wire.VERSION, wire.DMA_HEAD_S.size + len(bad), vm, batch
                )
                + bad
            )
            transport = c._transport  # raw from here on: no futures, no reading
            asyncio.get_running_loop().remove_reader(transport.sock.fileno())
            while not transport.closed:
                transport.send(msg)
                await transport.drain()
        except (ClientError, OSError):
            await asyncio.sleep(0.01)


async def noisy(client: Client, vm: int, sock: str, n: int, batch: int) -> tuple[list[float], int]:
    """Round trips while the noisy neighbour (a subprocess) floods; and the events dropped."""
    env = {**os.environ, eventloop.ENV: LOOP}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--flood", sock, "--flood-batch", str(batch), env=env
    )
    try:
        for _ in range(200):  # until the neighbour is registered and flooding
            if "noisy" in (await client.dump())["vms"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        samples = await rtt(client, vm, n)
        doc = await client.dump()
    finally:
        proc.kill()
        await proc.wait()
    return samples, int(doc.get("events_dropped_total", 0))


async def main(args: argparse.Namespace) -> None:
    guest = Guest(plain=args.memory == "file")
    with tempfile.TemporaryDirectory(prefix="vioasid-bench-") as tmp:
        sock = os.path.join(tmp, "d.sock")
        env = {**os.environ, eventloop.ENV: LOOP}  # the daemon runs on the same loop
        proc = await asyncio.create_subprocess_exec(*VIOASID, "serve", "--socket", sock, env=env)
        try:
            client = await Client.connect(sock, timeout=60)
            vm = await setup(client, guest, "bench")
            cpu0 = cpu_seconds(proc.pid)
            samples = await rtt(client, vm, args.requests)
            cpu = (cpu_seconds(proc.pid) - cpu0) / (len(samples) + 200) * 1e6
            q = statistics.quantiles(samples, n=100)
            emit("rtt_p50_us", q[49], "us", requests=len(samples))
            emit("rtt_p99_us", q[98], "us", requests=len(samples))
            emit("daemon_cpu_per_dma_us", cpu, "us", requests=len(samples))

            if args.noisy:
                idle = await rtt(client, vm, args.requests)
                loud, dropped = await noisy(client, vm, sock, args.requests, args.flood_batch)
                qi = statistics.quantiles(idle, n=100)
                qn = statistics.quantiles(loud, n=100)
                extra = {"requests": len(loud), "flood_batch": args.flood_batch}
                emit("rtt_p50_us_idle", qi[49], "us", **extra)
                emit("rtt_p99_us_idle", qi[98], "us", **extra)
                emit("rtt_p50_us_noisy", qn[49], "us", **extra)
                emit("rtt_p99_us_noisy", qn[98], "us", **extra)
                emit("noisy_events_dropped", dropped, "events", **extra)

            start = time.perf_counter()
            n = await throughput(client, vm, args.seconds)
            emit("dma_batched_per_s", n / (time.perf_counter() - start), "1/s", batch=BATCH)

            clients = [client] + [await Client.connect(sock) for _ in range(3)]
            vms = [vm] + [await c.open_vm("bench") for c in clients[1:]]
            start = time.perf_counter()
            counts = await asyncio.gather(
                *(throughput(c, v, args.seconds) for c, v in zip(clients, vms, strict=True))
            )
            rate = sum(counts) / (time.perf_counter() - start)
            emit("dma_batched_per_s_4_clients", rate, "1/s", batch=BATCH, clients=4)
            for c in clients:
                await c.close()
        finally:
            proc.terminate()
            await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="single-dma round trips")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    parser.add_argument(
        "--loop",
        choices=eventloop.CHOICES,
        help="event loop of the daemon and this client (default: $VIOASID_EVENT_LOOP or auto, "
        "as vioasid serve: uvloop when installed, else asyncio)",
    )
    parser.add_argument(
        "--noisy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the round trip next to a noisy neighbour (default on)",
    )
    parser.add_argument(
        "--flood-batch", type=int, default=64, metavar="N", help="faults per noisy request"
    )
    parser.add_argument(
        "--memory",
        choices=["memfd", "file"],
        default="memfd",
        help="guest RAM as a memfd (sealed by the daemon) or a plain file (size-checked by "
        "the daemon before each request)",
    )
    parser.add_argument("--flood", metavar="SOCK", help=argparse.SUPPRESS)  # the neighbour
    args = parser.parse_args()
    MEMORY = args.memory
    LOOP, _ = eventloop.choose(args.loop)
    if args.flood:
        eventloop.run(flood(args.flood, args.flood_batch), LOOP)
    else:
        eventloop.run(main(args), LOOP)
