"""Proxmox VE ``qemu-server`` config (``/etc/pve/qemu-server/<vmid>.conf``).

With a ``vmid``, volumes are named the way a Proxmox *directory* storage names them,
``<storage>:<vmid>/<file>`` with the file at ``<storage path>/images/<vmid>/<file>`` (files
named ``vm-<vmid>-disk-<n>.<ext>``, as ``qm`` allocates them), and the config is ``<vmid>.conf``:
copying the files there makes a VM Proxmox starts.  ``vmferry migrate`` names its outputs so.
Without one (``vm convert``, whose disks are converted separately), volumes are written as
``<storage>:<file>`` and the disks still have to be imported (``qm disk import``).  Proxmox has
one SCSI controller model per VM (``scsihw``), which translation ensures.
"""

from __future__ import annotations

import re

from vmferry.vm.model import Disk, VmModel

_SCSIHW = {
    "virtio-scsi": "virtio-scsi-pci",
    "pvscsi": "pvscsi",
    "lsi53c895a": "lsi",
    "megasas": "megasas",
}
_OSTYPE = (
    ("win11", "win11"),
    ("win10", "win10"),
    ("windows2019", "win10"),
    ("windows2016", "win10"),
    ("2k22", "win11"),
    ("2k19", "win10"),
    ("windows7", "win7"),
    ("win7", "win7"),
    ("win", "win10"),
    ("linux", "l26"),
    ("rhel", "l26"),
    ("centos", "l26"),
    ("ubuntu", "l26"),
    ("debian", "l26"),
    ("fedora", "l26"),
    ("sles", "l26"),
    ("photon", "l26"),
    ("l26", "l26"),
)


def proxmox_name(name: str) -> str:
    """Proxmox VM names must be DNS names: letters, digits, '-' and '.'."""
    cleaned = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-.") or "vm"
    return cleaned[:63]


def proxmox_bridge(network: str | None) -> str:
    """A Linux bridge name (≤15 chars, no spaces); anything else falls back to ``vmbr0``."""
    if network and re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", network):
        return network
    return "vmbr0"


def _slot_key(d: Disk) -> str:
    if d.controller == "ide":
        return f"ide{d.bus * 2 + d.unit}"
    if d.controller == "sata":
        return f"sata{d.unit}"
    if d.controller == "virtio":
        return f"virtio{d.unit}"
    return f"scsi{d.unit}"


#: the VMID ``vmferry migrate`` writes (Proxmox's first free id on a new host)
DEFAULT_VMID = 100


def proxmox_disk_file(vmid: int, n: int, ext: str) -> str:
    """The file name Proxmox gives disk ``n`` of VM ``vmid`` on a directory storage."""
    return f"vm-{vmid}-disk-{n}.{ext}"


def write_proxmox(vm: VmModel, storage: str = "local", vmid: int | None = None) -> dict[str, str]:
    lines = [f"name: {proxmox_name(vm.name)}", f"memory: {vm.memory_mb}"]
    cores = vm.cores_per_socket or vm.cpus
    lines += [f"cores: {cores}", f"sockets: {vm.cpus // cores}"]
    if vm.cpus != cores * (vm.cpus // cores):
        lines.append(f"vcpus: {vm.cpus}")
    guest = (vm.guest_os or "").lower()
    ostype = next((t for key, t in _OSTYPE if key in guest), "other")
    lines.append(f"ostype: {ostype}")
    if vm.uuid:
        lines.append(f"smbios1: uuid={vm.uuid}")
    if vm.firmware == "uefi":
        lines += [
            "bios: ovmf",
            "machine: q35",
            f"efidisk0: {storage}:1,efitype=4m,pre-enrolled-keys={1 if vm.secure_boot else 0}",
        ]
    scsi = {d.controller_model for d in vm.disks + vm.cdroms if d.controller == "scsi"}
    if scsi:
        lines.append(f"scsihw: {_SCSIHW.get(next(iter(scsi)), 'virtio-scsi-pci')}")
    order = []
    for d in sorted(vm.disks, key=lambda d: d.boot_order or 1 << 20):
        key = _slot_key(d)
        new_gib = -(-(d.size_bytes or 1024**3) // 1024**3)
        where = f"{vmid}/{d.path}" if vmid is not None and d.path else d.path
        vol = f"{storage}:{where}" if d.path else f"{storage}:{new_gib}"
        size = f",size={_size(d.size_bytes)}" if d.size_bytes else ""
        lines.append(f"{key}: {vol}{size}")
        if d.boot_order is not None:
            order.append(key)
    for cd in vm.cdroms:
        key = _slot_key(cd)
        volume = f"{storage}:iso/{cd.path.split('/')[-1]}" if cd.path else "none"
        lines.append(f"{key}: {volume},media=cdrom")
    for i, nic in enumerate(vm.nics):
        mac = f"={nic.mac.upper()}" if nic.mac else ""
        lines.append(f"net{i}: {nic.model}{mac},bridge={proxmox_bridge(nic.network)}")
    for port in vm.serial_ports:
        lines.append(f"serial{port.index}: socket")
    if order:
        lines.append("boot: order=" + ";".join(order))
    name = f"{vmid}.conf" if vmid is not None else f"{proxmox_name(vm.name)}.conf"
    return {name: "\n".join(lines) + "\n"}


def _size(size: int) -> str:
    for unit, mult in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{-(-size // 1024)}K"
