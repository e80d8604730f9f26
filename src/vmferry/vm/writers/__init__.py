"""Config writers, one module per target format; each takes a model already fitted by translate.

Which writer a target gets is data (``TargetProfile.writer``, a key of :data:`WRITERS`), so the
dispatch below compares no target names: a new target that imports, say, OVF is one table row in
``vm/targets.py``, not another ``if`` here and in migrate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmferry.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from vmferry.vm.model import VmModel
    from vmferry.vm.targets import TargetProfile


@dataclass(frozen=True)
class WriteContext:
    """What some writers need besides the model: where disks live, and Proxmox's volume ids."""

    disk_dir: str
    storage: str = "local"
    vmid: int | None = None


def _libvirt(vm: VmModel, target: TargetProfile, ctx: WriteContext) -> dict[str, str]:
    from vmferry.vm.writers.libvirt import write_libvirt

    return write_libvirt(vm, ctx.disk_dir)


def _proxmox(vm: VmModel, target: TargetProfile, ctx: WriteContext) -> dict[str, str]:
    from vmferry.vm.writers.proxmox import write_proxmox

    return write_proxmox(vm, ctx.storage, ctx.vmid)


def _vmx(vm: VmModel, target: TargetProfile, ctx: WriteContext) -> dict[str, str]:
    from vmferry.vm.writers.vmx import write_vmx

    return write_vmx(vm)


def _hyperv(vm: VmModel, target: TargetProfile, ctx: WriteContext) -> dict[str, str]:
    from vmferry.vm.writers.hyperv import write_hyperv

    return write_hyperv(vm)


def _azure(vm: VmModel, target: TargetProfile, ctx: WriteContext) -> dict[str, str]:
    from vmferry.vm.writers.azure import write_azure

    return write_azure(vm)


def _vbox(vm: VmModel, target: TargetProfile, ctx: WriteContext) -> dict[str, str]:
    from vmferry.vm.writers.vbox import write_vbox

    return write_vbox(vm)


def _ovf(vm: VmModel, target: TargetProfile, ctx: WriteContext) -> dict[str, str]:
    from vmferry.vm.writers.ovf import write_ovf

    return write_ovf(vm, target.ovf_system_type)


#: ``TargetProfile.writer`` → the function producing that target's files (imported lazily: a
#: ``vm show`` needs none of them)
WRITERS: dict[str, Callable[[VmModel, TargetProfile, WriteContext], dict[str, str]]] = {
    "libvirt": _libvirt,
    "proxmox": _proxmox,
    "vmx": _vmx,
    "hyperv": _hyperv,
    "azure": _azure,
    "vbox": _vbox,
    "ovf": _ovf,
}


def render_target_config(
    vm: VmModel,
    target: TargetProfile,
    *,
    disk_dir: str,
    storage: str = "local",
    vmid: int | None = None,
) -> dict[str, str]:
    """The target's config files (file name → text) for a model fitted by translate: the one
    place that picks a writer, for ``vm convert`` and ``migrate`` alike.

    ``vmid`` names a Proxmox VM (``<vmid>.conf``, volumes ``<storage>:<vmid>/<file>``); any
    other writer has no VM id, so passing one there is a usage error, not silently ignored.
    """
    try:
        write = WRITERS[target.writer]
    except KeyError:
        raise ConfigError(
            f"target {target.name} names no known config writer ({target.writer!r})",
            hint="one of: " + ", ".join(sorted(WRITERS)),
        ) from None
    if vmid is not None and target.writer != "proxmox":
        raise UsageError(f"a VMID (--vmid) is for Proxmox targets only, not {target.name}")
    return write(vm, target, WriteContext(disk_dir, storage, vmid))
