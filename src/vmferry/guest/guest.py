"""A guest as the fix rules see it: its filesystems, its root, and paths across mount points.

``open_guest`` probes every partition (or the whole disk when it has no table), finds the root
filesystem (the one with ``/etc/fstab`` and an OS release file), then reads the root's fstab to
mount the other filesystems it can identify (a separate ``/boot`` above all), so
``guest.read_file("/boot/grub/grub.cfg")`` reads from the right partition.  Nothing is mounted on
the host; a "mount" is an entry in a table here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.errors import GuestError, InspectionError
from vmferry.guest.fs.probe import FsSignature, open_filesystem, probe
from vmferry.guest.fs.types import DirEntry, GuestFileNotFound, GuestFS, Stat
from vmferry.guest.linux.devices import classify, is_first_disk, kernel_partition
from vmferry.guest.linux.parse import FstabEntry, parse_fstab
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


@dataclass
class GuestFilesystem:
    """A filesystem (or other signature) found on a partition of the image."""

    partition: Partition | None  # None: the whole disk holds it
    device: Slice
    signature: FsSignature | None
    fs: GuestFS | None = None  # a path-level reader, when vmferry reads this type
    error: str | None = None  # why it could not be opened

    @property
    def uuid(self) -> str | None:
        return self.signature.uuid if self.signature else None

    @property
    def label(self) -> str | None:
        return self.signature.label if self.signature else None

    @property
    def type(self) -> str | None:
        return self.signature.type if self.signature else None

    def to_json(self) -> dict[str, object]:
        p = self.partition
        return {
            "partition": p.index if p else None,
            "start": p.start if p else 0,
            "size": p.size if p else self.device.virtual_size,
            "partition_type": p.type if p else None,
            "partuuid": p.uuid if p else None,
            "type": self.type,
            "uuid": self.uuid,
            "label": self.label,
            "readable": self.fs is not None,
            "error": self.error,
        }


@dataclass
class Guest:
    disk: ReadableDisk
    table: PartitionTable
    filesystems: list[GuestFilesystem]
    root: GuestFilesystem
    mounts: dict[str, GuestFilesystem] = field(default_factory=dict)
    fstab: list[FstabEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # --- which filesystem a name or path means ---------------------------------------------------

    def resolve_device(self, spec: str) -> GuestFilesystem | None:
        """The filesystem in this image that a guest device reference points at, if any."""
        kind = classify(spec)
        value = spec.split("=", 1)[1] if "=" in spec and not spec.startswith("/") else None
        if value is None and kind in ("uuid", "label", "partuuid", "partlabel"):
            value = spec.rsplit("/", 1)[1]
        if value is not None:
            value = value.strip("\"'")
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
                if number is None and gfs.partition is None:
                    return gfs
                if gfs.partition is not None and gfs.partition.index == number:
                    return gfs
        return None

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
    return table, found


def open_guest(disk: ReadableDisk) -> Guest:
    """Find the root filesystem and mount what its fstab names (read-only view)."""
    table, filesystems = find_filesystems(disk)
    roots = [g for g in filesystems if g.fs is not None and _looks_like_root(g.fs)]
    if not roots:
        errors = [
            f"partition {g.partition.index if g.partition else '-'}: {g.error}"
            for g in filesystems
            if g.error
        ]
        raise InspectionError(
            "no Linux root filesystem found (none holds /etc/fstab and an OS release file)"
            + (f"; {'; '.join(errors)}" if errors else ""),
            hint="LVM, XFS and btrfs roots are not read yet",
        )
    guest = Guest(disk, table, filesystems, roots[0], warnings=list(table.warnings))
    if len(roots) > 1:
        guest.warnings.append(f"{len(roots)} root filesystems found; inspecting the first")
    guest.mounts["/"] = roots[0]
    try:
        guest.fstab = parse_fstab(roots[0].fs.read_file("/etc/fstab").decode("utf-8", "replace"))
    except GuestError as exc:
        guest.warnings.append(f"/etc/fstab unreadable: {exc}")
    for entry in guest.fstab:
        if not entry.mountpoint.startswith("/") or entry.mountpoint == "/":
            continue
        target = guest.resolve_device(entry.spec)
        if target is not None and target is not roots[0]:
            guest.mounts[entry.mountpoint.rstrip("/") or "/"] = target
    return guest


def _looks_like_root(fs: GuestFS) -> bool:
    try:
        return fs.exists("/etc/fstab") and any(fs.exists(p) for p in RELEASE_FILES)
    except GuestError:
        return False
