"""The target's config, written last: its presence means the migration is complete.

For most targets this is the config the ``vmferry.vm`` writers produce (libvirt XML, Proxmox
conf, .vmx, Hyper-V / VirtualBox scripts, OVF for XenServer) for the fitted model whose disks are
the converted files.  For VMware and generic OVF the deliverable is one OVA: the full OVF
descriptor (CPUs, memory, controllers, NICs, firmware) plus the streamOptimized disks and a
SHA-256 manifest.  The standalone disks are removed once the OVA is complete and checked.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from vmferry.errors import UsageError
from vmferry.migrate.plan import MigrationPlan
from vmferry.vm.api import safe_file_name
from vmferry.vm.model import VmModel
from vmferry.vm.writers import render_target_config
from vmferry.vm.writers.ovf import OVF, write_ovf
from vmferry.vm.writers.proxmox import import_note

#: what the admin still does with a writer's output (Proxmox's depends on the VMID: below)
_NOTES = {
    "azure": "Azure: run the script with RESOURCE_GROUP, LOCATION and STORAGE_ACCOUNT set "
    "(and SIZE): it uploads the VHDs and creates the VM",
}


def render_config(plan: MigrationPlan) -> tuple[dict[str, str], list[str]]:
    """(file name → text, notes) for the fitted model; nothing is written."""
    assert plan.translation is not None
    vm: VmModel = plan.translation.model
    writer, notes = plan.profile.writer, []
    if plan.fmt.ova:
        files = write_ovf(vm, plan.profile.ovf_system_type)
    else:
        files = render_target_config(vm, plan.profile, disk_dir=str(plan.outdir), vmid=plan.vmid)
        if plan.vmid is not None:
            notes.append(import_note(plan.vmid))
        elif writer in _NOTES:
            notes.append(_NOTES[writer])
    return {safe_file_name(name): text for name, text in files.items()}, notes


def config_names(plan: MigrationPlan) -> list[str]:
    """File names the config step will write (an OVA: the one .ova)."""
    if plan.translation is None:
        return []
    files, _ = render_config(plan)
    if plan.fmt.ova:
        return [ova_name(plan, files)]
    return list(files)


def ova_name(plan: MigrationPlan, files: dict[str, str]) -> str:
    ovf = next(iter(files))
    return (ovf[:-4] if ovf.lower().endswith(".ovf") else ovf) + ".ova"


def write_text_atomic(path: Path, text: str) -> None:
    """Temporary name, fsync, rename; never replaces an existing file."""
    if path.exists():
        raise UsageError("output already exists", path=str(path), hint="choose another -o")
    tmp = path.with_name(f".{path.name}.vmferry-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_config(plan: MigrationPlan) -> tuple[Path, list[Path], list[str]]:
    """Write the config files (the main one last); returns (main file, all files, notes)."""
    files, notes = render_config(plan)
    if plan.fmt.ova:
        path = write_ova(plan, files)
        return path, [path], notes
    names = list(files)
    written: list[Path] = []
    for name in names[1:] + names[:1]:  # the main config last: its presence = complete
        p = plan.outdir / name
        write_text_atomic(p, files[name])
        written.append(p)
    return plan.outdir / names[0], [plan.outdir / n for n in names], notes


def write_ova(plan: MigrationPlan, files: dict[str, str]) -> Path:
    from vmferry.disk.blockfile import BlockFile
    from vmferry.disk.ova import write_ova_archive
    from vmferry.ops.atomic import AtomicOutput

    ovf_name = next(iter(files))
    sizes = {d.out_name: d.out_path.stat().st_size for d in plan.disks if d.fitted is not None}
    ovf = _with_file_sizes(files[ovf_name], sizes).encode("utf-8")
    final = plan.outdir / ova_name(plan, files)
    opened: list[tuple[str, BlockFile]] = []
    try:
        for d in plan.disks:
            if d.fitted is not None:
                opened.append((d.out_name, BlockFile.open(d.out_path, writable=False)))
        with AtomicOutput(final) as out:
            assert out.file is not None
            out.file.cache_unsafe = True
            write_ova_archive(out.file, ovf_name, ovf, opened)
            out.commit()
            out.file.close()
    finally:
        for _, f in opened:
            f.close()
    return final


def _with_file_sizes(text: str, sizes: dict[str, int]) -> str:
    """Add ``ovf:size`` to each References/File (importers check the member against it)."""
    root = ET.fromstring(text)  # our own writer's output, not untrusted input
    for f in root.iter(f"{{{OVF}}}File"):
        href = f.get(f"{{{OVF}}}href")
        if href in sizes:
            f.set(f"{{{OVF}}}size", str(sizes[href]))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
