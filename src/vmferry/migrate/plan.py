"""Everything decided before the first byte is written: source, target, names, guest plan.

``build_plan`` reads the source, opens every disk's chain read-only, finds and plans the guest,
fits the VM to the target, names the outputs and measures them.  Preflight then judges the
plan, and the pipeline carries it out.  Nothing here writes, so ``--dry-run`` is this plus the
preflight.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.chain import Chain
from vmferry.disk import driver_by_name
from vmferry.errors import VmferryError
from vmferry.migrate.findings import Finding
from vmferry.migrate.formats import OutputFormat, output_format
from vmferry.migrate.guest import GuestProbe, GuestSession, find_guest, kernel_controllers
from vmferry.migrate.source import Source, SourceDisk, resolve_source
from vmferry.vm.api import safe_file_name
from vmferry.vm.model import Disk
from vmferry.vm.targets import TargetProfile, canonical_controller, get_target
from vmferry.vm.translate import Translation, resolve_target, translate
from vmferry.vm.writers.proxmox import proxmox_disk_file, vmid_for

MIB = 1 << 20
_TRANSLATE_STRIPS = (".gz", ".vmdk", ".vhdx", ".vhd", ".qcow2", ".vdi", ".img", ".raw", ".avhdx")


@dataclass
class DiskPlan:
    """One source disk and the output it becomes."""

    src: SourceDisk
    chain: Chain | None  # open, read-only; None for a blank disk
    virtual_size: int  # of the source
    out_size: int  # of the output (Azure rounds up to a whole MiB)
    layers: list[dict[str, Any]]  # the source chain, top first
    data_bytes: int  # bytes the chain map says hold data (what is read)
    out_name: str
    out_path: Path
    options: dict[str, str]
    fitted: Disk | None = None  # the disk as the target config will describe it
    required: int = 0  # bytes the output needs (the driver's measure)
    boot: bool = False

    @property
    def index(self) -> int:
        return self.src.index


@dataclass
class MigrationPlan:
    source: Source
    requested_target: str
    profile: TargetProfile
    fmt: OutputFormat
    outdir: Path
    firmware: str
    disks: list[DiskPlan]
    guest: GuestSession | None
    probe: GuestProbe
    translation: Translation | None  # None when the firmware cannot boot on the target
    keep_macs: bool
    boot_index: int
    boot_controller: str | None = None  # forced for the boot disk (the guest has its driver)
    vmid: int | None = None  # Proxmox's VM id (names the disks and the config); None elsewhere
    choices: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # the guest could not be prepared: why
    findings: list[Finding] = field(default_factory=list)
    space: dict[str, Any] = field(default_factory=dict)  # required / available / path

    @property
    def boot_disk(self) -> DiskPlan | None:
        return next((d for d in self.disks if d.index == self.boot_index), None)

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
        for d in self.disks:
            if d.chain is not None:
                d.chain.close()
                d.chain = None


def destination(target: str | None, fmt: str | None, vmid: int | None) -> str:
    """How a migration's destination reads in messages: ``proxmox [qcow2] VMID 100``."""
    return f"{target} [{fmt}]" + (f" VMID {vmid}" if vmid is not None else "")


