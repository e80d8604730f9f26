"""Fit a VM model to a target: controllers it boots from, free slots, NIC models, limits.

Translation is separate from writing so that every writer receives a model that already obeys
its target, and so that every decision is made (and reported) once.  Each choice is a sentence a
user can check; each setting that cannot be carried is listed rather than silently dropped.

Rules (documented in docs/vm.md):
* a disk keeps its controller when the target offers it (the guest already has that driver);
  otherwise it moves to the target's preferred boot controller (boot disk) or data controller;
* the boot disk is placed first, so it gets slot 0:0 of its controller (Hyper-V Gen 1: IDE 0:0);
* ``hyperv`` means Generation 1 for BIOS guests and Generation 2 for UEFI guests;
* disk files are renamed ``<stem>.<target format>``: the disk engine converts them to match.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from vmferry.errors import ConfigError
from vmferry.vm.model import Disk, VmModel
from vmferry.vm.targets import (
    CONTROLLERS,
    FORMAT_MAX_BYTES,
    TargetProfile,
    canonical_controller,
    get_target,
)

#: Units a VMware-style SCSI controller keeps for itself.
_RESERVED_UNITS = {"lsilogic": {7}, "lsisas1068": {7}, "pvscsi": {7}, "buslogic": {7}}
_FORMAT_EXT = {
    "qcow2": "qcow2",
    "raw": "img",
    "vhdx": "vhdx",
    "vhd": "vhd",
    "vhd-fixed": "vhd",
    "vmdk": "vmdk",
    "vmdk-streamOptimized": "vmdk",
    "vdi": "vdi",
}
GIB = 1024**3


@dataclass
class Translation:
    """The model fitted to ``target`` plus what was decided and what was lost on the way."""

    model: VmModel
    target: TargetProfile
    choices: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)


def resolve_target(model: VmModel, target: str) -> tuple[TargetProfile, str | None]:
    """The profile to use; ``hyperv`` picks the generation from the firmware."""
    prof = get_target(target)
    if prof.name == "hyperv" and model.firmware == "uefi":
        return get_target("hyperv-gen2"), "UEFI guest → Hyper-V Generation 2"
    if prof.name == "hyperv":
        return prof, "BIOS guest → Hyper-V Generation 1"
    return prof, None


def translate(
    source: VmModel,
    target: str,
    *,
    keep_macs: bool = True,
    boot_controller: str | None = None,
) -> Translation:
    prof, gen_choice = resolve_target(source, target)
    vm = copy.deepcopy(source)
    vm.unsupported = []
    vm.snapshots, vm.current_snapshot = [], None
    tr = Translation(vm, prof)
    if gen_choice:
        tr.choices.append(gen_choice)
    if vm.firmware not in prof.firmware:
        raise ConfigError(
            f"target {prof.name} cannot boot a {vm.firmware} guest",
            hint="convert the guest's boot loader first, or pick another target",
        )
    if vm.secure_boot and not prof.secure_boot:
        vm.secure_boot = False
        tr.not_carried.append(f"secure boot (not offered by {prof.name})")
    if source.snapshots:
        tr.not_carried.append(
            f"{len(source.snapshots)} snapshot(s): only the current state is converted"
        )
    tr.not_carried.extend(f"source setting not understood: {u}" for u in source.unsupported)
    _fit_disks(tr, boot_controller)
    _fit_cdroms(tr)
    _fit_nics(tr, keep_macs)
    if vm.serial_ports and not prof.serial_ports:
        tr.not_carried.append(f"{len(vm.serial_ports)} serial port(s) (not offered by {prof.name})")
        vm.serial_ports = []
    if vm.cores_per_socket and vm.cpus % vm.cores_per_socket:
        tr.choices.append(
            f"cores per socket {vm.cores_per_socket} does not divide {vm.cpus}: dropped"
        )
        vm.cores_per_socket = None
    if vm.memory_mb % prof.memory_step_mb:
        vm.memory_mb += prof.memory_step_mb - vm.memory_mb % prof.memory_step_mb
        tr.choices.append(
            f"memory rounded up to {vm.memory_mb} MiB "
            f"(Hyper-V needs a multiple of {prof.memory_step_mb})"
        )
    return tr


def _basename(path: str) -> str:
    return re.split(r"[\\/]", path.split("] ", 1)[-1])[-1]


def _retarget_path(disk: Disk, fmt: str) -> str | None:
    if not disk.path:
        return None
    stem = _basename(disk.path)
    for suffix in (".gz", ".vmdk", ".vhdx", ".vhd", ".qcow2", ".vdi", ".img", ".raw", ".avhdx"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return f"{stem}.{_FORMAT_EXT.get(fmt, fmt)}"


class _Slots:
    """Free (bus, unit) slots per controller model, respecting each controller's limits."""

    def __init__(self, limits: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.used: dict[str, set[tuple[int, int]]] = {}
        self.limits = limits or {}

    def capacity(self, model: str) -> tuple[int, int]:
        if model in self.limits:
            return self.limits[model]
        facts = CONTROLLERS[model]
        return facts.max_controllers * facts.buses_per_controller, facts.units_per_bus

    def take(self, model: str, want: tuple[int, int] | None) -> tuple[int, int] | None:
        buses, units = self.capacity(model)
        used = self.used.setdefault(model, set())
        reserved = set() if model in self.limits else _RESERVED_UNITS.get(model, set())
        if model == "virtio-blk" and model not in self.limits:  # one PCI device per disk
            buses, units = 1, CONTROLLERS[model].max_controllers
        unit_range = units + len(reserved)
        if (
            want
            and want not in used
            and want[0] < buses
            and want[1] < unit_range
            and want[1] not in reserved
        ):
            used.add(want)
            return want
        for bus in range(buses):
            for unit in range(unit_range):
                if unit not in reserved and (bus, unit) not in used:
                    used.add((bus, unit))
                    return bus, unit
        return None


def _fit_disks(tr: Translation, boot_controller: str | None) -> None:
    vm, prof = tr.model, tr.target
    fmt = prof.default_disk_format
    boot = vm.boot_disk()
    if boot_controller is not None:
        forced = canonical_controller(boot_controller)
        if forced is None or not prof.boots_from(vm.firmware, forced):
            raise ConfigError(
                f"{prof.name} cannot boot a {vm.firmware} guest from {boot_controller!r}",
                hint="one of: " + ", ".join(prof.boot_controllers.get(vm.firmware, ())),
            )
    ordered = ([boot] if boot else []) + [d for d in vm.disks if d is not boot]
    slots = _Slots(prof.slot_limits)
    kept: list[Disk] = []
    scsi_models: set[str] = set()
    for disk in ordered:
        is_boot = disk is boot
        src = f"{disk.controller}/{disk.controller_model} {disk.bus}:{disk.unit}"
        model = canonical_controller(disk.controller_model) or ""
        if is_boot and boot_controller is not None:
            choice, reason = canonical_controller(boot_controller) or "", "requested"
        elif is_boot:
            if prof.boots_from(vm.firmware, model):
                choice, reason = model, "kept: target boots from it"
            else:
                choice = prof.preferred_boot_controller(vm.firmware)
                reason = (
                    f"{prof.name} does not boot {vm.firmware} guests from {model}"
                    if model
                    else "the source names no boot controller model"
                )
        elif model in prof.controllers:
            choice, reason = model, "kept"
        else:
            choice = prof.data_controller or _chosen_boot_model(kept, prof, vm.firmware)
            reason = f"{prof.name} has no {model or '?'} controller"
        # Proxmox and libvirt-with-one-scsihw want a single SCSI model; keep the boot disk's.
        facts = CONTROLLERS[choice]
        if (
            facts.kind == "scsi"
            and prof.name == "proxmox"
            and scsi_models
            and choice not in scsi_models
        ):
            choice, reason = next(iter(scsi_models)), "Proxmox has one SCSI controller model per VM"
            facts = CONTROLLERS[choice]
        want = (disk.bus, disk.unit) if choice == model else None
        slot = slots.take(choice, want)
        if slot is None and prof.data_controller and not is_boot:
            choice, reason = prof.data_controller, f"{facts.model} is full"
            facts = CONTROLLERS[choice]
            slot = slots.take(choice, None)
        if slot is None:
            tr.not_carried.append(f"disk {disk.path}: no free slot on {choice}")
            continue
        if facts.kind == "scsi":
            scsi_models.add(choice)
        new_path = _retarget_path(disk, fmt)
        disk.controller, disk.controller_model = facts.kind, choice
        disk.bus, disk.unit = slot
        if disk.path and new_path != disk.path:
            tr.choices.append(f"disk {disk.path} → file {new_path} ({fmt})")
        disk.path, disk.format, disk.compression, disk.parent = new_path, fmt, None, None
        if is_boot:
            disk.boot_order = 1
        else:
            disk.boot_order = None
        dst = f"{facts.kind}/{choice} {slot[0]}:{slot[1]}"
        if dst != src or is_boot:
            tr.choices.append(
                f"{'boot ' if is_boot else ''}disk {src} → {dst} ({reason}); "
                f"Linux guest needs {', '.join(facts.linux_drivers)}"
                + (f", first disk is {facts.linux_disk}" if is_boot else "")
            )
        limit = (
            min(x for x in (prof.max_disk_bytes, FORMAT_MAX_BYTES.get(fmt)) if x is not None)
            if (prof.max_disk_bytes or FORMAT_MAX_BYTES.get(fmt))
            else None
        )
        if limit and disk.size_bytes and disk.size_bytes > limit:
            tr.not_carried.append(
                f"disk {new_path}: {disk.size_bytes // GIB} GiB exceeds the {limit // GIB} GiB "
                f"limit of {prof.name}/{fmt}"
            )
        kept.append(disk)
    vm.disks = kept


def _chosen_boot_model(kept: list[Disk], prof: TargetProfile, firmware: str) -> str:
    return (
        kept[0].controller_model
        if kept and kept[0].controller_model
        else (prof.preferred_boot_controller(firmware))
    )


def _fit_cdroms(tr: Translation) -> None:
    vm, prof = tr.model, tr.target
    allowed = prof.cdrom_models()
    slots = _Slots(prof.slot_limits)
    for d in vm.disks:
        slots.take(d.controller_model or "", (d.bus, d.unit))
    kept = []
    for cd in vm.cdroms:
        model = canonical_controller(cd.controller_model) or ""
        if model in allowed:
            choice = model
        else:
            choice = next(
                (m for m in ("ahci", "piix4") if m in allowed), allowed[0] if allowed else ""
            )
        if not choice:
            tr.not_carried.append(f"CD-ROM {cd.path or '(empty)'}: {prof.name} has no CD-ROM drive")
            continue
        slot = slots.take(choice, (cd.bus, cd.unit) if choice == model else None)
        if slot is None:
            tr.not_carried.append(f"CD-ROM {cd.path or '(empty)'}: no free slot on {choice}")
            continue
        src = f"{cd.controller}/{model} {cd.bus}:{cd.unit}"
        cd.controller, cd.controller_model = CONTROLLERS[choice].kind, choice
        cd.bus, cd.unit = slot
        dst = f"{cd.controller}/{choice} {slot[0]}:{slot[1]}"
        if src != dst:
            tr.choices.append(f"CD-ROM {src} → {dst}")
        kept.append(cd)
    vm.cdroms = kept


def _fit_nics(tr: Translation, keep_macs: bool) -> None:
    vm, prof = tr.model, tr.target
    for i, nic in enumerate(vm.nics):
        if nic.model not in prof.nics:
            tr.choices.append(
                f"NIC {i}: model {nic.model} → {prof.default_nic} ({prof.name} has no {nic.model})"
            )
            nic.model = prof.default_nic
        if not keep_macs and nic.mac:
            tr.choices.append(
                f"NIC {i}: MAC {nic.mac} dropped (keep_macs=False); the target assigns one"
            )
            nic.mac, nic.mac_static = None, False
        elif nic.mac:
            nic.mac_static = True
