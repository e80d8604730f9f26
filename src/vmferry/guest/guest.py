"""A guest as the fix rules see it: its filesystems, its root, and paths across mount points.

``open_guest`` probes every partition (or the whole disk when it has no table), finds the root
filesystem (the one with ``/etc/fstab`` and an OS release file), then reads the root's fstab to
mount the other filesystems it can identify (a separate ``/boot`` above all), so
``guest.read_file("/boot/grub/grub.cfg")`` reads from the right partition.  Nothing is mounted on
the host; a "mount" is an entry in a table here.

LVM physical volumes among the partitions are assembled (``vmferry.guest.lvm``) and every
visible linear or striped logical volume is probed like a partition, so a Red Hat style root on
``/dev/VolGroup00/LogVol00`` is found, named in fstab either way (``/dev/VG/LV`` or
``/dev/mapper/VG-LV``) and written through the overlay.  On btrfs, subvolumes are considered
for the root, and fstab's ``subvol=``/``subvolid=`` options pick the subvolume a mount shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import GuestError, InspectionError
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.fs.probe import FsSignature, open_filesystem, probe
from vmferry.guest.fs.types import DirEntry, GuestFileNotFound, GuestFS, Stat
from vmferry.guest.linux.devices import classify, is_first_disk, kernel_partition, lvm_name
from vmferry.guest.linux.parse import FstabEntry, parse_fstab
from vmferry.guest.lvm import LvmScan, scan_lvm
from vmferry.guest.overlay import ReadableDisk, Slice
from vmferry.guest.partitions import Partition, PartitionTable, read_partition_table

RELEASE_FILES = (
    "/etc/os-release",
    "/usr/lib/os-release",
    "/etc/redhat-release",
    "/etc/SuSE-release",
    "/etc/debian_version",
    "/etc/lsb-release",
)


#: btrfs subvolumes looked at when searching for the root (snapper keeps hundreds of snapshots).
MAX_SUBVOLUME_ROOTS = 64


@dataclass
class GuestFilesystem:
    """A filesystem (or other signature) on a partition, the whole disk or an LVM volume."""

    partition: Partition | None  # None: the whole disk holds it, or an LV (see ``lv``)
    device: ReadableDisk | None  # None: an LV that cannot be mapped (see ``error``)
    signature: FsSignature | None
    fs: GuestFS | None = None  # a path-level reader, when vmferry reads this type
    error: str | None = None  # why it could not be opened
    lv: str | None = None  # "VG/LV" for a filesystem on a logical volume
    subvolume: str | None = None  # btrfs: the subvolume this view shows (root, mounts)

    @property
    def uuid(self) -> str | None:
        return self.signature.uuid if self.signature else None

    @property
    def label(self) -> str | None:
        return self.signature.label if self.signature else None

    @property
    def type(self) -> str | None:
        return self.signature.type if self.signature else None

    @property
    def where(self) -> int | str | None:
        """How inspection names it: partition number, "VG/LV", or None for the whole disk."""
        return self.partition.index if self.partition else self.lv

    def to_json(self) -> dict[str, object]:
        p = self.partition
        size = self.device.virtual_size if self.device is not None else None
        out: dict[str, object] = {
            "partition": p.index if p else None,
            "start": p.start if p else (None if self.lv else 0),
            "size": p.size if p else size,
            "partition_type": p.type if p else None,
            "partuuid": p.uuid if p else None,
            "lv": self.lv.split("/", 1)[1] if self.lv else None,
            "vg": self.lv.split("/", 1)[0] if self.lv else None,
            "type": self.type,
            "uuid": self.uuid,
            "label": self.label,
            "readable": self.fs is not None,
            "error": self.error,
        }
        if self.subvolume is not None:
            out["subvolume"] = self.subvolume
        return out


@dataclass
class Guest:
    disk: ReadableDisk
    table: PartitionTable
    filesystems: list[GuestFilesystem]
    root: GuestFilesystem
    mounts: dict[str, GuestFilesystem] = field(default_factory=dict)
    fstab: list[FstabEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lvm: LvmScan = field(default_factory=LvmScan)

    # --- which filesystem a name or path means ---------------------------------------------------

    def resolve_device(self, spec: str) -> GuestFilesystem | None:
        """The filesystem in this image that a guest device reference points at, if any."""
        kind = classify(spec)
        value = spec.split("=", 1)[1] if "=" in spec and not spec.startswith("/") else None
        if value is None and kind in ("uuid", "label", "partuuid", "partlabel"):
            value = spec.rsplit("/", 1)[1]
        if value is not None:
            value = value.strip("\"'")
        if kind in ("lvm", "mapper"):
            return self._resolve_lv(spec)
        for gfs in self.filesystems:
            p = gfs.partition
            if kind == "uuid" and gfs.uuid and gfs.uuid.lower() == (value or "").lower():
                return gfs
            if kind == "label" and gfs.label is not None and gfs.label == value:
                return gfs
            if kind == "partuuid" and p and p.uuid and p.uuid.lower() == (value or "").lower():
                return gfs
            if kind == "partlabel" and p and p.name == value:
                return gfs
        if kind == "path":
            named = kernel_partition(spec)
            if named is None or not is_first_disk(named[0]):
                return None
            number = named[1]
            for gfs in self.filesystems:
                if number is None and gfs.partition is None and gfs.lv is None:
                    return gfs
                if gfs.partition is not None and gfs.partition.index == number:
                    return gfs
        return None

    def _resolve_lv(self, spec: str) -> GuestFilesystem | None:
        """``/dev/VG/LV``, ``/dev/mapper/VG-LV``, ``/dev/disk/by-id/dm-name-VG-LV`` or
        ``dm-uuid-LVM-<VG UUID><LV UUID>`` (UUIDs without dashes)."""
        if spec.startswith("/dev/disk/by-id/dm-uuid-LVM-"):
            ids = spec[len("/dev/disk/by-id/dm-uuid-LVM-") :]
            for vg in self.lvm.volume_groups:
                for lv in vg.lvs.values():
                    if ids == (vg.uuid + lv.uuid).replace("-", ""):
                        return self._resolve_lv(f"/dev/{vg.name}/{lv.name}")
            return None
        names = lvm_name(spec)
        if names is None:
            return None
        wanted = f"{names[0]}/{names[1]}"
        matches = [g for g in self.filesystems if g.lv == wanted]
        return matches[0] if len(matches) == 1 else None  # two VGs of one name: ambiguous

    def locate(self, path: str) -> tuple[GuestFilesystem, str]:
        """The filesystem holding ``path`` and the path inside it (longest mount point wins)."""
        if not path.startswith("/"):
            raise GuestError(f"guest paths are absolute: {path!r}")
        best = "/"
        for mp in self.mounts:
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
                best = mp
        gfs = self.mounts.get(best, self.root)
        inner = path[len(best.rstrip("/")) :] or "/"
        return gfs, inner

    def _fs(self, path: str) -> tuple[GuestFS, str]:
        gfs, inner = self.locate(path)
        if gfs.fs is None:
            raise GuestFileNotFound(
                f"the filesystem mounted there ({gfs.type}) is not readable", path=path
            )
        return gfs.fs, inner

    # --- the GuestFS interface across mounts ------------------------------------------------------

    def read_file(self, path: str, limit: int = 256 << 20) -> bytes:
        fs, inner = self._fs(path)
        return fs.read_file(inner, limit)

    def read_text(self, path: str, limit: int = 4 << 20) -> str:
        return self.read_file(path, limit).decode("utf-8", "surrogateescape")

    def read_head(self, path: str, length: int) -> bytes:
        fs, inner = self._fs(path)
        return fs.read_head(inner, length)

    def listdir(self, path: str) -> list[DirEntry]:
        fs, inner = self._fs(path)
        return fs.listdir(inner)

    def stat(self, path: str) -> Stat:
        fs, inner = self._fs(path)
        return fs.stat(inner)

    def exists(self, path: str) -> bool:
        try:
            fs, inner = self._fs(path)
            return fs.exists(inner)
        except GuestError:
            return False

    def lexists(self, path: str) -> bool:
        """Like ``exists`` but true for a dangling symlink too."""
        try:
            fs, inner = self._fs(path)
            fs.stat(inner, follow=False)
            return True
        except GuestError:
            return False

    def readlink(self, path: str) -> str:
        fs, inner = self._fs(path)
        return fs.readlink(inner)

    def try_read_text(self, path: str, limit: int = 4 << 20) -> str | None:
        """The file's text, or None when it is missing or unreadable (inspection never stops)."""
        try:
            return self.read_text(path, limit)
        except GuestError:
            return None

    def try_listdir(self, path: str) -> list[DirEntry]:
        try:
            return self.listdir(path)
        except GuestError:
            return []


