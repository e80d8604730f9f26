"""OVA: a tar holding an OVF descriptor, a manifest and the disks (streamOptimized VMDKs).

Reading never extracts: the tar headers are parsed here (ustar, GNU long names and base-256
sizes, pax ``path``/``size``), every member name is only ever *compared* with the OVF's
``href``s and never used as a filesystem path, and the chosen disk is opened by the VMDK driver
through a read-only ``BlockFile.slice`` of its member.  A gzip-compressed disk
(``ovf:compression="gzip"``) is inflated into an unlinked temporary file, bounded by what the
OVF declares.

Writing (``vmferry convert SRC out.ova``): the disk is streamed into a streamOptimized VMDK in
a hidden temporary directory beside the output; ``flush`` assembles the archive in the order
the OVF specification asks for: descriptor, manifest (SHA256), disk.

``vmferry.open("x.ova")`` opens the first disk that has a file; :func:`open_ova_disk` opens
another one, :func:`list_ova_disks` lists them.  See docs/formats/ova.md.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from xml.sax.saxutils import escape, quoteattr

from vmferry.disk.base import CheckReport, DiskFormat, Extent, ParentInfo
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.deflate import zlib
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    PathEscapeError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    UsageError,
    VmferryError,
)

BLOCK = 512
MAX_MEMBERS = 10_000
MAX_LONG_NAME = 4096  # a GNU long-name or pax header bigger than this is hostile
MAX_PAX = 64 * 1024
MAX_OVF_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 1 << 20
#: slack allowed over the declared capacity when inflating a gzip member (VMDK metadata)
GZIP_SLACK = 64 << 20
OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
VMDK_STREAM_FORMAT = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
KDMV = b"KDMV"
_TEMP_NAME = re.compile(r"^\.(.+)\.vmferry-[0-9a-f]+$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UNITS = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.IGNORECASE)


# --- tar --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarMember:
    name: str  # as stored (normalised: no leading "./"); never used as a filesystem path
    offset: int  # of the data
    size: int
    kind: str  # "file", "dir", "link", "sparse" or "other"


def _tar_number(field_: bytes, what: str, path: str) -> int:
    """Octal ASCII, or GNU base-256 (first byte 0x80) for values that do not fit."""
    if field_ and field_[0] & 0x80:
        if field_[0] != 0x80:
            raise CorruptImageError(f"tar {what} is a negative base-256 number", path=path)
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptImageError(f"tar {what} {text[:16]!r} is not a number", path=path) from None


def _checksum_ok(header: bytes, path: str) -> bool:
    try:
        stored = _tar_number(header[148:156], "header checksum", path)
    except CorruptImageError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def _parse_pax(data: bytes, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptImageError("malformed pax header record", path=path) from None
        if length <= 0 or pos + length > len(data):
            raise CorruptImageError("malformed pax header record length", path=path)
        record = data[space + 1 : pos + length].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def read_tar_index(f: BlockFile, max_members: int = MAX_MEMBERS) -> list[TarMember]:
    """Every member's name, data offset and size, reading only the 512-byte headers.

    ``max_members``: an XVA holds two members per MiB of disk data, far more than an OVA.
    """
    path = str(f.path)
    members: list[TarMember] = []
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if pos + BLOCK > f.size:
            if pos == f.size and members:
                break  # no end-of-archive blocks: GNU tar accepts it, so do we
            raise TruncatedImageError(
                f"OVA (tar) archive ends inside a header at {pos}", path=path, offset=pos
            )
        header = f.read_exact(pos, BLOCK, "tar header")
        if header == bytes(BLOCK):
            break
        if not _checksum_ok(header, path):
            if not members:
                raise NotThisFormatError("not a tar archive (bad header checksum)", path=path)
            raise CorruptImageError("tar header checksum mismatch", path=path, offset=pos)
        size = _tar_number(header[124:136], "member size", path)
        kind_flag = header[156:157]
        data_at = pos + BLOCK
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise CorruptImageError("pax size is not a number", path=path) from None
        if data_at + size > f.size:
            raise TruncatedImageError(
                f"tar member at {pos} claims {size} bytes, past the end of the archive",
                path=path,
                offset=pos,
            )
        next_pos = data_at + -(-size // BLOCK) * BLOCK
        if kind_flag in (b"L", b"x", b"g", b"K"):
            limit = MAX_LONG_NAME if kind_flag in (b"L", b"K") else MAX_PAX
            if size > limit:
                raise ResourceLimitError(
                    f"tar extension header of {size} bytes (limit {limit})", path=path, offset=pos
                )
            data = f.read_exact(data_at, size, "tar extension header")
            if kind_flag == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind_flag == b"x":
                pax = _parse_pax(data, path)
            pos = next_pos
            continue
        name = long_name or pax.get("path") or _ustar_name(header)
        long_name, pax = None, {}
        members.append(TarMember(_normalise(name), data_at, size, _kind(kind_flag)))
        if len(members) > max_members:
            raise ResourceLimitError(f"archive has more than {max_members} members", path=path)
        pos = next_pos
    return members


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _kind(flag: bytes) -> str:
    if flag in (b"0", b"\0", b"7"):
        return "file"
    if flag == b"5":
        return "dir"
    if flag in (b"1", b"2"):
        return "link"
    if flag == b"S":
        return "sparse"
    return "other"


def _check_member_name(name: str, path: str) -> None:
    """Names that would escape an extraction directory mark a hostile archive."""
    if not name or "\0" in name:
        raise CorruptImageError("tar member with an empty name", path=path)
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise PathEscapeError(
            f"OVA member name {name[:200]!r} points outside the archive",
            path=path,
            hint="the archive was crafted to write outside an extraction directory; do not "
            "extract it with tools that trust member names",
        )


# --- OVF --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OvfFile:
    file_id: str
    href: str
    size: int | None
    compression: str | None
    chunk_size: int | None


@dataclass(frozen=True)
class OvfDisk:
    disk_id: str
    file_ref: str | None
    capacity: int
    format: str
    populated_size: int | None
    parent_ref: str | None


@dataclass
class OvfDescriptor:
    files: dict[str, OvfFile] = field(default_factory=dict)
    disks: list[OvfDisk] = field(default_factory=list)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: Any, name: str) -> str | None:
    for key, value in el.attrib.items():
        if _local(key) == name:
            return str(value)
    return None


def _int_attr(el: Any, name: str, path: str) -> int | None:
    value = _attr(el, name)
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise CorruptImageError(f"OVF {name} {value[:40]!r} is not a number", path=path) from None
    if number < 0:
        raise CorruptImageError(f"OVF {name} is negative", path=path)
    return number


def _units(text: str | None, path: str) -> int:
    if text is None:
        return 1
    m = _UNITS.match(text)
    if m is None:
        raise UnsupportedFeatureError(
            f"OVF capacity unit {text[:40]!r} is not understood", path=path
        )
    if m.group(1) is None:
        return 1
    base, exp = int(m.group(1)), int(m.group(2))
    if base > 1024 or exp > 64:
        raise CorruptImageError(f"OVF capacity unit {text[:40]!r} is absurd", path=path)
    return int(base**exp)


def parse_ovf(data: bytes, path: str) -> OvfDescriptor:
    """References and DiskSection of an OVF 1.x/2.x envelope (by local names, any prefix)."""
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    try:
        root = ElementTree.fromstring(data)
    except (ElementTree.ParseError, DefusedXmlException, ValueError) as exc:
        raise CorruptImageError(f"OVF descriptor is not valid XML: {exc}", path=path) from None
    if _local(root.tag) != "Envelope":
        raise CorruptImageError("OVF descriptor has no Envelope root", path=path)
    out = OvfDescriptor()
    for el in root.iter():
        name = _local(el.tag)
        if name == "File":
            fid, href = _attr(el, "id"), _attr(el, "href")
            if fid is None or href is None:
                raise CorruptImageError("OVF File without id or href", path=path)
            out.files[fid] = OvfFile(
                fid,
                href,
                _int_attr(el, "size", path),
                _attr(el, "compression"),
                _int_attr(el, "chunkSize", path),
            )
        elif name == "Disk":
            did = _attr(el, "diskId") or ""
            capacity = _int_attr(el, "capacity", path)
            if capacity is None:
                raise CorruptImageError(f"OVF disk {did!r} has no capacity", path=path)
            capacity *= _units(_attr(el, "capacityAllocationUnits"), path)
            out.disks.append(
                OvfDisk(
                    did,
                    _attr(el, "fileRef"),
                    capacity,
                    _attr(el, "format") or "",
                    _int_attr(el, "populatedSize", path),
                    _attr(el, "parentRef"),
                )
            )
    return out


# --- the archive as a whole -------------------------------------------------------------------


@dataclass
class OvaIndex:
    members: list[TarMember]
    ovf_member: TarMember
    ovf: OvfDescriptor

    def resolve(self, href: str, path: str) -> TarMember:
        """The member an ``href`` names, relative to the descriptor's folder in the tar."""
        if "://" in href:
            raise UnsupportedFeatureError(
                f"OVF file {href[:200]!r} is a URL, not a member of the archive", path=path
            )
        _check_member_name(href, path)
        base = posixpath.dirname(self.ovf_member.name)
        want = posixpath.normpath(posixpath.join(base, href)) if base else posixpath.normpath(href)
        found = [m for m in self.members if posixpath.normpath(m.name) == want]
        if not found:
            raise CorruptImageError(f"OVA has no member {want!r} named by its OVF", path=path)
        return found[-1]  # like tar, a later member of the same name replaces an earlier one


