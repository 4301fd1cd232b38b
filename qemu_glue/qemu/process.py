"""Launch and supervise one QEMU process with asyncio.

:class:`QemuProcess` starts QEMU from a :class:`~qemu_glue.qemu.vmspec.VmSpec`, captures the serial
console line by line (history, async iteration, callbacks, optional live echo), connects QMP,
and on every exit path (``async with``) shuts QEMU down, kills it if it will not go, and removes
the temporary files it created (QMP socket, shared RAM file).

QEMU never outlives its launcher: :meth:`QemuProcess.close` ends with SIGKILL and a bounded reap
whatever happened before (an error, a cancelled close, a QEMU ignoring ``quit`` and SIGTERM), and
on Linux QEMU is started with ``PR_SET_PDEATHSIG`` so it is killed even if this process dies
without running any cleanup (SIGKILL, a CI timeout). Waits use ``asyncio.timeout``, not
``asyncio.wait_for`` (which on Python 3.11 can drop a cancellation; see :mod:`qemu_glue.qemu.qmp`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

from qemu_glue.qemu.binary import QemuNotFound, choose, probe
from qemu_glue.qemu.qmp import Qmp, QmpError
from qemu_glue.qemu.vmspec import DEFAULT_SHM_DIR, VmSpec

log = logging.getLogger(__name__)

ConsoleCallback = Callable[[str], None]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
READER_DRAIN_S = 2.0  # after exit, for the console/stderr readers to reach EOF
KILL_REAP_TIMEOUT_S = 10.0  # after SIGKILL: only a process stuck in the kernel takes longer


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGKILL when this process dies (Linux only).

    The kernel sends the signal when the *thread* that forked exits: here the event loop's
    thread, which outlives every ``launch()`` block run on it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class QemuError(Exception):
    """QEMU failed to start, exited unexpectedly, or a wait on it timed out."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message + (f"\n{stderr.strip()}" if stderr.strip() else ""))
        self.stderr = stderr


@dataclasses.dataclass(frozen=True)
class ConsoleLine:
    """One serial console line and when it arrived (seconds since QEMU started)."""

    t: float
    text: str


def resolve_qemu(spec: VmSpec) -> VmSpec:
    """Fill in the binary (``choose()``: env, cache, system) and its probed features."""
    if spec.qemu_binary is None:
        c = choose()
        return dataclasses.replace(spec, qemu_binary=c.path, qemu_features=c.features)
    if spec.qemu_features is None:
        return dataclasses.replace(spec, qemu_features=probe(spec.qemu_binary))
    return spec