def find_filesystems(disk: ReadableDisk) -> tuple[PartitionTable, list[GuestFilesystem]]:
    """Every partition (or the whole disk) and every LVM logical volume, probed."""
    table, found, _ = scan_disk(disk)
    return table, found


def scan_disk(disk: ReadableDisk) -> tuple[PartitionTable, list[GuestFilesystem], LvmScan]:
    """``find_filesystems`` plus the LVM picture (VGs, PVs, warnings) for inspection."""
    table = read_partition_table(disk)
    found: list[GuestFilesystem] = []
    spots: list[tuple[Partition | None, int, int]]
    if table.scheme == "none":
        spots = [(None, 0, disk.virtual_size)]
    else:
        spots = [(p, p.start, p.size) for p in table.filesystems()]
    for part, start, size in spots:
        dev = Slice(disk, start, size)
        gfs = GuestFilesystem(part, dev, None)
        try:
            gfs.signature = probe(dev)
            gfs.fs = open_filesystem(dev, gfs.signature)
        except GuestError as exc:
            gfs.error = str(exc)
        found.append(gfs)
    candidates = [
        (g.device, g.partition.index if g.partition else None)
        for g in found
        if g.type == "LVM2_member" and g.device is not None
    ]
    lvm = scan_lvm(candidates) if candidates else LvmScan()
    for vg in lvm.volume_groups:
        for lv in vg.lvs.values():
            if not lv.visible:
                continue  # RAID images, thin pools' data, snapshot stores: parts of others
            gfs = GuestFilesystem(None, None, None, lv=f"{vg.name}/{lv.name}")
            try:
                lv_disk = lvm.open_lv(vg, lv)
                gfs.device = lv_disk
                gfs.signature = probe(lv_disk)
                gfs.fs = open_filesystem(lv_disk, gfs.signature)
                if gfs.fs is not None and lv_disk.read_only_reason:
                    gfs.fs = _ReadOnlyFS(gfs.fs, lv_disk.read_only_reason)  # type: ignore[assignment]
            except GuestError as exc:
                gfs.error = str(exc)
            found.append(gfs)
    return table, found, lvm


