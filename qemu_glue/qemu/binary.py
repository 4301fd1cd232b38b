"""Which QEMU binary vioasid starts, and what it offers (probed once per binary).

Order (``vioasid qemu path`` prints the choice and why): the ``--qemu PATH`` flag, the
``VIOASID_QEMU`` environment variable, the newest private QEMU >= 11.1 in the cache
(``vioasid qemu install``), then ``qemu-system-x86_64`` on ``PATH`` if it is >= 10.0.

Features are read from the binary itself, never assumed from its version: ``-device
intel-iommu,help`` gives the property names (11.1 renamed ``x-scalable-mode``/``x-flts`` to
``scalable-mode``/``fsts`` and replaced ``x-pasid-mode`` by ``pasid-bits``), ``-device help``
whether ``vfio-user-pci`` exists. The probe result is cached in ``probe.json`` next to the
private installs, keyed by the binary's real path, size and mtime.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qemu_glue.qemu.install import cache_dir, newest_installed, version_tuple

log = logging.getLogger(__name__)

SYSTEM_NAME = "qemu-system-x86_64"
ENV = "VIOASID_QEMU"
MIN_SYSTEM = (10, 0)
PROBE_FILE = "probe.json"
_PROBE_TIMEOUT_S = 30.0


class QemuNotFound(Exception):
    """No usable QEMU, or the chosen one lacks a feature: one line for the user."""


@dataclass(frozen=True)
class QemuFeatures:
    """What one QEMU binary offers, by QEMU's own property names."""

    version: str = "0"
    iommu_props: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def has_iommu(self, prop: str) -> bool:
        return prop in self.iommu_props

    def has_device(self, name: str) -> bool:
        return name in self.devices

    @property
    def scalable_prop(self) -> str | None:
        """``scalable-mode`` (11.1) or ``x-scalable-mode`` (10.0)."""
        return self._first("scalable-mode", "x-scalable-mode")

    @property
    def fsts_prop(self) -> str | None:
        """First-stage translation: ``fsts`` (11.1) or ``x-flts`` (10.0)."""
        return self._first("fsts", "x-flts")

    @property
    def vfio_user(self) -> bool:
        return self.has_device("vfio-user-pci")

    def _first(self, *names: str) -> str | None:
        return next((n for n in names if n in self.iommu_props), None)

    def require(self, what: str, ok: bool, since: str) -> None:
        """A one-line refusal naming the feature and the QEMU version that has it."""
        if not ok:
            raise QemuNotFound(
                f"QEMU {self.version} has no {what} (QEMU {since} has it: "
                "run 'vioasid qemu install' or pass --qemu)"
            )

    def summary(self) -> dict[str, object]:
        return {
            "scalable-mode": self.scalable_prop,
            "fsts": self.fsts_prop,
            "pasid-bits": self.has_iommu("pasid-bits"),
            "caching-mode": self.has_iommu("caching-mode"),
            "vfio-user-pci": self.vfio_user,
            "vhost-user-blk-pci": self.has_device("vhost-user-blk-pci"),
        }


# What QEMU 10.0 offers: used where a QEMU cannot be asked (a fake QEMU in tests).
QEMU_10_FEATURES = QemuFeatures(
    "10.0",
    ("aw-bits", "caching-mode", "device-iotlb", "intremap", "x-flts", "x-scalable-mode"),
    ("vhost-user-blk-pci", "virtio-blk-pci"),
)


@dataclass(frozen=True)
class QemuChoice:
    """The binary vioasid will start, why, and what it offers."""

    path: str
    source: str  # flag | env | cache | system
    features: QemuFeatures = field(default_factory=QemuFeatures)

    @property
    def version(self) -> str:
        return self.features.version

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "path": self.path, "source": self.source}


def _parse_props(text: str) -> tuple[str, ...]:
    props = {m.group(1) for m in re.finditer(r"^\s+([A-Za-z0-9_.-]+)=<", text, re.M)}
    return tuple(sorted(props))


def _parse_devices(text: str) -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r'^name "([^"]+)"', text, re.M))))


def _run(path: str, args: list[str]) -> str:
    try:
        out = subprocess.run(
            [path, *args],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuNotFound(f"cannot run {path}: {exc}") from exc
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise QemuNotFound(f"{path} {' '.join(args)} failed: {err}")
    return out.stdout + out.stderr


def _probe_key(path: str) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _load_probe_cache(file: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def probe(path: str, *, cache: Path | None = None) -> QemuFeatures:
    """Version, intel-iommu properties and device names of one binary (cached by path+mtime)."""
    resolved = shutil.which(path) if os.sep not in path else path
    if resolved is None or not os.path.isfile(resolved):
        raise QemuNotFound(f"QEMU binary {path!r} not found")
    file = cache if cache is not None else cache_dir() / PROBE_FILE
    try:
        key = _probe_key(resolved)
    except OSError as exc:
        raise QemuNotFound(f"cannot stat {resolved}: {exc}") from exc
    entries = _load_probe_cache(file)
    hit = entries.get(key)
    if isinstance(hit, dict):
        try:
            return QemuFeatures(
                str(hit["version"]),
                tuple(str(p) for p in hit["iommu_props"]),  # type: ignore[attr-defined]
                tuple(str(d) for d in hit["devices"]),  # type: ignore[attr-defined]
            )
        except (KeyError, TypeError):
            pass
    first = _run(resolved, ["--version"]).splitlines()[0] if resolved else ""
    m = re.search(r"version (\d+(?:\.\d+)*)", first)
    if not m:
        raise QemuNotFound(f"{resolved} does not look like QEMU ({first[:80]!r})")
    feats = QemuFeatures(
        m.group(1),
        _parse_props(_run(resolved, ["-machine", "q35", "-device", "intel-iommu,help"])),
        _parse_devices(_run(resolved, ["-device", "help"])),
    )
    entries[key] = asdict(feats)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(file)
    except OSError as exc:  # a read-only cache only costs a re-probe next time
        log.debug("cannot write the QEMU probe cache %s: %s", file, exc)
    return feats


def choose(flag: str | None = None) -> QemuChoice:
    """The QEMU to start: flag, ``$VIOASID_QEMU``, the cached 11.1, the system binary."""
    if flag:
        return QemuChoice(flag, "flag", probe(flag))
    env = os.environ.get(ENV)
    if env:
        return QemuChoice(env, "env", probe(env))
    inst = newest_installed()
    if inst is not None:
        return QemuChoice(str(inst.wrapper), "cache", probe(str(inst.wrapper)))
    system = shutil.which(SYSTEM_NAME)
    if system is None:
        raise QemuNotFound(
            f"no QEMU found: run 'vioasid qemu install' (QEMU 11.1) or install "
            f"{SYSTEM_NAME} >= 10.0, or pass --qemu PATH"
        )
    feats = probe(system)
    if version_tuple(feats.version) < MIN_SYSTEM:
        raise QemuNotFound(
            f"{system} is QEMU {feats.version}; vioasid needs >= 10.0 "
            "(run 'vioasid qemu install' for 11.1)"
        )
    return QemuChoice(system, "system", feats)
