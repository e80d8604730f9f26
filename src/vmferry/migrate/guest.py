"""The guest inside the source disks: found, planned and repaired through an overlay.

The guest is looked for on the boot disk first, then on the other disks (a root on a second disk
with /boot on the first is rare but legal); fixes go only to the disk that holds the root, which
is the disk whose filesystems the rules read.  Everything is written into a copy-on-write
:class:`~vmferry.guest.overlay.Overlay` over the read-only source chain; the pipeline streams the
overlay into the output, so the source never sees a write.

Windows: vmferry's repair rules are Linux-only.  A Windows guest is recognised by its NTFS
(or BitLocker) partitions or the config's guest OS id, so preflight can say so instead of
"no Linux root found".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmferry.chain import Chain
from vmferry.errors import GuestError, VmferryError
from vmferry.guest.overlay import Overlay, Slice
from vmferry.guest.partitions import read_partition_table

NTFS_OEM = b"NTFS    "
BITLOCKER_OEM = b"-FVE-FS-"


@dataclass
class GuestSession:
    """An inspected guest: where it is, what it is, and what the rules plan for the target."""

    disk_index: int  # index into the source VM's disks
    overlay: Overlay
    guest: Any  # vmferry.guest.guest.Guest
    firmware: str  # as the guest's partitioning says (GPT + ESP, no BIOS boot → uefi)
    report: dict[str, Any] = field(default_factory=dict)  # os, bootloader, kernels, tools
    plan: Any = None  # vmferry.guest.linux.fix.FixPlan, once planned
    written: list[str] = field(default_factory=list)  # guest paths written into the overlay

    controller: str | None = None  # the boot controller the plan prepares the guest for

    def plan_for(self, target: str, firmware: str, controller: str | None = None) -> Any:
        """Plan the repair for the boot disk on ``controller`` (None: the target's preferred)."""
        from vmferry.guest.linux.fix import plan_guest

        self.plan = plan_guest(self.guest, target, firmware=firmware, controller=controller)
        self.controller = controller
        return self.plan

    def apply(self) -> list[str]:
        """Write the planned changes into the overlay (all or nothing); idempotent."""
        from vmferry.guest.linux.fix import write_plan

        if self.plan is not None and self.plan.changes and not self.written:
            self.written = write_plan(self.guest, self.plan)
        return self.written

    def close(self) -> None:
        self.overlay.close()


@dataclass
class GuestProbe:
    """What preflight learnt about the guest when no Linux root could be opened."""

    windows: list[str] = field(default_factory=list)  # evidence: "disk 0 partition 2: NTFS"
    errors: list[str] = field(default_factory=list)


def find_guest(chains: list[tuple[int, Chain | None]]) -> tuple[GuestSession | None, GuestProbe]:
    """Open the guest on the first disk (boot disk first) that holds a Linux root."""
    from vmferry.guest.guest import open_guest
    from vmferry.guest.linux.fix import detect_firmware

    probe = GuestProbe()
    for index, chain in chains:
        if chain is None:
            continue
        probe.windows += windows_evidence(index, chain)
        overlay = Overlay(chain)
        try:
            guest = open_guest(overlay)
        except VmferryError as exc:
            probe.errors.append(f"disk {index}: {exc.message}")
            overlay.close()
            continue
        session = GuestSession(index, overlay, guest, detect_firmware(guest))
        session.report = _report(guest)
        return session, probe
    return None, probe


def _report(guest: Any) -> dict[str, Any]:
    from vmferry.guest.linux.inspect import (
        detect_arch,
        detect_bootloader,
        detect_guest_tools,
        detect_kernels,
        detect_os,
    )

    os_info = detect_os(guest)
    os_info["arch"] = detect_arch(guest)
    return {
        "os": os_info,
        "partition_table": guest.table.scheme,
        "bootloader": detect_bootloader(guest),
        "kernels": detect_kernels(guest),
        "guest_tools": detect_guest_tools(guest),
        "warnings": list(guest.warnings),
    }


def windows_evidence(index: int, chain: Chain) -> list[str]:
    """NTFS / BitLocker boot sectors on the disk's partitions (or the whole disk)."""
    out: list[str] = []
    try:
        table = read_partition_table(chain)
        spots = (
            [(None, 0, chain.virtual_size)]
            if table.scheme == "none"
            else [(p.index, p.start, p.size) for p in table.filesystems()]
        )
        for number, start, size in spots[:128]:
            if size < 512:
                continue
            oem = Slice(chain, start, size).read(3, 8)
            if oem in (NTFS_OEM, BITLOCKER_OEM):
                kind = "NTFS" if oem == NTFS_OEM else "BitLocker"
                where = f"partition {number}" if number is not None else "whole disk"
                out.append(f"disk {index} {where}: {kind}")
    except (GuestError, VmferryError):
        pass  # an unreadable table is reported by the Linux inspection, not here
    return out


def kernel_controllers(session: GuestSession, profile: Any, firmware: str) -> dict[str, list[str]]:
    """kernel version → the target's boot controllers its initramfs (or the kernel) drives."""
    from vmferry.guest.linux.rules.initramfs import usable_boot_controllers

    out: dict[str, list[str]] = {}
    for k in session.report.get("kernels", []):
        if k.get("image") and k.get("initramfs") and "error" not in (k.get("initramfs_info") or {}):
            out[k["version"]] = usable_boot_controllers(k, profile, firmware)
    return out