def open_guest(disk: ReadableDisk) -> Guest:
    """Find the root filesystem and mount what its fstab names (read-only view)."""
    table, filesystems, lvm = scan_disk(disk)
    roots: list[GuestFilesystem] = []
    for g in filesystems:
        root = _root_view(g)
        if root is not None:
            roots.append(root)
    if not roots:
        errors = [f"{_name(g)}: {g.error}" for g in filesystems if g.error]
        raise InspectionError(
            "no Linux root filesystem found (none holds /etc/fstab and an OS release file)"
            + (f"; {'; '.join(errors)}" if errors else ""),
            hint="vmferry reads roots on ext2/3/4, XFS and btrfs, on partitions and on linear or "
            "striped LVM volumes; LUKS, MD RAID and thin/RAID LVM roots are not read yet",
        )
    guest = Guest(disk, table, filesystems, roots[0], warnings=list(table.warnings), lvm=lvm)
    guest.warnings.extend(lvm.warnings)
    if len(roots) > 1:
        guest.warnings.append(f"{len(roots)} root filesystems found; inspecting the first")
    guest.mounts["/"] = roots[0]
    assert roots[0].fs is not None
    try:
        guest.fstab = parse_fstab(roots[0].fs.read_file("/etc/fstab").decode("utf-8", "replace"))
    except GuestError as exc:
        guest.warnings.append(f"/etc/fstab unreadable: {exc}")
    for entry in guest.fstab:
        if not entry.mountpoint.startswith("/") or entry.mountpoint == "/":
            continue
        target = guest.resolve_device(entry.spec)
        if target is None:
            continue
        view = _subvolume_mount(target, entry.options, guest.warnings, entry.mountpoint)
        if view is not None and view is not roots[0]:
            guest.mounts[entry.mountpoint.rstrip("/") or "/"] = view
    return guest