def build_plan(
    source: str | os.PathLike[str],
    target: str,
    outdir: str | os.PathLike[str],
    *,
    format: str | None = None,
    keep_macs: bool = False,
    firmware: str | None = None,
    memory: int | None = None,
    cpus: int | None = None,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    vmid: int | None = None,
) -> MigrationPlan:
    """Everything decided before writing (module docstring).  ``vmid``: Proxmox only (default
    100); checked before the source is read, so a wrong one costs nothing."""
    if vmid is not None:  # a usage error (range, non-Proxmox target) comes first
        vmid_for(get_target(target), vmid)
    src = resolve_source(
        source, firmware=firmware, memory=memory, cpus=cpus, allowed_dirs=allowed_dirs
    )
    model = src.model
    boot = model.boot_disk()
    boot_index = next(i for i, d in enumerate(model.disks) if d is boot)
    chains: list[Chain | None] = []
    # Parents may live anywhere in the VM's folder (a VirtualBox snapshot in Snapshots/ has its
    # base one level up), not only below the top image's own directory.
    parent_dirs = [src.root, *(allowed_dirs or ())]
    try:
        for sd in src.disks:
            chains.append(sd.open(parent_dirs))
        order = [boot_index] + [i for i in range(len(chains)) if i != boot_index]
        session, probe = find_guest([(i, chains[i]) for i in order])
    except BaseException:
        for c in chains:
            if c is not None:
                c.close()
        raise
    if not src.firmware_given and session is not None:
        model.firmware = session.firmware
        src.notes.append(f"bare image: firmware {session.firmware} (from the guest's partitions)")
    profile, _gen = resolve_target(model, target)  # translate says which generation
    fmt = output_format(profile, format)
    plan = MigrationPlan(
        src, target, profile, fmt, Path(os.path.abspath(outdir)), model.firmware, [],
        session, probe, None, keep_macs, boot_index, vmid=vmid_for(profile, vmid),
    )  # fmt: skip
    try:
        _plan_disks(plan, chains)
        if model.firmware in profile.firmware:
            _fit(plan)
    except BaseException:
        plan.close()
        for c in chains:
            if c is not None:
                c.close()
        raise
    return plan


