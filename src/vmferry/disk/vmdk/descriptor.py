"""The VMDK text descriptor: parse it leniently, validate what matters, write it back whole.

A descriptor is ``key=value`` lines (version, CID, parentCID, createType, parentFileNameHint),
extent lines (``RW 2048 SPARSE "disk.vmdk"``) and ``ddb.*`` entries.  Hypervisors add keys
vmferry does not know (encoding, isNativeSnapshot, ddb.toolsInstallType...): they are kept in
their original order and written back unchanged, so rewriting a CID never drops them.

The text comes from an untrusted file: it is bounded (1 MiB), decoded as UTF-8 with a latin-1
fallback (VMware writes ``encoding="windows-1252"`` descriptors), and every number is checked
before anything is sized from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vmferry.errors import CorruptImageError, NotThisFormatError, ResourceLimitError

#: a descriptor file larger than this is not a descriptor
MAX_DESCRIPTOR_BYTES = 1 << 20
#: more extents than this is a hostile descriptor (4096 x 2 GiB = 8 TiB of split disk)
MAX_EXTENTS = 4096
#: one extent or the whole disk may not claim more sectors than this (2^41 sectors = 1 PiB)
MAX_SECTORS = 1 << 41
NO_PARENT_CID = 0xFFFFFFFF
MAGIC_LINE = "# Disk DescriptorFile"

ACCESS = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")

_KEY_RE = re.compile(r"^([A-Za-z0-9_.:-]+)\s*=\s*(.*)$")
# the file name runs to the last quote: names may contain quotes, spaces, any UTF-8
_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"(.*)"(?:\s+(\d+))?(?:\s+[^"\s]+)*)?$'
)
_ACCESS_RE = re.compile(r"^(RW|RDONLY|NOACCESS)(\s|$)")
#: keys whose value is written without quotes (VMware's own spelling)
_UNQUOTED = {"version", "CID", "parentCID"}


@dataclass
class ExtentLine:
    """One ``ACCESS SECTORS TYPE "file" [offset]`` line."""

    access: str
    sectors: int
    kind: str
    filename: str | None = None
    offset: int = 0  # in sectors, FLAT only

    def text(self) -> str:
        if self.filename is None:
            return f"{self.access} {self.sectors} {self.kind}"
        line = f'{self.access} {self.sectors} {self.kind} "{self.filename}"'
        if self.kind == "FLAT":
            line += f" {self.offset}"
        return line


@dataclass
class Descriptor:
    """A parsed descriptor.  ``header`` and ``ddb`` keep unknown keys in file order."""

    header: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)

    # --- the fields vmferry uses ---------------------------------------------------------------

    @property
    def create_type(self) -> str:
        return self.header.get("createType", "")

    @property
    def cid(self) -> int:
        return _hex32(self.header.get("CID", "ffffffff"), "CID")

    @cid.setter
    def cid(self, value: int) -> None:
        self.header["CID"] = f"{value & 0xFFFFFFFF:08x}"

    @property
    def parent_cid(self) -> int:
        return _hex32(self.header.get("parentCID", "ffffffff"), "parentCID")

    @parent_cid.setter
    def parent_cid(self, value: int) -> None:
        self.header["parentCID"] = f"{value & 0xFFFFFFFF:08x}"

    @property
    def parent_hint(self) -> str | None:
        hint = self.header.get("parentFileNameHint")
        return hint or None

    @property
    def total_sectors(self) -> int:
        return sum(e.sectors for e in self.extents)

    # --- text ----------------------------------------------------------------------------------

    def text(self) -> str:
        """The descriptor as VMware lays it out; unknown keys where they were."""
        out = [MAGIC_LINE]
        for key, value in self.header.items():
            out.append(f"{key}={value}" if key in _UNQUOTED else f'{key}="{value}"')
        out += ["", "# Extent description"]
        out += [e.text() for e in self.extents]
        out += ["", "# The Disk Data Base", "#DDB", ""]
        out += [f'{key} = "{value}"' for key, value in self.ddb.items()]
        return "\n".join(out) + "\n"


def decode(raw: bytes) -> str:
    """Bytes to text: stop at the first NUL (embedded descriptors are zero padded)."""
    cut = raw.find(b"\0")
    if cut >= 0:
        raw = raw[:cut]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def looks_like_descriptor(head: bytes) -> int:
    """Probe score for a text descriptor: 100 for VMware's magic line, 90 for qemu's rule."""
    text = head[:4096]
    stripped = text.lstrip(b"\xef\xbb\xbf")
    if stripped.startswith(MAGIC_LINE.encode()):
        return 100
    for line in stripped.split(b"\n"):
        line = line.strip(b" \t\r")
        if not line or line.startswith(b"#"):
            continue
        return 90 if line in (b"version=1", b"version=2", b"version=3") else 0
    return 0


def parse(raw: bytes | str, *, path: str | None = None) -> Descriptor:
    """Parse descriptor text; raise a named error when it is not a usable descriptor."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_DESCRIPTOR_BYTES:
            raise NotThisFormatError(
                f"{len(raw)} bytes is too large for a VMDK descriptor", path=path
            )
        text = decode(raw)
    else:
        text = raw
    desc = Descriptor()
    saw_any = False
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m is None and _ACCESS_RE.match(line):
            raise CorruptImageError(f"invalid extent line {lineno}: {line[:80]!r}", path=path)
        if m:
            if int(m.group(2)) == 0:  # an empty extent adds nothing (qemu skips these too)
                continue
            desc.extents.append(_extent(m, lineno, path))
            if len(desc.extents) > MAX_EXTENTS:
                raise ResourceLimitError(
                    f"descriptor lists more than {MAX_EXTENTS} extents", path=path
                )
            saw_any = True
            continue
        m = _KEY_RE.match(line)
        if m is None:
            raise CorruptImageError(
                f"invalid VMDK descriptor: line {lineno} is neither key=value nor an extent",
                path=path,
            )
        key, value = m.group(1), _unquote(m.group(2))
        (desc.ddb if key.startswith("ddb.") else desc.header)[key] = value
        saw_any = True
    if not saw_any or "createType" not in desc.header:
        raise CorruptImageError("invalid VMDK descriptor: no createType", path=path)
    _validate(desc, path)
    return desc


