"""The neutral VM model every reader produces and every writer consumes.

A migration needs the machine, not just its disks: firmware, CPUs, memory, where each disk hangs and
which NICs carry which MAC.  Each hypervisor spells these differently, so readers translate *into*
this one model and writers translate *out of* it; nothing else in vmferry needs to know a ``.vmx``
key or a libvirt element.  Whatever a reader sees but cannot express here goes to ``unsupported``
so that a user can see what a conversion would silently lose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Firmware = Literal["bios", "uefi"]
ControllerKind = Literal["ide", "sata", "scsi", "nvme", "virtio", "xen"]

FIRMWARES: tuple[str, ...] = ("bios", "uefi")
CONTROLLER_KINDS: tuple[str, ...] = ("ide", "sata", "scsi", "nvme", "virtio", "xen")


@dataclass
class Disk:
    """One disk or optical drive and the controller slot it occupies.

    ``bus`` is the controller index for SCSI/SATA/NVMe/virtio (``scsi1:3`` → bus 1, unit 3) and the
    channel for IDE (``ide1:0`` → bus 1, unit 0), because that is how every source names the slot
    and what a guest's device name follows.
    """

    path: str | None
    controller: str
    controller_model: str | None = None
    bus: int = 0
    unit: int = 0
    format: str | None = None
    size_bytes: int | None = None
    boot_order: int | None = None
    device: Literal["disk", "cdrom"] = "disk"
    parent: str | None = None
    connected: bool = True  # a CD-ROM with no medium at power-on, or a disconnected drive
    compression: str | None = None  # e.g. "gzip" for an OVF file reference

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "controller": self.controller,
            "controller_model": self.controller_model,
            "bus": self.bus,
            "unit": self.unit,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "boot_order": self.boot_order,
            "device": self.device,
            "parent": self.parent,
            "connected": self.connected,
            "compression": self.compression,
        }


@dataclass
class Nic:
    """A network adapter; the MAC matters because guests bind configuration to it."""

    mac: str | None
    model: str | None
    network: str | None = None
    mac_static: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "model": self.model,
            "network": self.network,
            "mac_static": self.mac_static,
        }


@dataclass
class SerialPort:
    """A serial port; kept because headless Linux guests often log in over it."""

    index: int
    kind: str  # "pty", "file", "pipe", "network", "device", ...
    target: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "target": self.target}


@dataclass
class Snapshot:
    """A snapshot node; ``parent`` is the id of the parent snapshot (None for a root)."""

    id: str
    name: str
    parent: str | None = None
    description: str | None = None
    created: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "parent": self.parent,
            "description": self.description,
            "created": self.created,
        }


@dataclass
class VmModel:
    """A virtual machine as far as vmferry needs to recreate it elsewhere."""

    name: str
    firmware: str = "bios"
    secure_boot: bool = False
    cpus: int = 1
    cores_per_socket: int | None = None
    memory_mb: int = 0
    disks: list[Disk] = field(default_factory=list)
    cdroms: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    serial_ports: list[SerialPort] = field(default_factory=list)
    guest_os: str | None = None
    uuid: str | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    current_snapshot: str | None = None
    unsupported: list[str] = field(default_factory=list)
    source_format: str = ""

    def boot_disk(self) -> Disk | None:
        """The disk the guest boots from: the lowest boot order, else the first disk.

        Sources rarely state it, and when they do not, every hypervisor we read boots the first
        disk of its first controller, which is the order readers list disks in.
        """
        ordered = [d for d in self.disks if d.boot_order is not None]
        if ordered:
            return min(ordered, key=lambda d: d.boot_order or 0)
        return self.disks[0] if self.disks else None

    def snapshot_children(self, parent: str | None) -> list[Snapshot]:
        """The snapshots whose parent is ``parent`` (None → the roots): the tree, walked lazily."""
        return [s for s in self.snapshots if s.parent == parent]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "firmware": self.firmware,
            "secure_boot": self.secure_boot,
            "cpus": self.cpus,
            "cores_per_socket": self.cores_per_socket,
            "memory_mb": self.memory_mb,
            "disks": [d.to_json() for d in self.disks],
            "cdroms": [d.to_json() for d in self.cdroms],
            "nics": [n.to_json() for n in self.nics],
            "serial_ports": [s.to_json() for s in self.serial_ports],
            "guest_os": self.guest_os,
            "uuid": self.uuid,
            "snapshots": [s.to_json() for s in self.snapshots],
            "current_snapshot": self.current_snapshot,
            "unsupported": list(self.unsupported),
            "source_format": self.source_format,
        }


def normalize_mac(mac: str | None) -> str | None:
    """Lower-case, colon-separated MAC, or None when absent/blank/not a MAC.

    Hyper-V writes ``00-15-5D-...`` or ``00155D...``, VirtualBox ``080027...``; writers and
    comparisons need one spelling.
    """
    if not mac:
        return None
    digits = "".join(ch for ch in mac if ch not in ":-. ").lower()
    if len(digits) != 12 or any(ch not in "0123456789abcdef" for ch in digits):
        return None
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))
