"""The VMDK driver: a descriptor plus one or more extents, as one disk layer.

Three ways a file can be a VMDK:

* a hosted sparse file ("KDMV") with its descriptor embedded (monolithicSparse,
  streamOptimized, hosted snapshot deltas) — the file is its only extent;
* a text descriptor naming extent files next to it (monolithicFlat, twoGbMaxExtent*, ESXi
  vmfs/vmfsThin ``-flat.vmdk``, ESXi snapshot deltas with COWD or SEsparse extents);
* a bare extent (COWD or SEsparse) opened directly, without descriptor: no CID, no parent.

Identity is the descriptor's CID; a child pins its parent's CID in ``parentCID``.  Like VMware,
the CID changes on the first write after open, which is exactly why a child whose parent was
written to no longer opens: its parent "has been modified since the child was created".
"""

from __future__ import annotations

import bisect
import copy
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Self

from vmferry.disk.base import CheckReport, DiskFormat, Extent, ParentInfo, ParentRef
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.vmdk import descriptor as dmod
from vmferry.disk.vmdk.descriptor import Descriptor, ExtentLine
from vmferry.disk.vmdk.extent import SECTOR, ExtentBase, ZeroExtent
from vmferry.disk.vmdk.flat import FlatExtent
from vmferry.disk.vmdk.sparse import MAGIC, SparseExtent, build_sparse_layout
from vmferry.errors import (
    CorruptImageError,
    MissingExtentError,
    NotThisFormatError,
    PathEscapeError,
    UnsupportedFeatureError,
    UsageError,
    VmferryError,
)

COWD_MAGIC = b"COWD"
SESPARSE_MAGIC = (0xCAFEBABE).to_bytes(8, "little")
SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsThin",
)
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX", "pvscsi")
SPLIT_BYTES = 2 << 30  # twoGbMaxExtent* split size, as qemu-img writes it
#: the words VMware uses when a child's parentCID no longer matches its parent
PARENT_MODIFIED = "The parent virtual disk has been modified since the child was created"
_TEMP_NAME = re.compile(r"\.(.+)\.vmferry-[0-9a-f]+")
_WIN_ABS = re.compile(r"^([A-Za-z]:|\\\\|/|\\)")


