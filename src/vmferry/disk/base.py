"""The interface every disk format implements, and the records that cross it.

Modelled on qemu's BlockDriver table: a driver knows only its own layer.  ``block_status``
answers for that layer alone (DATA, ZERO, or UNALLOCATED = "ask the parent"); the chain above
adds the parent, and every operation (convert, compare, map, merge, du) is written once against
this interface.  Generic code asks capabilities (``supports_parent``, ``create_options``), never
``isinstance(layer, Vhdx)``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from vmferry.disk.blockfile import BlockFile
from vmferry.errors import UnsupportedFeatureError, UsageError


class Alloc(enum.Enum):
    """What one layer says about a byte range."""

    DATA = "data"  # this layer holds the bytes
    ZERO = "zero"  # reads as zeros and hides the parent
    UNALLOCATED = "unallocated"  # this layer says nothing: the parent answers (zeros at the bottom)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one status.  ``length`` > 0 and never past what was asked."""

    offset: int
    length: int
    alloc: Alloc
    host_offset: int | None = None  # where the bytes live in the file, when contiguous there
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ParentRef:
    """What a child says about its parent.  Opens nothing: the chain resolver does that.

    ``hints`` are the stored locations in the order the format prefers them (relative first),
    already converted from the format's notation to POSIX-style strings where they are relative.
    ``identity`` is what the child pinned; every key must equal the parent's ``identity()``
    value.  ``advisory`` keys only warn (e.g. a timestamp some hypervisors do not keep exact).
    """

    format: str
    hints: tuple[str, ...]
    identity: Mapping[str, str] = field(default_factory=dict)
    advisory: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)  # locators as stored, for `info`
    #: other values a pinned key may also take (VHDX parent_linkage2: the parent's
    #: DataWriteGuid before a change the child was told about)
    alternatives: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: how the format's own tools word an identity mismatch (VMware's message users search for)
    mismatch_message: str | None = None


@dataclass(frozen=True)
class ParentInfo:
    """Handed to ``create``/``set_parent``: an opened parent and how the child should name it."""

    layer: DiskFormat  # the parent's own top layer (for identity, size, sector size)
    absolute_path: str  # POSIX absolute path of the parent
    relative_path: str  # from the child's final directory, POSIX separators
    format: str


