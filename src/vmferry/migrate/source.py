"""Any SOURCE the user names → a VM model plus, for each disk, where its active state lives.

SOURCE may be a VM configuration of any kind ``vmferry.vm`` reads, a Hyper-V VM folder, an OVA,
or a bare disk image.  Each disk the config names is found on this host: configs carry paths of
the machine they came from (``C:\\Hyper-V\\web\\Virtual Hard Disks\\web.vhdx``, ``[datastore1]
web/web.vmdk``, Proxmox ``local:100/vm-100-disk-0.qcow2``), so a path that does not exist here is
looked for by its file name inside the VM's folder.  Like parents of differencing disks, disk
files are only opened inside the VM's folder tree and the ``allowed_dirs``: a hostile config must
not make vmferry copy ``/etc/shadow`` into an output image.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from vmferry.chain import Chain, open_chain
from vmferry.chain.resolve import is_inside
from vmferry.errors import ConfigError, UsageError, VmferryError
from vmferry.vm.model import Disk, VmModel

#: extensions that are disk images, never VM configs (an .ova is both: read as a config)
IMAGE_SUFFIXES = (".vhd", ".avhd", ".vhdx", ".avhdx", ".vmdk", ".qcow2", ".qcow", ".vdi",
                  ".img", ".raw", ".dd")  # fmt: skip
#: memory/suspend state no other hypervisor can resume (suffix → what writes it)
MEMORY_STATE_SUFFIXES = {
    ".vmss": "VMware suspend state",
    ".vmsn": "VMware snapshot memory state",
    ".vmem": "VMware guest memory file",
    ".vsv": "Hyper-V saved state",
    ".vmrs": "Hyper-V runtime state",
    ".sav": "VirtualBox saved state",
    ".save": "libvirt managed save image",
}
MAX_WALK_ENTRIES = 20_000  # a VM folder holds tens of files; a bound against walking "/"
MAX_WALK_DEPTH = 4
DEFAULT_MEMORY_MB = 2048
DEFAULT_CPUS = 2
_STORAGE_PREFIX = re.compile(r"^[A-Za-z0-9][\w.-]+:(?![\\/])")  # Proxmox "local:", not "C:\"
_DATASTORE = re.compile(r"^\[[^\]]*\]\s*")  # VMware "[datastore1] dir/file.vmdk"


@dataclass
class SourceDisk:
    """One disk of the source VM and where its active state is on this host."""

    index: int  # position in ``model.disks``
    disk: Disk
    path: Path | None  # the top image of the chain (the active state); None: see below
    ova: Path | None = None  # the disk is member ``ova_disk`` of this OVA
    ova_disk: int | None = None
    empty_size: int | None = None  # a blank disk (OVF disk without a file): zeros of this size
    xva: Path | None = None  # the disk is VDI ``xva_ref`` inside this XVA export
    xva_ref: str | None = None

    def open(self, allowed_dirs: Sequence[str | os.PathLike[str]] | None = None) -> Chain | None:
        """The chain, read-only; None for a blank disk."""
        if self.ova is not None:
            from vmferry.disk.ova import open_ova_disk

            chain: Chain = open_ova_disk(self.ova, self.ova_disk or 0)
            return chain
        if self.xva is not None:
            return _open_xva(self.xva, self.xva_ref or "", self.disk.size_bytes or 0)
        if self.path is None:
            return None
        if (self.disk.compression or "").lower() == "gzip":
            return _open_gzip(self.path, self.disk.size_bytes or 0)
        return open_chain(self.path, allowed_dirs=allowed_dirs)

    @property
    def label(self) -> str:
        if self.ova is not None:
            return f"{self.ova.name}[disk {self.ova_disk}]"
        if self.xva is not None:
            return f"{self.xva.name}[{self.xva_ref}]"
        return str(self.path) if self.path else f"(blank {self.empty_size} bytes)"


@dataclass
class Source:
    given: Path  # what the user named
    kind: str  # a vm.readers kind, "hyperv-folder" resolves to hyperv-xml/vmcx, or "image"
    config: Path | None
    root: Path  # the VM's folder: disk files and saved state are looked for below it
    model: VmModel
    disks: list[SourceDisk]
    notes: list[str] = field(default_factory=list)  # defaults vmferry filled in
    firmware_given: bool = True  # False: a bare image; firmware comes from the guest
    memory_state: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.given),
            "kind": self.kind,
            "config": str(self.config) if self.config else None,
            "root": str(self.root),
            "name": self.model.name,
            "notes": list(self.notes),
        }


def resolve_source(
    source: str | os.PathLike[str],
    *,
    firmware: str | None = None,
    memory: int | None = None,
    cpus: int | None = None,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> Source:
    """Read SOURCE into a :class:`Source`; raises ConfigError/UsageError, never guesses."""
    given = Path(os.path.abspath(source))
    if not given.exists():
        raise UsageError("no such source", path=str(given))
    if firmware is not None and firmware not in ("bios", "uefi"):
        raise UsageError(f"firmware must be bios or uefi, not {firmware!r}")
    if memory is not None and not 4 <= memory <= 64 << 20:
        raise UsageError(f"memory {memory} MiB is out of range (4 MiB .. 64 TiB)")
    if cpus is not None and not 1 <= cpus <= 4096:
        raise UsageError(f"cpus {cpus} is out of range (1..4096)")
    extra = [Path(os.path.abspath(d)) for d in allowed_dirs or ()]
    if given.is_dir():
        src = _hyperv_folder(given, extra)
    elif given.suffix.lower() in IMAGE_SUFFIXES:
        src = _bare_image(given)
    else:
        src = _config_or_image(given, extra)
    notes = src.notes
    if firmware is not None:
        if src.firmware_given and src.model.firmware != firmware:
            notes.append(f"firmware {src.model.firmware} → {firmware} (--firmware)")
        src.model.firmware, src.firmware_given = firmware, True
    if memory is not None:
        if src.kind != "image":
            notes.append(f"memory {src.model.memory_mb} MiB → {memory} MiB (--memory)")
        src.model.memory_mb = memory
    if cpus is not None:
        if src.kind != "image":
            notes.append(f"vCPUs {src.model.cpus} → {cpus} (--cpus)")
        src.model.cpus, src.model.cores_per_socket = cpus, None
    if src.kind == "image":
        if memory is None:
            src.model.memory_mb = DEFAULT_MEMORY_MB
            notes.append(f"bare image: memory {DEFAULT_MEMORY_MB} MiB (default; --memory)")
        if cpus is None:
            src.model.cpus = DEFAULT_CPUS
            notes.append(f"bare image: {DEFAULT_CPUS} vCPUs (default; --cpus)")
    if not src.model.disks:
        raise ConfigError("the VM has no disk to migrate", path=str(src.config or given))
    src.memory_state = find_memory_state(src)
    return src


# --- kinds of SOURCE ------------------------------------------------------------------------------


def _bare_image(path: Path) -> Source:
    model = VmModel(name=_stem(path), source_format="image")
    # the source controller is unknown: translation moves the disk to the target's boot controller
    model.disks.append(Disk(path=path.name, controller="ide", controller_model=None))
    disk = SourceDisk(0, model.disks[0], path)
    return Source(path, "image", None, path.parent, model, [disk], firmware_given=False)


def _config_or_image(path: Path, extra: list[Path]) -> Source:
    from vmferry.vm.readers import detect_kind, read_config

    try:
        # detect_kind does not know the .xva suffix (an XVA is a tar whose first member is
        # ova.xml); the XVA reader does
        kind = "xva" if path.suffix.lower() == ".xva" else detect_kind(path)
    except ConfigError:
        if _probes_as_image(path):
            return _bare_image(path)
        raise
    model = read_config(path, kind)
    root = path.parent
    if kind in ("hyperv-xml", "vmcx") and root.name.lower() == "virtual machines":
        root = root.parent
    return _with_disks(path, kind, path, root, model, extra)


def _hyperv_folder(folder: Path, extra: list[Path]) -> Source:
    """A Hyper-V VM folder: its ``Virtual Machines/*.vmcx`` (or ``.xml``) config."""
    from vmferry.vm.readers import read_config

    found: list[Path] = []
    for sub in (folder / "Virtual Machines", folder):
        if sub.is_dir():
            found += sorted(p for p in sub.iterdir() if p.suffix.lower() == ".vmcx")
            if not found:
                found += sorted(p for p in sub.iterdir() if p.suffix.lower() == ".xml")
        if found:
            break
    if not found:
        raise UsageError(
            "the folder holds no Hyper-V VM configuration (Virtual Machines/*.vmcx or *.xml)",
            path=str(folder),
            hint="name the VM config file itself, or a disk image",
        )
    if len(found) > 1:
        raise UsageError(
            f"the folder holds {len(found)} VM configurations: "
            + ", ".join(p.name for p in found[:5]),
            path=str(folder),
            hint="name the one to migrate",
        )
    config = found[0]
    kind = "vmcx" if config.suffix.lower() == ".vmcx" else "hyperv-xml"
    return _with_disks(folder, kind, config, folder, read_config(config, kind), extra)


def _with_disks(
    given: Path, kind: str, config: Path, root: Path, model: VmModel, extra: list[Path]
) -> Source:
    if kind == "xva" and not tarfile.is_tarfile(config):
        raise ConfigError(
            "an ova.xml alone holds no disk data",
            path=str(config),
            hint="migrate the .xva export itself",
        )
    disks: list[SourceDisk] = []
    ova_hrefs: list[str | None] = []
    if kind == "ova":
        from vmferry.disk.ova import list_ova_disks

        ova_hrefs = [d["href"] for d in list_ova_disks(config)]
    for i, disk in enumerate(model.disks):
        if kind == "ova":
            disks.append(_ova_disk(i, disk, config, ova_hrefs))
        elif kind == "xva":
            if not disk.path or not disk.size_bytes:
                raise ConfigError(f"XVA disk {i} has no VDI or no size", path=str(config))
            disks.append(SourceDisk(i, disk, None, xva=config, xva_ref=disk.path))
        elif disk.path is None:
            disks.append(_blank(i, disk, config))
        else:
            disks.append(SourceDisk(i, disk, locate_disk(disk.path, config, root, extra)))
    return Source(given, kind, config, root, model, disks)


def _blank(i: int, disk: Disk, config: Path) -> SourceDisk:
    if not disk.size_bytes:
        raise ConfigError(f"disk {i} has neither a file nor a size", path=str(config))
    return SourceDisk(i, disk, None, empty_size=disk.size_bytes)


def _ova_disk(i: int, disk: Disk, ova: Path, hrefs: list[str | None]) -> SourceDisk:
    if disk.path is None:
        return _blank(i, disk, ova)
    if disk.path not in hrefs:
        raise ConfigError(f"disk {i}: {disk.path!r} is not a disk of the OVA", path=str(ova))
    return SourceDisk(i, disk, None, ova=ova, ova_disk=hrefs.index(disk.path))


def _open_gzip(path: Path, capacity: int) -> Chain:
    """A gzip-compressed disk file beside an .ovf (``ovf:compression="gzip"``).

    Inflated into an unlinked temporary file (bounded by the declared capacity, as the OVA
    reader does for members), then opened as the streamOptimized VMDK it must be.
    """
    from vmferry.disk.blockfile import BlockFile
    from vmferry.disk.ova import OvfDisk, OvfFile, TarMember, _inflate, _open_inner

    f = BlockFile.open(path, writable=False)
    try:
        member = TarMember(path.name, 0, f.size, "file")
        ref = OvfFile("file", path.name, None, "gzip", None)
        disk = OvfDisk("disk", "file", capacity, "", None, None)
        scratch = _inflate(f, member, ref, disk)
    finally:
        f.close()
    try:
        return Chain([_open_inner(scratch, str(path), path.name)])
    except BaseException:
        scratch.close()
        raise


def _open_xva(path: Path, ref: str, size: int) -> Chain:
    from vmferry.disk.blockfile import BlockFile
    from vmferry.migrate.xva import XvaDisk

    f = BlockFile.open(path, writable=False)
    try:
        return Chain([XvaDisk.open_vdi(f, ref, size)])
    except BaseException:
        f.close()
        raise


# --- finding disk files ---------------------------------------------------------------------------


def host_name(stored: str) -> str:
    """The file name a config's disk reference ends in, whatever host wrote it."""
    text = _DATASTORE.sub("", stored.strip())
    if not re.match(r"^[A-Za-z]:[\\/]", text):
        text = _STORAGE_PREFIX.sub("", text)
    return PureWindowsPath(text).name if "\\" in text else PurePosixPath(text).name


def locate_disk(stored: str, config: Path, root: Path, extra: list[Path]) -> Path:
    """The host file a config's disk reference means, inside the allowed folders only."""
    roots = [config.parent, root, *extra]
    text = _DATASTORE.sub("", stored.strip())
    outside: Path | None = None
    if not re.match(r"^[A-Za-z]:[\\/]", text) and "\\" not in text:
        text = _STORAGE_PREFIX.sub("", text)
        direct = Path(text) if os.path.isabs(text) else config.parent / text
        direct = Path(os.path.abspath(direct))
        if direct.is_file():
            if is_inside(direct, roots):
                return direct
            outside = direct
    name = host_name(stored)
    if name:
        for base in roots:
            hit = _find_by_name(base, name)
            if hit is not None:
                return hit
    if outside is not None:
        raise ConfigError(
            f"disk file {str(outside)!r} is outside the VM's folder; vmferry opens disks only "
            "there and in the directories you allow",
            path=str(config),
            hint=f"--allow-dir {outside.parent}",
        )
    raise ConfigError(
        f"disk file {stored!r} not found in the VM's folder",
        path=str(config),
        hint="copy it beside the config, or name its folder with --allow-dir DIR",
    )


def _walk(base: Path) -> list[Path]:
    """Files below ``base``, breadth first, bounded in depth and count; symlinks not followed."""
    out: list[Path] = []
    level = [base]
    seen = 0
    for _depth in range(MAX_WALK_DEPTH):
        nxt: list[Path] = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                seen += 1
                if seen > MAX_WALK_ENTRIES:
                    return out
                if e.is_dir(follow_symlinks=False):
                    nxt.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    out.append(Path(e.path))
        level = nxt
    return out


def _find_by_name(base: Path, name: str) -> Path | None:
    if not base.is_dir():
        return None
    want = name.lower()
    hits = [p for p in _walk(base) if p.name.lower() == want]
    return hits[0] if hits else None


def _probes_as_image(path: Path) -> bool:
    from vmferry.chain import open_layer

    try:
        layer = open_layer(path)
    except VmferryError:
        return False
    layer.close()
    return True


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "vm"
    return path.stem or "vm"


# --- saved memory state ---------------------------------------------------------------------------


def find_memory_state(src: Source) -> list[Path]:
    """Suspend/saved-state files of this VM (they cannot move to another hypervisor)."""
    if src.kind == "image":
        return []  # a bare image's folder may hold anything; nothing there is this VM's state
    found = [
        p
        for p in _walk(src.root)
        if p.suffix.lower() in MEMORY_STATE_SUFFIXES and p.suffix.lower() != ".save"
    ]
    # Hyper-V keeps the memory of a saved VM in <GUID>.bin beside its <GUID>.vsv
    found += [p.with_suffix(".bin") for p in found if p.suffix.lower() == ".vsv"]
    if src.kind == "libvirt":  # virsh managedsave keeps it outside the config folder
        managed = Path("/var/lib/libvirt/qemu/save") / f"{src.model.name}.save"
        found.append(managed)
    return sorted({p for p in found if p.is_file()})