class Vmdk(DiskFormat):
    name = "vmdk"
    extensions = (".vmdk",)
    supports_parent = True
    parent_formats = ("vmdk",)
    create_options = {
        "subformat": "monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse, "
        "twoGbMaxExtentFlat, streamOptimized, vmfs or vmfsThin",
        "adapter_type": "ide (default), lsilogic, buslogic, legacyESX or pvscsi",
        "hwversion": "virtual hardware version written in the descriptor (default 4)",
        "zeroed_grain": "on/off (default off): sparse extents record zeroed grains",
    }

    def __init__(
        self,
        f: BlockFile,
        writable: bool,
        desc: Descriptor | None,
        extents: list[ExtentBase],
        *,
        embedded: SparseExtent | None = None,
    ) -> None:
        self.file = f
        self.writable = writable
        self.descriptor = desc
        self.parts = extents
        self.embedded = embedded  # the sparse extent whose header holds the descriptor
        self._starts: list[int] = []
        self._place_extents()
        self.has_parent = desc is not None and desc.parent_hint is not None
        grains = [e.grain for e in extents if e.grain]
        self.granularity = max(grains) if grains else 65536
        self.write_alignment = max(grains) if self.has_parent and grains else 1
        self._cid_updated = False

    # --- probing and opening -------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        if head[:4] in (MAGIC, COWD_MAGIC):
            return 100
        if head[:8] == SESPARSE_MAGIC:
            return 80
        if file_size <= dmod.MAX_DESCRIPTOR_BYTES:
            return dmod.looks_like_descriptor(head)
        return 0

    @classmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        head = f.pread(0, 8) if f.size else b""
        if head[:4] == MAGIC:
            return cls._open_monolithic(f, writable)
        if head[:4] == COWD_MAGIC:
            from vmferry.disk.vmdk.cowd import CowdExtent

            ext = CowdExtent.open(f, writable=writable, shares_main=True)
            return cls(f, writable, None, [ext])
        if head[:8] == SESPARSE_MAGIC:
            from vmferry.disk.vmdk.sesparse import SESparseExtent

            ext2 = SESparseExtent.open(f, shares_main=True)
            return cls(f, writable, None, [ext2])
        return cls._open_descriptor(f, writable)

    @classmethod
    def _open_monolithic(cls, f: BlockFile, writable: bool) -> Self:
        ext = SparseExtent.open(f, writable=writable, shares_main=True)
        desc = None
        h = ext.head
        if h.desc_offset:
            nbytes = h.desc_size * SECTOR
            if nbytes == 0 or nbytes > dmod.MAX_DESCRIPTOR_BYTES:
                raise CorruptImageError(
                    f"invalid descriptor: embedded descriptor claims {h.desc_size} sectors",
                    path=str(f.path),
                )
            raw = f.read_exact(h.desc_offset * SECTOR, nbytes, "embedded descriptor")
            desc = dmod.parse(raw, path=str(f.path))
        return cls(f, writable, desc, [ext], embedded=ext)

    @classmethod
    def _open_descriptor(cls, f: BlockFile, writable: bool) -> Self:
        path = str(f.path)
        if f.size > dmod.MAX_DESCRIPTOR_BYTES:
            raise NotThisFormatError("not a VMDK (too large for a descriptor file)", path=path)
        raw = f.read_exact(0, f.size, "VMDK descriptor", limit=dmod.MAX_DESCRIPTOR_BYTES)
        if dmod.looks_like_descriptor(raw) == 0:
            raise NotThisFormatError("not a VMDK (no sparse magic, no descriptor)", path=path)
        desc = dmod.parse(raw, path=path)
        if not desc.extents:
            raise CorruptImageError("invalid VMDK descriptor: no extents", path=path)
        extents: list[ExtentBase] = []
        try:
            for line in desc.extents:
                extents.append(_open_extent(f.path.parent, line, writable, path))
        except BaseException:
            for ext in extents:
                ext.close()
            raise
        return cls(f, writable, desc, extents)

    # --- what the layer is ---------------------------------------------------------------------

    def identity(self) -> Mapping[str, str]:
        if self.descriptor is None:
            return {}
        return {"cid": f"{self.descriptor.cid:08x}"}

    def parent_ref(self) -> ParentRef | None:
        desc = self.descriptor
        if desc is None or desc.parent_hint is None:
            return None
        identity = {}
        if desc.parent_cid != dmod.NO_PARENT_CID:
            identity["cid"] = f"{desc.parent_cid:08x}"
        return ParentRef(
            format="vmdk",
            hints=(desc.parent_hint,),
            identity=identity,
            raw={"parentFileNameHint": desc.parent_hint, "parentCID": f"{desc.parent_cid:08x}"},
            mismatch_message=PARENT_MODIFIED,
        )

    def files(self) -> list[str]:
        out = [str(self.file.path)]
        for ext in self.parts:
            if ext.file is not None and str(ext.file.path) not in out:
                out.append(str(ext.file.path))
        return out

    def info(self) -> dict[str, Any]:
        desc = self.descriptor
        out: dict[str, Any] = {}
        if desc is not None:
            out["create_type"] = desc.create_type
            out["cid"] = f"{desc.cid:08x}"
            out["parent_cid"] = f"{desc.parent_cid:08x}"
            if desc.parent_hint:
                out["parent_hint"] = desc.parent_hint
            out["adapter_type"] = desc.ddb.get("ddb.adapterType")
            out["hwversion"] = desc.ddb.get("ddb.virtualHWVersion")
            if desc.ddb.get("ddb.thinProvisioned") == "1":
                out["thin_provisioned"] = True
        else:
            out["create_type"] = f"bare {self.parts[0].kind} extent"
        out["extents"] = [ext.info() for ext in self.parts]
        grains = {e.grain for e in self.parts if e.grain}
        if grains:
            out["grain_size"] = max(grains)
        out["compressed"] = any(e.compressed for e in self.parts)
        return out

    # --- data ----------------------------------------------------------------------------------

    def _locate(self, offset: int) -> tuple[int, ExtentBase, int]:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i, self.parts[i], offset - self._starts[i]

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        _, ext, local = self._locate(offset)
        n = min(length, ext.size - local)
        alloc, run, host, compressed = ext.status(local, n, self.has_parent)
        if not ext.shares_main_file:
            host = None
        return Extent(offset, run, alloc, host, compressed)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts: list[bytes] = []
        for ext, local, n in self._pieces(offset, length):
            parts.append(ext.read(local, n))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._check_range(offset, len(view))
        at = 0
        for ext, local, n in self._pieces(offset, len(view)):
            ext.read_into(local, view[at : at + n])
            at += n

    def _pieces(self, offset: int, length: int) -> list[tuple[ExtentBase, int, int]]:
        out: list[tuple[ExtentBase, int, int]] = []
        end = offset + length
        while offset < end:
            _, ext, local = self._locate(offset)
            n = min(end - offset, ext.size - local)
            out.append((ext, local, n))
            offset += n
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        self._check_range(offset, len(data))
        pieces = self._pieces(offset, len(data))
        self._before_write(pieces)
        mv = memoryview(data)
        done = 0
        for ext, local, n in pieces:
            ext.write_with_parent(local, mv[done : done + n], self.has_parent)
            done += n

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        self._check_range(offset, length)
        pieces = self._pieces(offset, length)
        self._before_write(pieces)
        for ext, local, n in pieces:
            ext.write_zeroes(local, n, self.has_parent)

    def _before_write(self, pieces: list[tuple[ExtentBase, int, int]]) -> None:
        for ext, local, _ in pieces:
            if not ext.writable:
                raise UnsupportedFeatureError(
                    f"{ext.kind} extent {ext.file.path if ext.file else ''} is read-only",
                    path=str(self.file.path),
                )
            ext.check_write(local)  # refuse before the CID changes
        if pieces and not self._cid_updated:
            self._new_cid()

    def _new_cid(self) -> None:
        """VMware's rule: the content ID changes on the first write after open."""
        self._cid_updated = True
        if self.descriptor is not None:
            _fresh_cid(self.descriptor)
            self._write_descriptor()

    def _write_descriptor(self) -> None:
        desc = self.descriptor
        assert desc is not None
        text = desc.text().encode("utf-8")
        if self.embedded is not None:
            h = self.embedded.head
            area = h.desc_size * SECTOR
            if len(text) > area:
                raise UnsupportedFeatureError(
                    f"descriptor ({len(text)} bytes) no longer fits its {area}-byte area",
                    path=str(self.file.path),
                )
            self.file.write(h.desc_offset * SECTOR, text.ljust(area, b"\0"))
        else:
            self.file.write(0, text)
            self.file.truncate(len(text))
        self.file.fsync()

    # --- metadata changes ------------------------------------------------------------------------

    def set_parent(self, parent: ParentInfo | None) -> None:
        """Point the delta at ``parent`` (hint + its current CID); content is untouched."""
        self._require_writable()
        desc = self.descriptor
        if desc is None:
            raise UnsupportedFeatureError(
                "a bare extent has no descriptor to name a parent in", path=str(self.file.path)
            )
        if parent is None:
            desc.header.pop("parentFileNameHint", None)
            desc.parent_cid = dmod.NO_PARENT_CID
        else:
            pid = parent.layer.identity().get("cid")
            if pid is None:
                raise UsageError("the new parent has no CID", path=parent.absolute_path)
            desc.parent_cid = int(pid, 16)
            if "parentFileNameHint" not in desc.header:
                _insert_after(desc.header, "createType", "parentFileNameHint", "")
            desc.header["parentFileNameHint"] = parent.relative_path
        self._write_descriptor()
        self.has_parent = parent is not None

    def resize(self, new_size: int) -> None:
        """Grow the disk, as ``vmware-vdiskmanager -x`` does (qemu-img cannot resize a VMDK).

        The last extent grows; a split disk adds extent files of up to 2 GiB after it (its
        last flat extent first fills to 2 GiB; a sparse one stays as it is, see
        ``_grow_plan``).  Order, so that a crash at any instant leaves a disk that reads as
        before or as grown, to qemu as to vmferry: first the room (flat files extended with a
        hole, sparse grain tables and directories appended where nothing points yet, new
        extent files), synced; then the one record readers take the size from.  For an
        embedded descriptor that is the header sector (capacity and directory offsets in one
        512-byte write), after the descriptor; for a descriptor file, the descriptor.  The
        CID changes, as on any write.
        """
        self._require_writable()
        plan = self._grow_plan(new_size)
        if plan is None:
            return
        _sectors, last_sectors, new_lines, grown = plan
        last = self.parts[-1]
        self._cid_updated = True
        if last_sectors * SECTOR != last.size:
            last.grow(last_sectors * SECTOR)
        added: list[ExtentBase] = []
        published = False
        try:
            for line in new_lines:
                added.append(self._create_extent(line, last))
            self.descriptor = grown
            published = True
            self._write_descriptor()
            last.publish_size()  # (embedded: the header; flat and split sparse: nothing)
        except BaseException:
            for ext in added:
                ext.close()
            if not published:  # nothing names the new files yet: they go again
                for line in new_lines[: len(added)]:
                    assert line.filename is not None
                    (self.file.path.parent / line.filename).unlink(missing_ok=True)
            raise
        self.parts.extend(added)
        self._place_extents()

    def _place_extents(self) -> None:
        """Where each extent starts in the disk, and the disk's size: their sizes in order."""
        ends = list(itertools.accumulate((e.size for e in self.parts), initial=0))
        self._starts, self.virtual_size = ends[:-1], ends[-1]

    def cannot_resize(self, new_size: int) -> str | None:
        try:
            self._grow_plan(new_size)
        except VmferryError as exc:
            return str(exc)
        return None

    def _grow_plan(self, new_size: int) -> tuple[int, int, list[ExtentLine], Descriptor] | None:
        """(sectors, the last extent's new sectors, lines of added extents, the grown
        descriptor), None when the size does not change; every refusal is raised here,
        before any change."""
        desc = self.descriptor
        path = str(self.file.path)
        if desc is None:
            raise UnsupportedFeatureError(
                "a bare VMDK extent has no descriptor to record a new size in", path=path
            )
        sectors = -(-new_size // SECTOR)
        if sectors > dmod.MAX_SECTORS:
            raise UsageError(
                f"a VMDK cannot be {new_size} bytes (vmferry reads up to "
                f"{dmod.MAX_SECTORS} sectors)",
                path=path,
            )
        if sectors * SECTOR < self.virtual_size:
            raise UnsupportedFeatureError(
                "vmferry grows VMDK disks but does not shrink them",
                path=path,
                hint="convert the disk to qcow2 or VHDX, shrink that, and convert it back",
            )
        if sectors * SECTOR == self.virtual_size:
            return None
        last = self.parts[-1]
        why = last.can_grow(sectors * SECTOR - self._starts[-1])
        if why is None and last.file is not None:
            same = os.path.realpath(last.file.path)
            if any(
                p is not last and p.file is not None and os.path.realpath(p.file.path) == same
                for p in self.parts
            ):
                why = "its file holds other extents of the disk too"
        if why is not None:
            raise UnsupportedFeatureError(f"cannot grow this VMDK: {why}", path=path)
        split = desc.create_type.startswith("twoGbMaxExtent")
        cap = SPLIT_BYTES // SECTOR if split else sectors
        start = self._starts[-1] // SECTOR
        last_sectors = max(last.size // SECTOR, min(cap, sectors - start))
        if self.embedded is None and isinstance(last, SparseExtent):
            # qemu sizes a sparse extent by its header, the descriptor by its line: growing
            # one would show qemu a size in between after a crash.  New files only.
            if not split:
                raise UnsupportedFeatureError(
                    "cannot grow this VMDK: its sparse extent is named by a separate descriptor "
                    f"of a {desc.create_type or 'unknown'} disk, which takes no further extents",
                    path=path,
                )
            last_sectors = last.size // SECTOR
        new_lines = self._new_split_lines(desc, sectors - start - last_sectors, cap, last)
        grown = copy.deepcopy(desc)
        grown.extents[-1].sectors = last_sectors
        grown.extents.extend(new_lines)
        _set_geometry(grown, sectors)
        _fresh_cid(grown)
        self._check_descriptor_fits(grown)
        return sectors, last_sectors, new_lines, grown

    def _check_descriptor_fits(self, desc: Descriptor) -> None:
        if self.embedded is None:
            return
        need = len(desc.text().encode("utf-8"))
        area = self.embedded.head.desc_size * SECTOR
        if need > area:
            raise UnsupportedFeatureError(
                f"the grown descriptor ({need} bytes) would not fit its {area}-byte area",
                path=str(self.file.path),
            )

    def _new_split_lines(
        self, desc: Descriptor, remaining: int, cap: int, last: ExtentBase
    ) -> list[ExtentLine]:
        """Descriptor lines for the extent files a split disk adds (none for other disks);
        refused before any change if one of their names is taken."""
        if remaining <= 0:
            return []
        if len(desc.extents) + -(-remaining // cap) > dmod.MAX_EXTENTS:
            raise UsageError(
                f"growing this split disk by {remaining * SECTOR} bytes would take more than "
                f"{dmod.MAX_EXTENTS} extent files",
                path=str(self.file.path),
                hint="convert it to a monolithic subformat first",
            )
        final = self.file.path
        stem = final.name[:-5] if final.name.lower().endswith(".vmdk") else final.name
        letter = "s" if isinstance(last, SparseExtent) else "f"
        number = len(desc.extents)
        lines = []
        while remaining > 0:
            number += 1
            n = min(cap, remaining)
            name = f"{stem}-{letter}{number:03d}.vmdk"
            if (final.parent / name).exists():
                raise UsageError(
                    f"the next extent file {name} already exists and is not part of this disk",
                    path=str(final),
                    hint="move it away (a leftover of an interrupted resize?) and run again",
                )
            lines.append(ExtentLine("RW", n, desc.extents[-1].kind, name, 0))
            remaining -= n
        return lines

    def _create_extent(self, line: ExtentLine, like: ExtentBase) -> ExtentBase:
        """A new extent file for ``line``, of the same kind as ``like``, synced."""
        assert line.filename is not None
        ef = BlockFile.open(self.file.path.parent / line.filename, writable=True, create=True)
        try:
            if isinstance(like, SparseExtent):
                ext: ExtentBase = _new_sparse_extent(ef, line.sectors, like.zero_grain)
                ext.kind = like.kind
            else:
                ef.truncate(line.sectors * SECTOR)
                ext = FlatExtent(ef, line.sectors * SECTOR, 0, like.kind, True)
            ef.fsync()
        except BaseException:
            ef.close()
            raise
        return ext

    # --- life cycle ----------------------------------------------------------------------------

    def flush(self) -> None:
        for ext in self.parts:
            ext.flush()
        self.file.fsync()

    def close(self) -> None:
        try:
            for ext in self.parts:
                ext.close()
        finally:
            if self.file.fd >= 0:
                self.file.close()

    def finish(self) -> None:
        """Complete a streamOptimized output (tables, footer) without closing the file."""
        self.flush()

    # --- checking ------------------------------------------------------------------------------

    def check(self) -> CheckReport:
        report = CheckReport()
        for ext in self.parts:
            try:
                ext.check(report)
            except VmferryError as exc:
                report.corruptions.append(str(exc))
        desc = self.descriptor
        if desc is None:
            report.notes.append("bare extent: no descriptor, no CID")
            return report
        if desc.parent_cid != dmod.NO_PARENT_CID and desc.parent_hint is None:
            report.corruptions.append("parentCID is set but the descriptor names no parent")
        if desc.parent_hint is not None and desc.parent_cid == dmod.NO_PARENT_CID:
            report.notes.append("parent named without a parentCID: the parent is not verified")
        if desc.cid == dmod.NO_PARENT_CID:
            report.notes.append("CID is ffffffff, the value meaning 'no parent'")
        return report

    # --- creation ------------------------------------------------------------------------------

    @classmethod
    def measure(
        cls, virtual_size: int, data_ranges: Sequence[tuple[int, int]], options: Mapping[str, str]
    ) -> tuple[int, int]:
        """Grains touched by the data plus metadata; flat subformats take the whole size."""
        sub = options.get("subformat", "monolithicSparse")
        sectors = -(-virtual_size // SECTOR)
        _, _, overhead = build_sparse_layout(max(sectors, 1), desc_sectors=20)
        grains = _grains_touched(data_ranges, 65536)
        full = overhead + -(-virtual_size // 65536) * 65536
        if sub in ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs", "vmfsThin"):
            return virtual_size + 4096, virtual_size + 4096
        if sub == "streamOptimized":  # compressed: the uncompressed grains are an upper bound
            return 65536 + grains * (65536 + 512) + overhead // 2, full
        return overhead + grains * 65536, full

    @classmethod
    def create(
        cls, f: BlockFile, size: int, options: Mapping[str, str], parent: ParentInfo | None = None
    ) -> Self:
        sub = options.get("subformat", "monolithicSparse")
        if sub not in SUBFORMATS:
            raise UsageError(f"unknown VMDK subformat {sub!r}", hint=", ".join(SUBFORMATS))
        adapter = options.get("adapter_type", "ide")
        if adapter not in ADAPTERS:
            raise UsageError(f"unknown adapter_type {adapter!r}", hint=", ".join(ADAPTERS))
        hw = options.get("hwversion", "4")
        if not hw.isdigit() or len(hw) > 3:
            raise UsageError(f"hwversion must be a small number, not {hw!r}")
        zg = options.get("zeroed_grain", "off")
        if zg not in ("on", "off"):
            raise UsageError("zeroed_grain must be on or off")
        zeroed = zg == "on"
        if size <= 0 or size > dmod.MAX_SECTORS * SECTOR:
            raise UsageError(f"a VMDK cannot be {size} bytes")
        if sub not in ("monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized") and zeroed:
            raise UsageError(f"zeroed_grain needs a sparse subformat, not {sub}")
        if parent is not None and sub not in ("monolithicSparse", "twoGbMaxExtentSparse"):
            raise UsageError(f"a {sub} VMDK cannot have a parent: use monolithicSparse")
        sectors = -(-size // SECTOR)
        desc = _new_descriptor(sub, sectors, adapter, hw, parent, str(f.path))
        final = _final_path(f)
        stem = final.name[:-5] if final.name.lower().endswith(".vmdk") else final.name
        if sub == "monolithicSparse":
            layer = cls._create_monolithic(f, sectors, desc, final.name, zeroed)
        elif sub == "streamOptimized":
            from vmferry.disk.vmdk.stream import start_stream

            desc.extents = [ExtentLine("RW", sectors, "SPARSE", final.name)]
            ext = start_stream(f, sectors, desc.text().encode())
            layer = cls(f, True, desc, [ext], embedded=ext)
        else:
            layer = cls._create_split(f, sub, sectors, desc, final.parent, stem, zeroed)
        # A fresh output is invisible until the caller syncs and renames it: no reader can see
        # a half-published grain, and no child pins its CID yet.  Skip the ordering fsyncs and
        # keep the CID just generated (the reopened image follows the full rules again).
        layer._cid_updated = True
        for part in layer.parts:
            if isinstance(part, SparseExtent):
                part.ordered_sync = False
        return layer

    @classmethod
    def _create_monolithic(
        cls, f: BlockFile, sectors: int, desc: Descriptor, name: str, zeroed: bool
    ) -> Self:
        desc.extents = [ExtentLine("RW", sectors, "SPARSE", name)]
        text = desc.text().encode()
        desc_sectors = max(20, -(-len(text) // SECTOR) + 4)
        header, pieces, fsize = build_sparse_layout(
            sectors, desc_sectors=desc_sectors, zeroed_grain=zeroed
        )
        f.write(0, header.pack())
        f.write(SECTOR, text.ljust(desc_sectors * SECTOR, b"\0"))
        for off, data in pieces:
            f.write(off, data)
        f.truncate(fsize)
        ext = SparseExtent.open(f, writable=True, shares_main=True)
        return cls(f, True, desc, [ext], embedded=ext)

    @classmethod
    def _create_split(
        cls,
        f: BlockFile,
        sub: str,
        sectors: int,
        desc: Descriptor,
        folder: Path,
        stem: str,
        zeroed: bool,
    ) -> Self:
        flat = sub not in ("twoGbMaxExtentSparse",)
        kind = "VMFS" if sub in ("vmfs", "vmfsThin") else "FLAT" if flat else "SPARSE"
        if sub.startswith("twoGb"):
            sizes = [
                min(SPLIT_BYTES, sectors * SECTOR - off)
                for off in range(0, sectors * SECTOR, SPLIT_BYTES)
            ]
            letter = "f" if flat else "s"
            names = [f"{stem}-{letter}{i + 1:03d}.vmdk" for i in range(len(sizes))]
        else:
            sizes = [sectors * SECTOR]
            names = [f"{stem}-flat.vmdk"]
        created: list[Path] = []
        extents: list[ExtentBase] = []
        try:
            for name, nbytes in zip(names, sizes, strict=True):
                target = folder / name
                if target.exists():
                    raise UsageError(
                        "extent file already exists", path=str(target), hint="remove it first"
                    )
                ef = BlockFile.open(target, writable=True, create=True)
                created.append(target)
                try:
                    if flat:
                        ef.truncate(nbytes)
                        extents.append(FlatExtent(ef, nbytes, 0, kind, True))
                    else:
                        extents.append(_new_sparse_extent(ef, nbytes // SECTOR, zeroed))
                except BaseException:
                    ef.close()
                    raise
                ef.fsync()
            desc.extents = [
                ExtentLine("RW", n // SECTOR, kind, name, 0)
                for name, n in zip(names, sizes, strict=True)
            ]
            text = desc.text().encode()
            f.write(0, text)
            f.truncate(len(text))
        except BaseException:
            for ext in extents:
                ext.close()
            for p in created:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        return cls(f, True, desc, extents)


def _grains_touched(ranges: Sequence[tuple[int, int]], grain: int) -> int:
    """Number of distinct grains the byte ranges touch (merged, without a set per grain)."""
    spans = sorted((off // grain, -(-(off + n) // grain)) for off, n in ranges if n > 0)
    total = 0
    cur_start = cur_end = -1
    for start, end in spans:
        if start > cur_end:
            total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + cur_end - cur_start


def _insert_after(d: dict[str, str], after: str, key: str, value: str) -> None:
    """Insert ``key`` right after ``after``, keeping the other keys where they are."""
    items = list(d.items())
    pos = next((i + 1 for i, (k, _) in enumerate(items) if k == after), len(items))
    items.insert(pos, (key, value))
    d.clear()
    d.update(items)


def _new_sparse_extent(ef: BlockFile, sectors: int, zeroed: bool) -> SparseExtent:
    header, pieces, fsize = build_sparse_layout(sectors, zeroed_grain=zeroed)
    ef.write(0, header.pack())
    for off, data in pieces:
        ef.write(off, data)
    ef.truncate(fsize)
    return SparseExtent.open(ef, writable=True)


def _new_descriptor(
    sub: str, sectors: int, adapter: str, hw: str, parent: ParentInfo | None, path: str
) -> Descriptor:
    cid = int.from_bytes(os.urandom(4))
    while cid == dmod.NO_PARENT_CID:
        cid = int.from_bytes(os.urandom(4))
    parent_cid = dmod.NO_PARENT_CID
    if parent is not None:
        pid = parent.layer.identity().get("cid")
        if pid is None:
            raise UsageError(
                "the parent VMDK has no descriptor (no CID) to pin", path=parent.absolute_path
            )
        parent_cid = int(pid, 16)
    create_type = "vmfs" if sub == "vmfsThin" else sub
    header = {
        "version": "1",
        "encoding": "UTF-8",
        "CID": f"{cid:08x}",
        "parentCID": f"{parent_cid:08x}",
        "createType": create_type,
    }
    if parent is not None:
        header["parentFileNameHint"] = parent.relative_path
    heads = 16 if adapter == "ide" else 255
    ddb = {
        "ddb.virtualHWVersion": hw,
        "ddb.geometry.cylinders": str(sectors // (63 * heads)),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": "63",
        "ddb.adapterType": adapter,
        "ddb.longContentID": os.urandom(12).hex() + f"{cid:08x}",
    }
    if sub == "vmfsThin":
        ddb["ddb.thinProvisioned"] = "1"
    return Descriptor(header=header, extents=[], ddb=ddb)


def _fresh_cid(desc: Descriptor) -> None:
    """A new random CID (never the old one, never "no parent"), and a matching long ID."""
    old = desc.cid
    cid = old
    while cid in (old, dmod.NO_PARENT_CID):
        cid = int.from_bytes(os.urandom(4))
    desc.cid = cid
    if "ddb.longContentID" in desc.ddb:
        desc.ddb["ddb.longContentID"] = os.urandom(12).hex() + f"{cid:08x}"


def _set_geometry(desc: Descriptor, sectors: int) -> None:
    """Cylinders for the new size, with the heads and sectors per track the disk has."""
    heads = desc.ddb.get("ddb.geometry.heads", "")
    per_track = desc.ddb.get("ddb.geometry.sectors", "")
    known = "ddb.geometry.cylinders" in desc.ddb and heads.isdigit() and per_track.isdigit()
    if known and int(heads) and int(per_track):
        desc.ddb["ddb.geometry.cylinders"] = str(sectors // (int(heads) * int(per_track)))


def _final_path(f: BlockFile) -> Path:
    """The name the output will have once ``AtomicOutput`` renames its temporary file."""
    final = getattr(f, "final_path", None)
    if final is not None:
        return Path(final)
    m = _TEMP_NAME.fullmatch(f.path.name)
    return f.path.with_name(m.group(1)) if m else f.path


def _open_extent(folder: Path, line: ExtentLine, writable: bool, desc_path: str) -> ExtentBase:
    """Open one extent file named by a descriptor, confined to the descriptor's directory."""
    from vmferry.chain.resolve import is_inside

    nbytes = line.sectors * SECTOR
    if line.access == "NOACCESS":
        raise UnsupportedFeatureError("descriptor has a NOACCESS extent", path=desc_path)
    if line.kind == "ZERO":
        return ZeroExtent(nbytes)
    if line.kind in ("VMFSRDM", "VMFSRAW"):
        raise UnsupportedFeatureError(
            f"{line.kind} extents map a raw device; vmferry reads only image files",
            path=desc_path,
        )
    name = line.filename or ""
    if _WIN_ABS.match(name):
        raise PathEscapeError(
            f"extent file {name!r} is an absolute path; extents must sit beside the descriptor",
            path=desc_path,
            hint="edit the descriptor to name the extent relative to it",
        )
    if "\\" in name and "/" not in name:
        name = name.replace("\\", "/")
    target = folder / PurePosixPath(name)
    if not is_inside(target, [folder]):
        raise PathEscapeError(
            f"extent file {line.filename!r} is outside the descriptor's directory",
            path=desc_path,
        )
    if not target.exists():
        raise MissingExtentError(
            f"extent file {line.filename!r} is missing",
            path=desc_path,
            hint="copy every file of the disk (the descriptor and all its extents) together",
        )
    rw = writable and line.access == "RW" and line.kind != "SESPARSE"
    ef = BlockFile.open(target, writable=rw)
    try:
        return _extent_for(ef, line, nbytes, rw)
    except BaseException:
        ef.close()
        raise


def _extent_for(ef: BlockFile, line: ExtentLine, nbytes: int, rw: bool) -> ExtentBase:
    if line.kind in ("FLAT", "VMFS"):
        return FlatExtent(ef, nbytes, line.offset * SECTOR, line.kind, rw)
    magic = ef.pread(0, 8)
    if line.kind == "SESPARSE" or magic == SESPARSE_MAGIC:
        from vmferry.disk.vmdk.sesparse import SESparseExtent

        ext: ExtentBase = SESparseExtent.open(ef, size=nbytes)
    elif magic[:4] == COWD_MAGIC:
        from vmferry.disk.vmdk.cowd import CowdExtent

        ext = CowdExtent.open(ef, writable=rw, size=nbytes)
    else:
        ext = SparseExtent.open(ef, writable=rw, size=nbytes)
    ext.kind = line.kind
    return ext