def _extent(m: re.Match[str], lineno: int, path: str | None) -> ExtentLine:
    access, sectors, kind, filename, offset = m.groups()
    kind = kind.upper()
    if kind not in EXTENT_TYPES:
        raise CorruptImageError(
            f"invalid VMDK descriptor: unknown extent type {kind!r} on line {lineno}", path=path
        )
    count = int(sectors)
    if count <= 0 or count > MAX_SECTORS:
        raise CorruptImageError(
            f"invalid VMDK descriptor: extent on line {lineno} has {count} sectors", path=path
        )
    if kind != "ZERO" and not filename:
        raise CorruptImageError(
            f"invalid VMDK descriptor: extent on line {lineno} names no file", path=path
        )
    start = int(offset) if offset else 0
    if start > MAX_SECTORS:
        raise CorruptImageError(
            f"invalid VMDK descriptor: extent offset on line {lineno} is absurd", path=path
        )
    return ExtentLine(access, count, kind, filename if kind != "ZERO" else None, start)


def _validate(desc: Descriptor, path: str | None) -> None:
    version = desc.header.get("version", "1")
    if version not in ("1", "2", "3"):
        raise CorruptImageError(f"unsupported VMDK descriptor version {version!r}", path=path)
    desc.cid  # noqa: B018 - validates
    desc.parent_cid  # noqa: B018
    if desc.total_sectors > MAX_SECTORS:
        raise ResourceLimitError(
            f"descriptor extents add up to {desc.total_sectors} sectors", path=path
        )


def _hex32(value: str, what: str) -> int:
    try:
        number = int(value, 16)
    except ValueError:
        raise CorruptImageError(f"invalid VMDK descriptor: {what} {value!r} is not hex") from None
    if not 0 <= number <= 0xFFFFFFFF:
        raise CorruptImageError(f"invalid VMDK descriptor: {what} {value!r} is out of range")
    return number


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value