def read_index(f: BlockFile) -> OvaIndex:
    path = str(f.path)
    members = read_tar_index(f)
    for m in members:
        _check_member_name(m.name, path)
    ovfs = [m for m in members if m.name.lower().endswith(".ovf") and m.kind == "file"]
    if not ovfs:
        raise NotThisFormatError("tar archive holds no .ovf descriptor: not an OVA", path=path)
    ovf_member = ovfs[0]
    data = f.read_exact(ovf_member.offset, ovf_member.size, "OVF descriptor", limit=MAX_OVF_BYTES)
    return OvaIndex(members, ovf_member, parse_ovf(data, f"{path}/{ovf_member.name}"))


def _disk_source(
    index: OvaIndex, disk: OvfDisk, number: int, path: str
) -> tuple[OvfFile, TarMember]:
    if disk.parent_ref:
        raise UnsupportedFeatureError(
            f"OVA disk {number} ({disk.disk_id}) is a delta of disk {disk.parent_ref!r}",
            path=path,
        )
    if disk.file_ref is None:
        raise UnsupportedFeatureError(
            f"OVA disk {number} ({disk.disk_id}) is blank (no file): an empty disk of "
            f"{disk.capacity} bytes",
            path=path,
            hint="create an empty image of that size instead",
        )
    ref = index.ovf.files.get(disk.file_ref)
    if ref is None:
        raise CorruptImageError(
            f"OVF disk {disk.disk_id!r} names file {disk.file_ref!r}, not in References",
            path=path,
        )
    if ref.chunk_size:
        raise UnsupportedFeatureError(
            f"OVA disk {number} is split in chunks of {ref.chunk_size} bytes", path=path
        )
    member = index.resolve(ref.href, path)
    if member.kind != "file":
        raise UnsupportedFeatureError(
            f"OVA member {member.name!r} is a {member.kind} entry, not a regular file",
            path=path,
        )
    return ref, member