class QemuProcess:
    """A running QEMU. Create with :meth:`start` (or ``async with QemuProcess.start(...)``)."""

    def __init__(
        self,
        spec: VmSpec,
        proc: asyncio.subprocess.Process,
        tmpdir: Path,
        owned_files: list[Path],
        echo: TextIO | None,
    ) -> None:
        self.spec = spec
        self.proc = proc
        self.started_at = time.monotonic()
        self.console: list[ConsoleLine] = []
        self.qmp: Qmp | None = None
        self._tmpdir = tmpdir
        self._owned_files = owned_files
        self._echo = echo
        self._callbacks: list[ConsoleCallback] = []
        self._waiters: list[asyncio.Queue[ConsoleLine | None]] = []
        self._stderr: list[str] = []
        self._console_done = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.shutdown_timeout = 3.0  # per step of close(): quit, SIGTERM, then SIGKILL

    # ----- construction -----

    @classmethod
    async def start(
        cls,
        spec: VmSpec,
        *,
        echo: bool | TextIO = False,
        connect_qmp: bool = True,
        qmp_timeout: float = 10.0,
        stdin_inherit: bool = False,
    ) -> QemuProcess:
        """Start QEMU. Missing ``ram_path``/``qmp_socket`` get temp paths removed on exit.

        ``echo`` shows the console live (True: stderr, or a given stream). ``stdin_inherit``
        gives QEMU this process's stdin (interactive console, serial on stdio).
        """
        tmpdir = Path(tempfile.mkdtemp(prefix=f"vioasid-{spec.name}-"))
        owned: list[Path] = []
        if spec.qmp_socket is None:
            spec = dataclasses.replace(spec, qmp_socket=tmpdir / "qmp.sock")
        if spec.ram_path is None:
            shm = DEFAULT_SHM_DIR if DEFAULT_SHM_DIR.is_dir() else tmpdir
            ram = shm / f"{tmpdir.name}-ram"
            owned.append(ram)
            spec = dataclasses.replace(spec, ram_path=ram)
        try:
            spec = resolve_qemu(spec)
            argv = spec.argv()
        except QemuNotFound as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise QemuError(str(exc)) from None
        log.info("starting %s", " ".join(argv))
        binary = shutil.which(argv[0])
        if binary is None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise QemuError(f"{argv[0]} not found: install qemu-system-x86 (QEMU >= 10.0)")
        try:
            proc = await asyncio.create_subprocess_exec(
                binary,
                *argv[1:],
                stdin=None if stdin_inherit else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=not stdin_inherit,
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise QemuError(f"cannot start {binary}: {exc}") from exc
        stream: TextIO | None = sys.stderr if echo is True else (echo or None)
        self = cls(spec, proc, tmpdir, owned, stream)
        self._tasks.append(asyncio.create_task(self._read_console()))
        self._tasks.append(asyncio.create_task(self._read_stderr()))
        if connect_qmp:
            try:
                self.qmp = await Qmp.connect(
                    spec.qmp_socket or "",
                    timeout=qmp_timeout,
                    is_alive=lambda: proc.returncode is None,
                )
            except BaseException as exc:
                await self.close()
                if isinstance(exc, QmpError):
                    raise QemuError(f"QEMU did not come up: {exc}", self.stderr) from exc
                raise
        return self

    # ----- async context manager -----

    async def __aenter__(self) -> QemuProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----- state -----

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    @property
    def stderr(self) -> str:
        """QEMU's stderr so far."""
        return "".join(self._stderr)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def require_qmp(self) -> Qmp:
        if self.qmp is None:
            raise QemuError("QMP is not connected")
        return self.qmp

    # ----- console -----

    def on_console(self, callback: ConsoleCallback) -> Callable[[], None]:
        """Call ``callback(line)`` for every new console line; returns an unsubscribe function."""
        self._callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    async def console_lines(self, from_start: bool = True) -> AsyncIterator[ConsoleLine]:
        """Console lines (history first if ``from_start``), ending when QEMU closes stdout."""
        q: asyncio.Queue[ConsoleLine | None] = asyncio.Queue()
        backlog = list(self.console) if from_start else []
        self._waiters.append(q)
        try:
            for line in backlog:
                yield line
            if self._console_done:
                return
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(q)

    async def wait_console(
        self, pattern: str | re.Pattern[str], timeout: float, from_start: bool = True
    ) -> re.Match[str]:
        """Wait for a console line matching ``pattern`` (``re.search``)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern

        async def scan() -> re.Match[str]:
            async for line in self.console_lines(from_start):
                m = rx.search(line.text)
                if m:
                    return m
            raise QemuError(
                f"QEMU exited (rc={self.returncode}) before console matched {rx.pattern!r}",
                self.stderr,
            )

        try:
            async with asyncio.timeout(timeout):
                return await scan()
        except TimeoutError:
            raise QemuError(f"console did not match {rx.pattern!r} within {timeout:.1f}s") from None

    async def _read_console(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                raw = await read_line(self.proc.stdout)
                if not raw:
                    break
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                line = ConsoleLine(self.elapsed(), text)
                self.console.append(line)
                if self._echo is not None:
                    self._echo.write(text + "\n")
                    self._echo.flush()
                for cb in list(self._callbacks):
                    try:
                        cb(text)
                    except Exception:
                        log.exception("console callback failed")
                for q in self._waiters:
                    q.put_nowait(line)
        finally:
            self._console_done = True
            for q in self._waiters:
                q.put_nowait(None)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            raw = await read_line(self.proc.stderr)
            if not raw:
                return
            text = raw.decode("utf-8", "replace")
            self._stderr.append(text)
            log.debug("qemu stderr: %s", text.rstrip())

    # ----- lifecycle -----

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit (e.g. the guest powered off); its exit status."""
        try:
            async with asyncio.timeout(timeout):
                rc = await self.proc.wait()
        except TimeoutError:
            raise QemuError(f"QEMU still running after {timeout:.1f}s") from None
        await self._drain_readers()
        return rc

    async def _drain_readers(self) -> None:
        """Let the console/stderr readers take in QEMU's last output (at most 2 s)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)  # a cancellation of ours propagates

    async def shutdown(self, timeout: float = 5.0, powerdown: bool = False) -> int:
        """Stop QEMU: ACPI powerdown (if ``powerdown``) then QMP ``quit``, SIGTERM, SIGKILL."""
        if self.running and self.qmp is not None:
            if powerdown:
                with contextlib.suppress(QmpError):
                    await self.qmp.execute("system_powerdown", timeout=2.0)
                with contextlib.suppress(QemuError):
                    return await self.wait(timeout)
            with contextlib.suppress(QmpError):
                await self.qmp.execute("quit", timeout=2.0)
            with contextlib.suppress(QemuError):
                return await self.wait(timeout)
        if self.running:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(QemuError):
                return await self.wait(timeout)
        return await self.kill()

    async def kill(self) -> int:
        """SIGKILL QEMU and reap it."""
        if self.running:
            self._signal(signal.SIGKILL)
        return await self.wait(10.0)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def close(self) -> None:
        """Shut down (gracefully if possible), close QMP, remove temp files. Idempotent.

        On every path (shutdown raised, this call was cancelled, QEMU ignored ``quit`` and
        SIGTERM) QEMU is SIGKILLed if it still runs and reaped before the files are removed;
        a cancellation interrupts the graceful steps and goes straight to SIGKILL.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self.running:
                await self.shutdown(timeout=self.shutdown_timeout)
        finally:
            try:
                await self._kill_and_reap()
            finally:
                if self.qmp is not None:
                    await self.qmp.close()
                # QEMU is gone: let the readers take its last words (an early "bad option"
                # is only on stderr) before they are cancelled; the pipes end at EOF.
                pending = [t for t in self._tasks if not t.done()]
                if pending and not self.running:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait(pending, timeout=READER_DRAIN_S)
                for t in self._tasks:
                    if not t.done():
                        t.cancel()
                    elif not t.cancelled() and (err := t.exception()) is not None:
                        log.warning("QEMU output reader failed: %r", err)
                for f in self._owned_files:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f)
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _kill_and_reap(self) -> None:
        """SIGKILL QEMU if it still runs and wait (bounded) until it is reaped."""
        if not self.running:
            return
        log.warning("QEMU pid %d still running at close: SIGKILL", self.pid)
        self._signal(signal.SIGKILL)
        reaped = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({reaped}, timeout=KILL_REAP_TIMEOUT_S)
        finally:
            reaped.cancel()
        if self.running:
            log.error("QEMU pid %d not reaped %.0fs after SIGKILL", self.pid, KILL_REAP_TIMEOUT_S)


