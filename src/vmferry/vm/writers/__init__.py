"""Config writers, one module per target format; each takes a model already fitted by translate."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmferry.vm.model import VmModel
    from vmferry.vm.targets import TargetProfile


def render_target_config(
    vm: VmModel,
    target: TargetProfile,
    *,
    disk_dir: str,
    storage: str = "local",
    vmid: int | None = None,
) -> dict[str, str]:
    """The target's config files (file name → text) for a model fitted by translate: the one
    place that picks a writer, for ``vm convert`` and ``migrate`` alike."""
    from vmferry.vm.writers.azure import write_azure
    from vmferry.vm.writers.hyperv import write_hyperv
    from vmferry.vm.writers.libvirt import write_libvirt
    from vmferry.vm.writers.ovf import write_ovf
    from vmferry.vm.writers.proxmox import write_proxmox
    from vmferry.vm.writers.vbox import write_vbox
    from vmferry.vm.writers.vmx import write_vmx

    writer = target.writer
    if writer == "libvirt":
        return write_libvirt(vm, disk_dir)
    if writer == "proxmox":
        return write_proxmox(vm, storage, vmid)
    if writer == "vmx":
        return write_vmx(vm)
    if target.name == "azure":  # Hyper-V's disks and VM generation, created with the az CLI
        return write_azure(vm)
    if writer == "hyperv":
        return write_hyperv(vm)
    if writer == "vbox":
        return write_vbox(vm)
    return write_ovf(vm, "xen-3.0-unknown" if target.name == "xen" else "vmx-14")