@dataclass
class CheckReport:
    """Outcome of a structural check, in qemu-img check's terms."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    leaked_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks


class DiskFormat(ABC):
    """One layer of a disk: an image file in one format."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    extensions: ClassVar[tuple[str, ...]] = ()
    supports_parent: ClassVar[bool] = False
    #: formats a parent of this format may have; the first is the default
    parent_formats: ClassVar[tuple[str, ...]] = ()
    #: option name -> one-line description; what ``-o`` accepts on create/convert
    create_options: ClassVar[Mapping[str, str]] = {}
    #: a child must have exactly its parent's virtual size (VHD/VHDX); others may be larger
    child_size_must_match: ClassVar[bool] = False
    #: the layer writes through ``write`` (some formats are read-only in vmferry)
    writable_format: ClassVar[bool] = True

    file: BlockFile
    virtual_size: int
    granularity: int = 65536
    writable: bool = False
    #: writes must cover whole units of this many bytes (a differencing layer's sector: the
    #: driver cannot read its parent, so Chain.write does the read-modify-write for it)
    write_alignment: int = 1

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        """0..100: how sure this driver is that the file is its format.  Top image only."""
        return 0

    @classmethod
    @abstractmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        """Parse and validate the file's metadata; read no data."""

    @classmethod
    def create(
        cls,
        f: BlockFile,
        size: int,
        options: Mapping[str, str],
        parent: ParentInfo | None = None,
    ) -> Self:
        """Write a new, empty image into the (empty, writable) file and return it opened."""
        raise UnsupportedFeatureError(f"vmferry cannot create {cls.name} images")

    @classmethod
    def measure(
        cls, virtual_size: int, data_ranges: Sequence[tuple[int, int]], options: Mapping[str, str]
    ) -> tuple[int, int]:
        """(bytes a new image holding ``data_ranges`` needs, bytes when fully allocated)."""
        raise UnsupportedFeatureError(f"vmferry cannot measure {cls.name} output yet")

    # --- what the layer is --------------------------------------------------------------------

    def identity(self) -> Mapping[str, str]:
        """The values a child pins to be sure it is stacked on this exact disk."""
        return {}

    def parent_ref(self) -> ParentRef | None:
        return None

    def files(self) -> list[str]:
        """Every file this layer consists of (a VMDK descriptor has extent files too)."""
        return [str(self.file.path)]

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``vmferry info`` (subformat, block size, ids...)."""
        return {}

    # --- data ---------------------------------------------------------------------------------

    @abstractmethod
    def block_status(self, offset: int, length: int) -> Extent:
        """Status of the run starting at ``offset``, at most ``length`` bytes long."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """This layer's bytes; UNALLOCATED and ZERO ranges read as zeros."""

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with what ``read(offset, len(view))`` returns.

        Why a second way to read: a long copy reads into a few buffers it reuses (page-aligned,
        so an O_DIRECT write takes them as they are, and warm, so no fresh memory is faulted
        in for every chunk).  Drivers whose data sits plainly in the file override this with
        :meth:`_read_into_mapped`; the rest copy once here.
        """
        view[:] = self.read(offset, len(view))

    def _read_into_mapped(
        self, offset: int, view: memoryview, pread_into: Callable[[int, memoryview], None]
    ) -> None:
        """``read_into`` for a driver whose ``block_status`` gives, for uncompressed DATA, the
        offset of the bytes in the file that ``pread_into`` reads."""
        self._check_range(offset, len(view))
        for ext in self.extents(offset, len(view)):
            part = view[ext.offset - offset : ext.end - offset]
            if ext.alloc is Alloc.DATA and ext.host_offset is not None and not ext.compressed:
                pread_into(ext.host_offset, part)
            elif ext.alloc is Alloc.DATA:
                part[:] = self.read(ext.offset, ext.length)
            else:
                zero_fill(part)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise UnsupportedFeatureError(f"vmferry cannot write {self.name} images")

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros in this layer (hiding any parent)."""
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, chunk[:n])
            offset += n

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Tile [offset, offset+length) with this layer's extents, neighbours merged."""
        end = self.virtual_size if length is None else offset + length
        pending: Extent | None = None
        while offset < end:
            ext = self.block_status(offset, end - offset)
            if ext.length <= 0:  # a driver bug must not become an endless loop
                raise RuntimeError(f"{self.name}: block_status returned an empty extent")
            if pending is not None and _mergeable(pending, ext):
                host = pending.host_offset
                pending = Extent(
                    pending.offset,
                    pending.length + ext.length,
                    pending.alloc,
                    host,
                    pending.compressed,
                )
            else:
                if pending is not None:
                    yield pending
                pending = ext
            offset = ext.end
        if pending is not None:
            yield pending

    # --- metadata changes ---------------------------------------------------------------------

    def set_parent(self, parent: ParentInfo | None) -> None:
        """Re-point the child at another (identical-content) parent; metadata only."""
        raise UnsupportedFeatureError(f"{self.name} images have no parent to change")

    def resize(self, new_size: int) -> None:
        raise UnsupportedFeatureError(f"vmferry cannot resize {self.name} images yet")

    def cannot_resize(self, new_size: int) -> str | None:
        """Why ``resize(new_size)`` would be refused (None: it would not), asked before any
        member of a chain changes.  Drivers whose refusals depend on the layer override it."""
        if type(self).resize is DiskFormat.resize or not self.writable_format:
            return f"vmferry cannot resize {self.name} images"
        return None

    def check(self) -> CheckReport:
        return CheckReport(notes=[f"{self.name}: no structural checks beyond open"])

    def flush(self) -> None:
        self.file.fsync()

    def close(self) -> None:
        self.file.close()

    # --- helpers for drivers ------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(
                f"range {offset}+{length} is outside the disk ({self.virtual_size} bytes)",
                path=str(self.file.path),
            )

    def _require_writable(self) -> None:
        if not self.writable:
            raise UsageError("image is opened read-only", path=str(self.file.path))


def _mergeable(a: Extent, b: Extent) -> bool:
    if a.alloc is not b.alloc or a.compressed or b.compressed or a.end != b.offset:
        return False
    if a.host_offset is None and b.host_offset is None:
        return True
    return a.host_offset is not None and b.host_offset == a.host_offset + a.length


_ZEROS = bytes(1 << 20)


def zero_fill(view: memoryview) -> None:
    """Zero ``view`` from one shared zero buffer (no allocation per hole, however large)."""
    zeros = memoryview(_ZEROS)
    for at in range(0, len(view), len(zeros)):
        n = min(len(zeros), len(view) - at)
        view[at : at + n] = zeros[:n]