@contextlib.asynccontextmanager
async def launch(
    spec: VmSpec,
    *,
    echo: bool | TextIO = False,
    connect_qmp: bool = True,
    qmp_timeout: float = 10.0,
    stdin_inherit: bool = False,
) -> AsyncIterator[QemuProcess]:
    """``async with launch(spec) as vm:`` — start QEMU; always stopped and cleaned up after."""
    vm = await QemuProcess.start(
        spec,
        echo=echo,
        connect_qmp=connect_qmp,
        qmp_timeout=qmp_timeout,
        stdin_inherit=stdin_inherit,
    )
    try:
        yield vm
    finally:
        await vm.close()


MAX_LINE = 1 << 20
"""A console line longer than this is handed on in pieces of this size."""


async def read_line(stream: asyncio.StreamReader, max_line: int = MAX_LINE) -> bytes:
    """One line of ``stream`` with its newline, of any length (``StreamReader.readline`` stops
    the reader with ``ValueError`` past its 64 KiB limit); a longer line than ``max_line``
    comes in ``max_line`` pieces. ``b""`` at end of file."""
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return b"".join(parts) + exc.partial
        except asyncio.LimitOverrunError as exc:
            chunk = await stream.read(max(1, min(exc.consumed, max_line - size)))
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            size += len(chunk)
            if size >= max_line:
                return b"".join(parts)
            continue
        if not parts:
            return chunk
        parts.append(chunk)
        return b"".join(parts)