def _plan_disks(plan: MigrationPlan, chains: list[Chain | None]) -> None:
    """Output names (unique, from each chain's base file), sizes and measures."""
    used: set[str] = set()
    vm_stem = safe_file_name(plan.source.model.name)
    for sd, chain in zip(plan.source.disks, chains, strict=True):
        if chain is not None:
            layers = [_layer_json(layer) for layer in chain.layers]
            size = chain.virtual_size
            ranges = [(e.offset, e.length) for e in chain.map() if e.data]
            base = Path(str(chain.layers[-1].file.path)).name
            in_archive = sd.ova is not None or sd.xva is not None
            stem = f"{vm_stem}-disk{sd.index + 1}" if in_archive else _stem(base)
        else:
            layers, size, ranges = [], sd.empty_size or 0, []
            stem = f"{vm_stem}-disk{sd.index + 1}"
        if plan.vmid is not None:
            # a Proxmox directory storage's name for the volume; its format name is the file
            # extension it accepts (raw disks are ``.raw`` there, not ``.img``)
            out_name = proxmox_disk_file(plan.vmid, sd.index, plan.fmt.name)
        else:
            out_name = _unique_name(stem, plan.fmt.extension, used)
        out_size = size
        if plan.fmt.options.get("azure") == "on":
            out_size = -(-size // MIB) * MIB
        opts = plan.fmt.options_for(sd.disk.controller, sd.disk.controller_model)
        dp = DiskPlan(sd, chain, size, out_size, layers, sum(n for _, n in ranges), out_name,
                      plan.outdir / out_name, opts, boot=sd.index == plan.boot_index)  # fmt: skip
        try:
            required, _full = driver_by_name(plan.fmt.driver).measure(out_size, ranges, opts)
        except VmferryError:
            required = out_size  # a driver that cannot measure: assume fully allocated
        dp.required = required * (2 if plan.fmt.ova else 1)  # the disk, then its copy in the OVA
        plan.disks.append(dp)


def _unique_name(stem: str, extension: str, used: set[str]) -> str:
    """``<stem>.<extension>``, the stem made safe and unique (``-2``, ``-3``) among ``used``."""
    stem = safe_file_name(stem)
    if stem.lower().endswith(_TRANSLATE_STRIPS):
        stem += "-disk"
    name = stem
    n = 2
    while name.lower() in used:
        name = f"{stem}-{n}"
        n += 1
    used.add(name.lower())
    return f"{name}.{extension}"


def _stem(name: str) -> str:
    low = name.lower()
    for suffix in (".avhdx", ".avhd", ".vhdx", ".vhd", ".vmdk", ".qcow2", ".qcow", ".vdi",
                   ".img", ".raw", ".dd"):  # fmt: skip
        if low.endswith(suffix):
            return name[: -len(suffix)] or "disk"
    return name or "disk"


def _layer_json(layer: Any) -> dict[str, Any]:
    f = layer.file
    return {
        "path": str(f.path),
        "format": layer.name,
        "virtual_size": layer.virtual_size,
        "file_size": f.size,
        "allocated_bytes": f.allocated_bytes,
    }


def _fit(plan: MigrationPlan) -> None:
    """Translate the VM, pick the boot controller and plan the guest repair FOR that controller.

    One decision, used by the config and the repair alike (docs/migrate.md "Boot controller"):
    a repaired Linux guest goes to the target's preferred boot controller, unless its source
    controller is one of the target's own (``native_boot``: pvscsi stays pvscsi on VMware).
    When the repair cannot give every kernel that controller's drivers (the initramfs rule
    finds a kernel that still lacks them), the boot disk goes to a controller the target boots
    from that every kernel already drives, and that fallback is reported.  A guest vmferry does
    not repair (Windows, unreadable) keeps translation's choice: its controller if the target
    boots from it.
    """
    session, profile, fw = plan.guest, plan.profile, plan.firmware
    plan.translation = _translate(plan, None)
    fitted_boot = plan.boot_disk.fitted if plan.boot_disk else None
    if session is None or fitted_boot is None:
        if session is not None:
            session.plan_for(profile.name, fw)
        return
    source_model = canonical_controller(plan.source.model.disks[plan.boot_index].controller_model)
    if source_model in profile.native_boot and profile.boots_from(fw, source_model or ""):
        wanted = source_model or ""
    else:
        wanted = profile.preferred_boot_controller(fw)
    session.plan_for(profile.name, fw, wanted)
    if _cannot_reach_root(session.plan, wanted):
        per_kernel = kernel_controllers(session, profile, fw)
        driven = [m for m in profile.boot_controllers.get(fw, ())
                  if per_kernel and all(m in c for c in per_kernel.values())]  # fmt: skip
        if driven:
            plan.fallbacks.append(
                f"boot disk on {driven[0]} instead of {wanted}: vmferry cannot add the {wanted} "
                f"drivers to every kernel's initramfs, and every kernel already drives {driven[0]}"
            )
            wanted = driven[0]
            session.plan_for(profile.name, fw, wanted)
    if wanted != (fitted_boot.controller_model or ""):
        plan.boot_controller = wanted
        plan.translation = _translate(plan, wanted)


def _cannot_reach_root(fix_plan: Any, controller: str) -> bool:
    """The repair plan says some kernel cannot reach its root disk on ``controller`` (an error:
    no kernel can; a warning: that kernel could boot from another controller)."""
    lacks = f"initramfs lacks drivers for {controller} "
    return any(
        f.rule == "initramfs" and (f.severity == "error" or lacks in f.message)
        for f in fix_plan.findings
    )


def _translate(plan: MigrationPlan, boot_controller: str | None) -> Translation:
    """Translate a copy whose disk names are the output names, then map disks back."""
    model = copy.deepcopy(plan.source.model)
    by_stem: dict[str, DiskPlan] = {}
    for dp in plan.disks:
        model.disks[dp.index].path = dp.out_name
        by_stem[_stem(dp.out_name).lower()] = dp
    tr = translate(
        model, plan.requested_target, keep_macs=plan.keep_macs, boot_controller=boot_controller
    )
    for dp in plan.disks:
        dp.fitted = None
    for disk in tr.model.disks:
        dp = by_stem[_stem(disk.path or "").lower()]
        disk.path, disk.format, disk.size_bytes = dp.out_name, plan.fmt.name, dp.out_size
        dp.fitted = disk
        dp.options = plan.fmt.options_for(disk.controller, disk.controller_model)
    tr.choices = [c for c in tr.choices if " → file " not in c]  # names are ours, said below
    return tr