def _name(g: GuestFilesystem) -> str:
    if g.lv:
        return f"LV {g.lv}"
    return f"partition {g.partition.index}" if g.partition else "disk"


class _ReadOnlyFS:
    """A filesystem reader whose writes are refused up front (its LV has snapshots)."""

    def __init__(self, fs: GuestFS, reason: str) -> None:
        self._fs = fs
        self._reason = reason

    def __getattr__(self, name: str) -> Any:
        if name in ("write_file", "create_file", "symlink", "check_creatable"):
            raise GuestWriteRefusedError(self._reason, hint="nothing was written")
        return getattr(self._fs, name)

    def check_writable(self) -> None:
        raise GuestWriteRefusedError(self._reason, hint="nothing was written")


# --- btrfs subvolumes (read through BtrfsFilesystem.subvolumes/open_subvolume when present) --


def _subvolume_names(fs: GuestFS) -> list[tuple[str, Any]]:
    """(path, handle for open_subvolume) per subvolume, snapshots last, bounded."""
    lister = getattr(fs, "subvolumes", None)
    if lister is None:
        return []
    try:
        items = list(lister())
    except GuestError:
        return []
    ranked: list[tuple[tuple[bool, int, str], str, Any]] = []
    for item in items:
        if isinstance(item, str):
            path, handle, readonly = item, item, False
        else:
            path = str(getattr(item, "path", "") or "")
            sid = getattr(item, "id", None)
            handle = sid if sid is not None else path
            readonly = bool(getattr(item, "readonly", False))
        path = path.strip("/") or "/"
        snapshot = readonly or ".snapshots" in path.split("/")
        ranked.append(((snapshot, path.count("/"), path), path, handle))
    ranked.sort(key=lambda r: r[0])
    return [(path, handle) for _, path, handle in ranked[:MAX_SUBVOLUME_ROOTS]]


def _root_view(g: GuestFilesystem) -> GuestFilesystem | None:
    """``g`` itself when it holds a root, else its first btrfs subvolume that does."""
    if g.fs is None:
        return None
    if _looks_like_root(g.fs):
        return g
    opener = getattr(g.fs, "open_subvolume", None)
    if opener is None:
        return None
    for path, handle in _subvolume_names(g.fs):
        try:
            view = opener(handle)
        except GuestError:
            continue
        if _looks_like_root(view):
            return dataclasses.replace(g, fs=view, subvolume=path)
    return None


def _subvolume_mount(
    target: GuestFilesystem, options: str, warnings: list[str], mountpoint: str
) -> GuestFilesystem | None:
    """The view an fstab line mounts: ``subvol=``/``subvolid=`` choose a btrfs subvolume."""
    opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in options.split(","))
    wanted: Any = None
    if "subvolid" in opts:
        try:
            wanted = int(opts["subvolid"])
        except ValueError:
            warnings.append(f"{mountpoint}: subvolid={opts['subvolid']} is not a number")
            return None
    elif "subvol" in opts:
        wanted = opts["subvol"]
    if wanted is None:
        return target
    opener = getattr(target.fs, "open_subvolume", None)
    if opener is None:
        if target.fs is not None:
            warnings.append(f"{mountpoint}: subvolumes of {target.type} are not read")
        return None
    try:
        view = opener(wanted)
    except GuestError as exc:
        warnings.append(f"{mountpoint}: btrfs subvolume {wanted}: {exc}")
        return None
    label = str(wanted).strip("/") or "/"
    if isinstance(wanted, int):
        label = next((p for p, h in _subvolume_names(target.fs) if h == wanted), f"id {wanted}")
    return dataclasses.replace(target, fs=view, subvolume=label)


def _looks_like_root(fs: GuestFS) -> bool:
    try:
        return fs.exists("/etc/fstab") and any(fs.exists(p) for p in RELEASE_FILES)
    except GuestError:
        return False