def list_ova_disks(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The OVF's disks in DiskSection order: id, file, capacity, and the member holding it."""
    f = BlockFile.open(path, writable=False)
    try:
        index = read_index(f)
        out = []
        for number, d in enumerate(index.ovf.disks):
            ref = index.ovf.files.get(d.file_ref) if d.file_ref else None
            out.append(
                {
                    "index": number,
                    "disk_id": d.disk_id,
                    "capacity": d.capacity,
                    "format": d.format,
                    "href": ref.href if ref else None,
                    "compression": ref.compression if ref else None,
                }
            )
        return out
    finally:
        f.close()


def open_ova_disk(path: str | os.PathLike[str], disk: int | str = 0) -> Any:
    """Disk ``disk`` (DiskSection index, or ``ovf:diskId``) of an OVA, as a read-only Chain."""
    from vmferry.chain import Chain

    f = BlockFile.open(path, writable=False)
    try:
        layer = Ova.open_disk(f, disk)
    except BaseException:
        f.close()
        raise
    return Chain([layer])


# --- the driver -------------------------------------------------------------------------------


class Ova(DiskFormat):
    name = "ova"
    extensions = (".ova",)
    writable_format = False  # written once, by convert; never modified in place
    create_options = {
        "adapter_type": "disk controller in the OVF and VMDK: lsilogic (default), ide, "
        "buslogic or pvscsi",
        "vm_name": "name of the virtual machine in the OVF (default: the file name)",
    }

    def __init__(self, f: BlockFile, inner: DiskFormat | None) -> None:
        self.file = f
        self.inner = inner
        self.writable = False
        self.virtual_size = inner.virtual_size if inner is not None else 0
        self.granularity = inner.granularity if inner is not None else 65536
        self.disk_number = 0
        self.index: OvaIndex | None = None
        self.member: TarMember | None = None
        self.compression: str | None = None
        self._scratch: BlockFile | None = None
        self._writer: _OvaWriter | None = None

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        if len(head) < BLOCK or head[257:262] != b"ustar":
            return 0
        first = head[0:100].split(b"\0", 1)[0].lower()
        if first.endswith(b".ovf"):
            return 100
        if b".ovf\0" in head.lower():
            return 60
        return 10  # some tar: an OVA whose descriptor is not first (open says if it is not)

    @classmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        if writable:
            raise UnsupportedFeatureError(
                "an OVA is read-only: it is written once by convert",
                path=str(f.path),
                hint="convert it to a writable format: vmferry convert X.ova X.qcow2",
            )
        return cls.open_disk(f, None)

    @classmethod
    def open_disk(cls, f: BlockFile, disk: int | str | None) -> Self:
        """Open disk ``disk`` (index or diskId; None = the first disk that has a file)."""
        path = str(f.path)
        index = read_index(f)
        disks = index.ovf.disks
        if not disks:
            raise CorruptImageError("the OVF describes no disk", path=path)
        if disk is None:
            with_files = [i for i, d in enumerate(disks) if d.file_ref]
            number = with_files[0] if with_files else 0
        elif isinstance(disk, int):
            if not 0 <= disk < len(disks):
                raise UsageError(f"the OVA has {len(disks)} disk(s), no disk {disk}", path=path)
            number = disk
        else:
            ids = [d.disk_id for d in disks]
            if disk not in ids:
                raise UsageError(f"the OVA has no disk {disk!r} (it has {ids})", path=path)
            number = ids.index(disk)
        ref, member = _disk_source(index, disks[number], number, path)
        scratch: BlockFile | None = None
        if ref.compression and ref.compression.lower() != "identity":
            if ref.compression.lower() != "gzip":
                raise UnsupportedFeatureError(
                    f"OVA disk compression {ref.compression!r} is not supported", path=path
                )
            scratch = _inflate(f, member, ref, disks[number])
            source: BlockFile = scratch
        else:
            source = f.slice(member.offset, member.size, _label(member.name))
        try:
            inner = _open_inner(source, path, member.name)
        except BaseException:
            source.close()
            raise
        layer = cls(f, inner)
        layer.disk_number, layer.index, layer.member = number, index, member
        layer.compression = ref.compression
        layer._scratch = scratch
        return layer

    # --- what the layer is --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.index is not None and self.member is not None:
            disk = self.index.ovf.disks[self.disk_number]
            out = {
                "ovf": self.index.ovf_member.name,
                "disks": len(self.index.ovf.disks),
                "disk_index": self.disk_number,
                "disk_id": disk.disk_id,
                "member": self.member.name,
                "member_offset": self.member.offset,
                "member_size": self.member.size,
                "ovf_capacity": disk.capacity,
                "compression": self.compression,
                "member_count": len(self.index.members),
                "members": [m.name for m in self.index.members[:50]],
            }
        if self.inner is not None:
            out["inner_format"] = self.inner.name
            out["inner"] = self.inner.info()
        return out

    def block_status(self, offset: int, length: int) -> Extent:
        inner = self._require_inner()
        ext = inner.block_status(offset, length)
        # host offsets are inside the member, not the .ova: do not pretend otherwise
        return Extent(ext.offset, ext.length, ext.alloc, None, ext.compressed)

    def read(self, offset: int, length: int) -> bytes:
        return self._require_inner().read(offset, length)

    def _require_inner(self) -> DiskFormat:
        if self.inner is None:
            raise UsageError("this OVA is being written; it has no readable disk yet")
        return self.inner

    def check(self) -> CheckReport:
        report = self.inner.check() if self.inner is not None else CheckReport()
        if self.index is not None:
            _verify_manifest(self.file, self.index, report)
        return report

    # --- writing (convert) --------------------------------------------------------------------

    @classmethod
    def create(
        cls, f: BlockFile, size: int, options: Mapping[str, str], parent: ParentInfo | None = None
    ) -> Self:
        if parent is not None:
            raise UsageError("an OVA cannot have a parent")
        writer = _OvaWriter(f, size, options)
        layer = cls(f, None)
        layer.virtual_size = size
        layer._writer = writer
        layer.writable = True
        return layer

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._writer is None:
            raise UsageError("an OVA is read-only", path=str(self.file.path))
        self._writer.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._writer is None:
            raise UsageError("an OVA is read-only", path=str(self.file.path))
        # a fresh stream reads as zeros; nothing to write

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.assemble()
        self.file.fsync()

    def close(self) -> None:
        try:
            if self._writer is not None:
                self._writer.cleanup()
            if self.inner is not None:
                self.inner.close()
            if self._scratch is not None:
                self._scratch.close()
        finally:
            self.file.close()


def _label(name: str) -> str:
    return _SAFE.sub("_", posixpath.basename(name))[:120] or "disk"


def _open_inner(source: BlockFile, path: str, member: str) -> DiskFormat:
    """The disk member must be a self-contained hosted sparse VMDK (streamOptimized)."""
    head = source.pread(0, 4) if source.size else b""
    if head != KDMV:
        raise UnsupportedFeatureError(
            f"OVA member {member!r} is not a sparse/streamOptimized VMDK (the only disk "
            "format OVAs carry that vmferry reads from inside the archive)",
            path=path,
        )
    try:
        from vmferry.disk.vmdk import Vmdk
    except ImportError as exc:  # pragma: no cover - the VMDK driver ships with vmferry
        raise UnsupportedFeatureError("the VMDK driver is not available", path=path) from exc
    layer = Vmdk.open(source, writable=False)
    if layer.parent_ref() is not None:
        layer.close()
        raise UnsupportedFeatureError(
            f"OVA member {member!r} is a VMDK delta with a parent", path=path
        )
    return layer


def _inflate(f: BlockFile, member: TarMember, ref: OvfFile, disk: OvfDisk) -> BlockFile:
    """Gunzip a member into an unlinked temporary file, never more than the OVF allows."""
    path = str(f.path)
    limit = max(ref.size or 0, disk.capacity + disk.capacity // 64 + GZIP_SLACK)
    fd, tmp = tempfile.mkstemp(prefix="vmferry-ova-", suffix=".vmdk")
    os.unlink(tmp)  # gone when closed, whatever happens
    out = BlockFile(tmp, fd, True)
    try:
        inflater = zlib.decompressobj(wbits=31)
        started = False
        pos, end, written = member.offset, member.offset + member.size, 0
        pending = b""
        while True:
            if not pending:
                if pos >= end:
                    break
                n = min(1 << 20, end - pos)
                pending = f.read_exact(pos, n, "gzip disk member")
                pos += n
            if inflater.eof:  # a further gzip member follows (multi-member stream)
                inflater = zlib.decompressobj(wbits=31)
            started = True
            try:
                piece = inflater.decompress(pending, 4 << 20)
            except zlib.error as exc:
                raise CorruptImageError(f"gzip disk member is corrupt: {exc}", path=path) from None
            pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            if written + len(piece) > limit:
                raise ResourceLimitError(
                    f"gzip disk member inflates past {limit} bytes (the OVF declares a "
                    f"{disk.capacity}-byte disk)",
                    path=path,
                )
            out.write(written, piece)
            written += len(piece)
        if not started or not inflater.eof:
            raise TruncatedImageError("gzip disk member ends early", path=path)
    except BaseException:
        out.close()
        raise
    out.writable = False
    return out


def _verify_manifest(f: BlockFile, index: OvaIndex, report: CheckReport) -> None:
    """Check the .mf digests (SHA1/SHA256/SHA512) of the members it lists."""
    path = str(f.path)
    mfs = [m for m in index.members if m.name.lower().endswith(".mf") and m.kind == "file"]
    if not mfs:
        report.notes.append("no manifest (.mf): contents not verified")
        return
    mf = mfs[0]
    text = f.read_exact(mf.offset, mf.size, "OVA manifest", limit=MAX_MANIFEST_BYTES)
    line_re = re.compile(r"^\s*(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")
    base = posixpath.dirname(mf.name)
    for line in text.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        m = line_re.match(line)
        if m is None:
            report.corruptions.append(f"manifest line not understood: {line[:80]!r}")
            continue
        algo, name, want = m.group(1).lower(), m.group(2), m.group(3).lower()
        try:
            _check_member_name(name, path)
        except VmferryError as exc:
            report.corruptions.append(exc.message)
            continue
        full = posixpath.normpath(posixpath.join(base, name)) if base else name
        members = [x for x in index.members if posixpath.normpath(x.name) == full]
        if not members:
            report.corruptions.append(f"manifest names {name!r}, which is not in the archive")
            continue
        h = hashlib.new(algo)
        pos, end = members[-1].offset, members[-1].offset + members[-1].size
        while pos < end:
            n = min(8 << 20, end - pos)
            h.update(f.pread(pos, n))
            pos += n
        if h.hexdigest() != want:
            report.corruptions.append(f"{algo.upper()} of {name!r} does not match the manifest")
        else:
            report.notes.append(f"{algo.upper()} of {name!r} matches the manifest")


# --- writing ----------------------------------------------------------------------------------


class _OvaWriter:
    """Streams the disk into a temporary VMDK; ``assemble`` writes the tar into the output."""

    def __init__(self, f: BlockFile, size: int, options: Mapping[str, str]) -> None:
        adapter = options.get("adapter_type", "lsilogic")
        if adapter not in _CONTROLLERS:
            raise UsageError(
                f"adapter_type must be one of {', '.join(_CONTROLLERS)}, not {adapter!r}"
            )
        if size <= 0:
            raise UsageError("an OVA disk cannot be empty")
        self.out = f
        self.size = size
        self.adapter = adapter
        stem = _output_stem(f.path)
        self.vm_name = options.get("vm_name") or stem
        self.stem = _SAFE.sub("_", stem)[:80] or "vm"
        self.disk_name = f"{self.stem}-disk1.vmdk"
        from vmferry.disk.vmdk import create_stream_optimized

        self.tmpdir = Path(tempfile.mkdtemp(prefix=".vmferry-ova-", dir=f.path.parent))
        try:
            self.disk_file = BlockFile.open(
                self.tmpdir / self.disk_name, writable=True, create=True
            )
            self.disk_file.cache_unsafe = True  # scratch: copied into the output, then deleted
            vmdk_adapter = "lsilogic" if adapter == "pvscsi" else adapter
            self.disk = create_stream_optimized(self.disk_file, size, adapter_type=vmdk_adapter)
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise
        self.written_since_assembly = True
        self.populated = 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.disk.write(offset, data)
        self.populated += len(data)
        self.written_since_assembly = True

    def assemble(self) -> None:
        if not self.written_since_assembly:
            return
        self.disk.finish()
        disk_size = self.disk_file.size
        disk_sha = _sha256_file(self.disk_file)
        ovf = _ovf_text(
            self.vm_name, self.disk_name, disk_size, self.size, self.populated, self.adapter
        ).encode()
        ovf_name = f"{self.stem}.ovf"
        mf = (
            f"SHA256({ovf_name})= {hashlib.sha256(ovf).hexdigest()}\n"
            f"SHA256({self.disk_name})= {disk_sha}\n"
        ).encode()
        out = self.out
        out.truncate(0)
        pos = 0
        for name, blob in ((ovf_name, ovf), (f"{self.stem}.mf", mf)):
            out.write(pos, _tar_header(name, len(blob)))
            out.write(pos + BLOCK, blob)
            pos += BLOCK + _padded(len(blob))
        out.write(pos, _tar_header(self.disk_name, disk_size))
        _copy_into(self.disk_file, out, pos + BLOCK, disk_size)
        pos += BLOCK + _padded(disk_size)
        out.truncate(pos + 2 * BLOCK)  # end of archive: two zero blocks (holes)
        out.write(pos, bytes(2 * BLOCK))
        self.written_since_assembly = False

    def cleanup(self) -> None:
        try:
            self.disk.close()
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def write_ova_archive(
    out: BlockFile, ovf_name: str, ovf: bytes, disks: list[tuple[str, BlockFile]]
) -> None:
    """Pack a finished OVF descriptor and its disk files into ``out`` (used by migrate).

    Member order as the OVF specification asks: descriptor, manifest (SHA-256), then the disks
    in the order given.  ``out`` is a fresh file; member names must be plain file names.
    """
    for name in [ovf_name, *(n for n, _ in disks)]:
        _check_member_name(name, str(out.path))
        if "/" in name:
            raise UsageError(f"OVA member {name!r} must be a plain file name")
    lines = [f"SHA256({ovf_name})= {hashlib.sha256(ovf).hexdigest()}\n"]
    lines += [f"SHA256({name})= {_sha256_file(f)}\n" for name, f in disks]
    mf_name = ovf_name[:-4] + ".mf" if ovf_name.lower().endswith(".ovf") else ovf_name + ".mf"
    pos = 0
    for name, blob in ((ovf_name, ovf), (mf_name, "".join(lines).encode())):
        out.write(pos, _tar_header(name, len(blob)))
        out.write(pos + BLOCK, blob)
        pos += BLOCK + _padded(len(blob))
    for name, f in disks:
        out.write(pos, _tar_header(name, f.size))
        _copy_into(f, out, pos + BLOCK, f.size)
        pos += BLOCK + _padded(f.size)
    out.truncate(pos + 2 * BLOCK)  # end of archive: two zero blocks
    out.write(pos, bytes(2 * BLOCK))


_CONTROLLERS = {
    "lsilogic": ("6", "lsilogic", "SCSI Controller"),
    "buslogic": ("6", "buslogic", "SCSI Controller"),
    "pvscsi": ("6", "VirtualSCSI", "SCSI Controller"),
    "ide": ("5", None, "IDE Controller"),
}


def _output_stem(p: Path) -> str:
    name = p.name
    m = _TEMP_NAME.match(name)  # AtomicOutput's ".NAME.vmferry-xxxx"
    if m:
        name = m.group(1)
    return name[:-4] if name.lower().endswith(".ova") else name


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _tar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular file; sizes of 8 GiB and more use GNU base-256."""
    raw_name = name.encode()
    if len(raw_name) > 99:
        raise UsageError(f"tar member name {name!r} is too long")
    h = bytearray(BLOCK)
    h[0 : len(raw_name)] = raw_name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    if size < 8**11:
        h[124:136] = b"%011o\0" % size
    else:
        h[124:136] = b"\x80" + size.to_bytes(11, "big")
    h[136:148] = b"%011o\0" % int(time.time())
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _sha256_file(f: BlockFile) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < f.size:
        n = min(8 << 20, f.size - pos)
        h.update(f.pread(pos, n))
        pos += n
    return h.hexdigest()


def _copy_into(src: BlockFile, dst: BlockFile, at: int, length: int) -> None:
    """Copy with copy_file_range when the kernel can (no round trip through Python)."""
    pos = 0
    while pos < length:
        n = min(64 << 20, length - pos)
        try:
            done = os.copy_file_range(src.fd, dst.fd, n, pos, at + pos)
        except OSError:
            done = 0
        if done <= 0:
            chunk = src.pread(pos, min(n, 8 << 20))
            dst.write(at + pos, chunk)
            done = len(chunk)
        pos += done
    dst.size = max(dst.size, at + length)


def _ovf_text(
    vm_name: str, disk_name: str, file_size: int, capacity: int, populated: int, adapter: str
) -> str:
    """A minimal OVF 1.0 envelope: one VirtualSystem, one CPU, 1 GiB, one controller + disk.

    rasd elements are in the schema's (alphabetical) order, which VMware's importer checks.
    """
    rtype, subtype, ctl_name = _CONTROLLERS[adapter]
    sub = f"\n        <rasd:ResourceSubType>{subtype}</rasd:ResourceSubType>" if subtype else ""
    name = escape(vm_name)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="vmferry" xmlns="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" \
xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vmw="http://www.vmware.com/schema/ovf" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href={quoteattr(disk_name)} ovf:id="file1" ovf:size="{file_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" \
ovf:fileRef="file1" ovf:format="{VMDK_STREAM_FORMAT}" ovf:populatedSize="{populated}"/>
  </DiskSection>
  <VirtualSystem ovf:id={quoteattr(vm_name)}>
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="1">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-07</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>1 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>1024MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>{ctl_name}</rasd:Description>
        <rasd:ElementName>{ctl_name} 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>{sub}
        <rasd:ResourceType>{rtype}</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""
