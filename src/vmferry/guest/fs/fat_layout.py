"""FAT12/16/32 on-disk geometry: the boot sector's BPB, validated, and the FAT32 FSInfo sector.

Everything else in a FAT volume is found from the BPB (BIOS parameter block), so every field is
bounded here before any other structure is read: a hostile boot sector must not make vmferry
seek past the partition or allocate a FAT of gigabytes.  The FAT type is decided by the count of
data clusters, as the Microsoft specification says (under 4085: FAT12, under 65525: FAT16, else
FAT32), never by the ``FAT12``/``FAT16``/``FAT32`` label string, which is only a comment.  One
exception, where the count and the layout disagree: a BPB with the FAT32 layout (16-bit FAT size
0, no fixed root directory) but fewer than 65525 clusters is FAT32, because the Linux kernel, UEFI
firmware and dosfstools all read it so (``Geometry.warning`` says it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmferry.guest.errors import CorruptGuestError, GuestLimitError, UnsupportedGuestFeatureError

FAT12_MAX_CLUSTERS = 4084  # a volume with fewer than 4085 clusters is FAT12
FAT16_MAX_CLUSTERS = 65524  # fewer than 65525: FAT16
FAT32_MAX_CLUSTERS = 0x0FFFFFF5  # cluster numbers stop below the bad-cluster mark 0x0FFFFFF7
MAX_FAT_BYTES = 128 << 20  # one FAT copy is read whole; a bigger one is no ESP or /boot
BOOT_DIRTY = 0x01  # bit 0 of the boot sector's "reserved" byte: set while Linux has it mounted

# FAT[1] flags (FAT16/FAT32 only): a cleared bit means "not cleanly unmounted" / "I/O errors seen"
FAT16_CLEAN, FAT16_NO_ERROR = 0x8000, 0x4000
FAT32_CLEAN, FAT32_NO_ERROR = 0x08000000, 0x04000000

FSINFO_LEAD, FSINFO_STRUC, FSINFO_TRAIL = 0x41615252, 0x61417272, 0xAA550000
FSINFO_UNKNOWN = 0xFFFFFFFF


@dataclass(frozen=True)
class Geometry:
    """Where everything is, in bytes from the start of the volume, plus the identity fields."""

    bytes_per_sector: int
    sectors_per_cluster: int
    reserved_sectors: int
    num_fats: int
    root_entries: int  # FAT12/16 fixed root directory size in entries; 0 on FAT32
    total_sectors: int
    fat_sectors: int  # sectors per FAT copy
    fat_bits: int  # 12, 16 or 32, from the cluster count
    cluster_count: int  # data clusters; valid cluster numbers are 2 .. cluster_count + 1
    root_cluster: int  # FAT32 only (0 on FAT12/16)
    fsinfo_sector: int  # FAT32 only; 0 when absent
    backup_boot_sector: int  # FAT32 only; 0 when absent
    ext_flags: int  # FAT32 only: bit 7 = mirroring off, bits 0-3 = active FAT
    media: int
    state_offset: int  # byte of the boot sector holding the dirty flag
    serial: int | None  # volume ID, None when the extended boot signature is absent
    boot_label: str  # label in the boot sector ("" for none or "NO NAME")
    warning: str | None = None  # a legal but unusual geometry worth reporting

    @property
    def cluster_size(self) -> int:
        return self.bytes_per_sector * self.sectors_per_cluster

    @property
    def fat_bytes(self) -> int:
        return self.fat_sectors * self.bytes_per_sector

    @property
    def fat_used_bytes(self) -> int:
        """Bytes of one FAT copy that hold entries 0 .. cluster_count + 1."""
        return ((self.cluster_count + 2) * self.fat_bits + 7) // 8

    def fat_offset(self, copy: int) -> int:
        return (self.reserved_sectors + copy * self.fat_sectors) * self.bytes_per_sector

    @property
    def root_dir_offset(self) -> int:
        """FAT12/16: start of the fixed root directory region."""
        return self.fat_offset(self.num_fats)

    @property
    def root_dir_bytes(self) -> int:
        return self.root_entries * 32

    @property
    def data_offset(self) -> int:
        root_sectors = -(-self.root_dir_bytes // self.bytes_per_sector)
        return self.root_dir_offset + root_sectors * self.bytes_per_sector

    def cluster_offset(self, cluster: int) -> int:
        if not 2 <= cluster <= self.cluster_count + 1:
            raise CorruptGuestError(f"FAT cluster {cluster} is outside 2..{self.cluster_count + 1}")
        return self.data_offset + (cluster - 2) * self.cluster_size

    @property
    def end_of_chain(self) -> int:
        """Lowest value meaning end of chain; one below it is the bad-cluster mark."""
        return {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.fat_bits]

    @property
    def uuid(self) -> str:
        """The volume ID the way blkid and fstab's UUID= spell it."""
        if self.serial is None:
            return ""
        return f"{self.serial >> 16:04X}-{self.serial & 0xFFFF:04X}"


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_boot_sector(raw: bytes, device_size: int) -> Geometry:
    """Validate the BPB in ``raw`` (the first 512+ bytes) against a ``device_size``-byte volume."""
    if len(raw) < 512:
        raise CorruptGuestError("too small to hold a FAT boot sector")
    if raw[510:512] != b"\x55\xaa":
        raise CorruptGuestError("no FAT boot sector (missing 55 AA signature)")
    (bps, spc, rsvd, nfats, root_ent, tot16, media, fatsz16) = struct.unpack_from(
        "<HBHBHHBH", raw, 11
    )
    (tot32,) = struct.unpack_from("<I", raw, 32)
    if bps not in (512, 1024, 2048, 4096):
        raise CorruptGuestError(f"FAT bytes per sector {bps} is not 512..4096 and a power of two")
    if not _pow2(spc) or spc > 128:
        raise CorruptGuestError(f"FAT sectors per cluster {spc} is not a power of two up to 128")
    if rsvd < 1:
        raise CorruptGuestError("FAT reserved sector count is 0 (the boot sector is reserved)")
    if not 1 <= nfats <= 4:
        raise CorruptGuestError(f"{nfats} FAT copies is impossible (1..4)")
    if media != 0xF0 and media < 0xF8:
        raise CorruptGuestError(f"FAT media byte {media:#04x} is not a valid media type")
    total = tot16 or tot32
    if total == 0:
        raise CorruptGuestError("FAT total sector count is 0")
    if total * bps > device_size:
        raise CorruptGuestError(
            f"FAT volume claims {total} sectors of {bps} bytes, more than the "
            f"{device_size}-byte partition holds"
        )
    fat32_layout = fatsz16 == 0
    fat_sectors = fatsz16
    root_cluster = fsinfo = backup = ext_flags = 0
    if fat32_layout:
        (fat_sectors, ext_flags, version, root_cluster, fsinfo, backup) = struct.unpack_from(
            "<IHHIHH", raw, 36
        )
        if version != 0:
            raise UnsupportedGuestFeatureError(
                f"FAT32 version {version >> 8}.{version & 0xFF} (only 0.0 is defined)",
                features=[f"fat32-version-{version:#06x}"],
            )
        if root_ent != 0:
            raise CorruptGuestError("FAT32 boot sector with a fixed root directory size")
    if fat_sectors == 0:
        raise CorruptGuestError("FAT size is 0 sectors")
    if fat_sectors * bps > MAX_FAT_BYTES:
        raise GuestLimitError(f"a FAT of {fat_sectors * bps} bytes is past vmferry's limit")
    root_sectors = -(-root_ent * 32 // bps)
    meta = rsvd + nfats * fat_sectors + root_sectors
    if meta >= total:
        raise CorruptGuestError("FAT reserved area, FATs and root directory fill the whole volume")
    clusters = (total - meta) // spc
    if clusters < 1:
        raise CorruptGuestError("FAT volume has no data cluster")
    if fat32_layout:
        # Linux, UEFI firmware (EDK2) and dosfstools all take this layout as FAT32 whatever the
        # count; mkfs.fat makes such volumes (with a warning), so they exist in the wild.
        bits = 32
    elif clusters <= FAT12_MAX_CLUSTERS:
        bits = 12
    elif clusters <= FAT16_MAX_CLUSTERS:
        bits = 16
    else:
        raise CorruptGuestError(
            f"FAT12/16 boot sector layout with {clusters} clusters, more than FAT16 addresses"
        )
    if bits == 32 and clusters > FAT32_MAX_CLUSTERS:
        raise CorruptGuestError(f"{clusters} FAT32 clusters is more than cluster numbers reach")
    if (clusters + 2) * bits > fat_sectors * bps * 8:
        raise CorruptGuestError(
            f"a FAT of {fat_sectors} sectors cannot hold {clusters} FAT{bits} entries"
        )
    if bits != 32 and root_ent == 0:
        raise CorruptGuestError(f"FAT{bits} volume without a root directory")
    if bits == 32:
        if not 2 <= root_cluster <= clusters + 1:
            raise CorruptGuestError(f"FAT32 root cluster {root_cluster} is outside the volume")
        fsinfo = fsinfo if 0 < fsinfo < rsvd else 0  # 0 and 0xFFFF both mean "none"
        backup = backup if 0 < backup < rsvd else 0
    ext = 64 if bits == 32 else 36
    sig = raw[ext + 2]
    serial = struct.unpack_from("<I", raw, ext + 3)[0] if sig in (0x28, 0x29) else None
    label = ""
    if sig == 0x29:
        label = raw[ext + 7 : ext + 18].decode("cp437").rstrip(" \0")
        label = "" if label == "NO NAME" else label
    return Geometry(
        bytes_per_sector=bps,
        sectors_per_cluster=spc,
        reserved_sectors=rsvd,
        num_fats=nfats,
        root_entries=root_ent,
        total_sectors=total,
        fat_sectors=fat_sectors,
        fat_bits=bits,
        cluster_count=clusters,
        root_cluster=root_cluster,
        fsinfo_sector=fsinfo,
        backup_boot_sector=backup,
        ext_flags=ext_flags,
        media=media,
        state_offset=ext + 1,
        serial=serial,
        boot_label=label,
        warning=(
            f"FAT32 with only {clusters} clusters (the specification wants 65525 or more)"
            if bits == 32 and clusters <= FAT16_MAX_CLUSTERS
            else None
        ),
    )


@dataclass(frozen=True)
class FsInfo:
    """FAT32's free-cluster hints; only trusted when all three signatures are right."""

    free_count: int
    next_free: int

    @classmethod
    def parse(cls, raw: bytes) -> FsInfo | None:
        if len(raw) < 512:
            return None
        lead, struc, free, nxt, trail = (
            struct.unpack_from("<I", raw, 0)[0],
            *struct.unpack_from("<III", raw, 484),
            struct.unpack_from("<I", raw, 508)[0],
        )
        if (lead, struc, trail) != (FSINFO_LEAD, FSINFO_STRUC, FSINFO_TRAIL):
            return None
        return cls(free, nxt)

    def pack_into(self, buf: bytearray) -> None:
        struct.pack_into("<II", buf, 488, self.free_count, self.next_free)
