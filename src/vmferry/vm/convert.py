"""``convert_config``: fit a model to a target and write the target's config files."""

from __future__ import annotations

from typing import NamedTuple

from vmferry.vm.model import VmModel
from vmferry.vm.targets import get_target
from vmferry.vm.translate import translate
from vmferry.vm.writers import render_target_config
from vmferry.vm.writers.libvirt import DEFAULT_DISK_DIR
from vmferry.vm.writers.proxmox import name_disks_for_vmid, proxmox_bridge, vmid_for


class Conversion(NamedTuple):
    """What ``convert_config`` returns; unpacks as ``files, choices, not_carried``."""

    files: dict[str, str]  # file name → text
    choices: list[str]  # every decision made on the way, one sentence each
    not_carried: list[str]  # every setting the target config does not carry
    model: VmModel | None = None  # the model as fitted to the target

    def __iter__(self):  # type: ignore[override]
        return iter((self.files, self.choices, self.not_carried))


def convert_config(
    model: VmModel,
    target: str,
    *,
    keep_macs: bool = True,
    boot_controller: str | None = None,
    disk_dir: str = DEFAULT_DISK_DIR,
    storage: str = "local",
    vmid: int | None = None,
) -> Conversion:
    """``vmid`` (Proxmox only): write ``<vmid>.conf`` with volumes ``<storage>:<vmid>/<file>``
    and the disk files renamed ``vm-<vmid>-disk-<n>.<fmt>``, as ``vmferry migrate`` does."""
    if vmid is not None:  # checked (range, Proxmox target) before any work
        vmid_for(get_target(target), vmid)
    tr = translate(model, target, keep_macs=keep_macs, boot_controller=boot_controller)
    vm, writer = tr.model, tr.target.writer
    not_carried = list(tr.not_carried)
    if vmid is not None:  # a Proxmox target: vmid_for said so
        tr.choices += name_disks_for_vmid(vm, vmid)
    files = render_target_config(vm, tr.target, disk_dir=disk_dir, storage=storage, vmid=vmid)
    if writer == "proxmox":
        for i, nic in enumerate(vm.nics):
            if nic.network and proxmox_bridge(nic.network) != nic.network:
                tr.choices.append(f"NIC {i}: network {nic.network!r} is no bridge name → vmbr0")
        if vmid is None:
            not_carried.append(
                f"disk volumes are written as '{storage}:<file>': import the disks there"
            )
        else:
            not_carried.append(
                f"disk volumes are written as '{storage}:{vmid}/<file>': the converted disks "
                f"go to that storage's images/{vmid}/, named as the choices say"
            )
    elif writer == "ovf":
        if any(d.size_bytes is None for d in vm.disks):
            tr.choices.append(
                "disk capacity unknown: written as 0; set it from the converted disks"
            )
        if vm.cdroms and any(c.path for c in vm.cdroms):
            not_carried.append("CD-ROM images: OVF drives are written empty")
    if (
        vm.guest_os
        and model.source_format not in ("vmx", "ovf", "ova")
        and writer in ("vmx", "ovf")
    ):
        tr.choices.append(f"guest OS hint {vm.guest_os!r} mapped to a generic VMware guest id")
    return Conversion(files, tr.choices, not_carried, vm)
