"""Parsing, validating and rebuilding the qcow2 header cluster.

Every number in the header is untrusted: sizes and offsets are checked against the file and
against qemu's own implementation limits before anything is allocated for them (the idea of
qemu's ``qcow2_validate_table``), so a mutated header becomes a named error, never a
MemoryError or a read past the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.disk.blockfile import BlockFile
from vmferry.disk.qcow2.layout import (
    COMPRESSION_NAMES,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    INCOMPAT_NAMES,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE,
    ExtHeader,
    HeaderV2,
    HeaderV3,
)
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
)

#: largest virtual size we accept: qcow2's 56-bit host offsets bound what can be populated
MAX_VIRTUAL_SIZE = 1 << 61


@dataclass
class Meta:
    """Everything the header cluster says, validated."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    #: bytes of the header between byte 104 and header_length (additional fields), kept as is
    header_tail: bytes = b""
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps_ext: bytes | None = None
    #: every extension in file order (type, data), unknown ones included, for rewriting
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Guest clusters per L2 table."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    def feature_name(self, kind: int, bit: int) -> str:
        name = self.feature_names.get((kind, bit))
        if name:
            return name
        if kind == 0 and bit in INCOMPAT_NAMES:
            return INCOMPAT_NAMES[bit]
        return f"bit {bit}"


def parse(f: BlockFile) -> Meta:
    path = str(f.path)
    head = f.pread(0, V2_HEADER_SIZE)
    if head[:4] != MAGIC:
        raise NotThisFormatError("not a qcow2 image (bad magic)", path=path)
    if f.size < V2_HEADER_SIZE:
        raise TruncatedImageError("qcow2 header is cut short", path=path)
    h = HeaderV2.unpack(head)
    if h.version not in (2, 3):
        raise UnsupportedFeatureError(
            f"qcow version {h.version} is not supported (only 2 and 3)",
            path=path,
            hint="convert it with qemu-img first" if h.version == 1 else None,
        )
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImageError(
            f"cluster_bits {h.cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}",
            path=path,
        )
    cs = 1 << h.cluster_bits
    m = Meta(
        version=h.version,
        cluster_bits=h.cluster_bits,
        size=h.size,
        l1_size=h.l1_size,
        l1_table_offset=h.l1_table_offset,
        refcount_table_offset=h.refcount_table_offset,
        refcount_table_clusters=h.refcount_table_clusters,
        nb_snapshots=h.nb_snapshots,
        snapshots_offset=h.snapshots_offset,
    )
    if h.version == 3:
        _parse_v3(f, m)
    if h.crypt_method != 0:
        raise UnsupportedFeatureError(
            f"encrypted qcow2 images are not supported (crypt_method {h.crypt_method})",
            path=path,
            features=["encryption"],
            hint="decrypt it with qemu-img convert --object secret,... first",
        )
    _parse_extensions(f, m, h.backing_file_offset)  # first: the feature table names bits
    _check_incompatible(m, path)
    _parse_backing_name(f, m, h.backing_file_offset, h.backing_file_size)
    _validate_tables(f, m, cs, path)
    return m


def _parse_v3(f: BlockFile, m: Meta) -> None:
    path = str(f.path)
    v3 = HeaderV3.unpack(f.read_exact(V2_HEADER_SIZE, HeaderV3.size, "qcow2 v3 header"))
    m.incompatible = v3.incompatible_features
    m.compatible = v3.compatible_features
    m.autoclear = v3.autoclear_features
    m.refcount_order = v3.refcount_order
    m.header_length = v3.header_length
    cs = m.cluster_size
    if v3.header_length < V3_HEADER_SIZE or v3.header_length % 8 or v3.header_length > cs:
        raise CorruptImageError(
            f"header_length {v3.header_length} is invalid (>= 104, multiple of 8, <= cluster)",
            path=path,
        )
    if v3.refcount_order > 6:
        raise CorruptImageError(f"refcount_order {v3.refcount_order} is above 6", path=path)
    if v3.header_length > V3_HEADER_SIZE:
        m.header_tail = f.read_exact(
            V3_HEADER_SIZE, v3.header_length - V3_HEADER_SIZE, "qcow2 additional header fields"
        )
        m.compression_type = m.header_tail[0]


def _check_incompatible(m: Meta, path: str) -> None:
    unknown = m.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = [m.feature_name(0, b) for b in _bits(unknown)]
        labels = [
            n if n == f"bit {b}" else f"{n} (bit {b})"
            for n, b in zip(names, _bits(unknown), strict=True)
        ]
        raise UnsupportedFeatureError(
            "qcow2 image uses unknown incompatible feature(s): " + ", ".join(labels),
            path=path,
            features=names,
            hint="a newer qemu-img may be able to convert it",
        )
    has_bit = bool(m.incompatible & INCOMPAT_COMPRESSION)
    if has_bit != (m.compression_type != 0):
        raise CorruptImageError(
            "compression type field and the compression incompatible bit disagree", path=path
        )
    if m.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(
            f"unknown compression type {m.compression_type}",
            path=path,
            features=[f"compression type {m.compression_type}"],
        )
    if m.extended_l2 and m.cluster_bits < 14:
        raise CorruptImageError("extended L2 entries need clusters of at least 16 KiB", path=path)


def _bits(mask: int) -> list[int]:
    return [b for b in range(64) if mask >> b & 1]


def _parse_extensions(f: BlockFile, m: Meta, backing_offset: int) -> None:
    path = str(f.path)
    cs = m.cluster_size
    pos = m.header_length
    end = cs
    if 0 < backing_offset < end:
        end = backing_offset
    seen: set[int] = set()
    area = f.pread(0, min(end, f.size))
    while pos + 8 <= end:
        if pos + 8 > len(area):
            raise TruncatedImageError(
                "qcow2 header extensions run past the end of the file", path=path
            )
        ext = ExtHeader.unpack(area, pos)
        if ext.type == EXT_END:
            return
        data_end = pos + 8 + ext.length
        if data_end > end or data_end > len(area):
            raise CorruptImageError(
                f"qcow2 header extension {ext.type:#010x} ({ext.length} bytes) overruns the "
                "header cluster",
                path=path,
                offset=pos,
            )
        data = bytes(area[pos + 8 : data_end])
        if ext.type in seen and ext.type in (EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_BITMAPS):
            raise CorruptImageError(
                f"qcow2 header extension {ext.type:#010x} appears twice", path=path
            )
        seen.add(ext.type)
        m.extensions.append((ext.type, data))
        _apply_extension(m, ext.type, data, path)
        pos = data_end + (-ext.length % 8)
    # qemu accepts a header cluster whose extension area is simply full up to its end


def _apply_extension(m: Meta, kind: int, data: bytes, path: str) -> None:
    if kind == EXT_BACKING_FORMAT:
        m.backing_format = _text(data, "backing format", path)
    elif kind == EXT_DATA_FILE:
        m.data_file = _text(data, "external data file name", path)
    elif kind == EXT_FEATURE_TABLE:
        for i in range(0, len(data) - 47, 48):
            name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
            m.feature_names[(data[i], data[i + 1])] = name
    elif kind == EXT_BITMAPS:
        m.bitmaps_ext = data
    elif kind == EXT_CRYPTO:
        raise UnsupportedFeatureError(
            "qcow2 image carries a full disk encryption header", path=path, features=["encryption"]
        )


def _text(data: bytes, what: str, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptImageError(f"qcow2 {what} is not valid UTF-8", path=path) from exc


def _parse_backing_name(f: BlockFile, m: Meta, offset: int, size: int) -> None:
    path = str(f.path)
    if offset == 0:
        return
    if size > MAX_BACKING_NAME:
        raise CorruptImageError(
            f"backing file name is {size} bytes long (at most {MAX_BACKING_NAME})", path=path
        )
    if offset + size > m.cluster_size:
        raise CorruptImageError("backing file name lies outside the header cluster", path=path)
    if size == 0:
        return
    raw_name = f.read_exact(offset, size, "qcow2 backing file name")
    m.backing_file = _text(raw_name, "backing file name", path)


def _validate_tables(f: BlockFile, m: Meta, cs: int, path: str) -> None:
    if m.size > MAX_VIRTUAL_SIZE:
        raise ResourceLimitError(f"virtual size {m.size} is absurd", path=path)
    span = cs * m.l2_entries  # guest bytes per L1 entry
    need = -(-m.size // span)
    if m.l1_size < need:
        raise CorruptImageError(
            f"L1 table ({m.l1_size} entries) is too small for the virtual size {m.size}",
            path=path,
        )
    if m.l1_size * 8 > MAX_L1_BYTES:
        raise ResourceLimitError(f"L1 table of {m.l1_size} entries is too large", path=path)
    check_table(f, m.l1_table_offset, m.l1_size * 8, cs, "L1 table", path)
    if m.refcount_table_clusters == 0:
        raise CorruptImageError("image has no refcount table", path=path)
    rt_bytes = m.refcount_table_clusters * cs
    if rt_bytes > MAX_REFTABLE_BYTES:
        raise ResourceLimitError(
            f"refcount table of {m.refcount_table_clusters} clusters is too large", path=path
        )
    check_table(f, m.refcount_table_offset, rt_bytes, cs, "refcount table", path)
    if m.nb_snapshots > MAX_SNAPSHOTS:
        raise ResourceLimitError(f"{m.nb_snapshots} snapshots is too many", path=path)
    if m.nb_snapshots:
        check_table(f, m.snapshots_offset, 40 * m.nb_snapshots, cs, "snapshot table", path)


def check_table(f: BlockFile, offset: int, length: int, cs: int, what: str, path: str) -> None:
    """A table must start on a cluster boundary and lie inside the file."""
    if length == 0:
        return
    if offset % cs:
        raise CorruptImageError(f"{what} offset {offset:#x} is not cluster aligned", path=path)
    if offset == 0:
        raise CorruptImageError(f"{what} overlaps the header", path=path)
    if offset + length > f.size:
        raise TruncatedImageError(
            f"{what} ({length} bytes at {offset:#x}) extends past the end of the file "
            f"({f.size} bytes)",
            path=path,
        )


def build(m: Meta) -> bytes:
    """The header cluster's bytes: header, extensions, end marker, backing file name."""
    cs = m.cluster_size
    name = (m.backing_file or "").encode("utf-8")
    exts: list[tuple[int, bytes]] = [
        (t, d) for t, d in m.extensions if t not in (EXT_BACKING_FORMAT, EXT_END)
    ]
    if m.backing_file and m.backing_format:
        exts.insert(0, (EXT_BACKING_FORMAT, m.backing_format.encode("utf-8")))
    body = bytearray()
    for kind, data in exts:
        body += ExtHeader(kind, len(data)).pack() + data + bytes(-len(data) % 8)
    body += ExtHeader(EXT_END, 0).pack()
    hdr_len = V2_HEADER_SIZE if m.version == 2 else m.header_length
    backing_offset = hdr_len + len(body) if name else 0
    fixed = HeaderV2(
        magic=MAGIC,
        version=m.version,
        backing_file_offset=backing_offset,
        backing_file_size=len(name),
        cluster_bits=m.cluster_bits,
        size=m.size,
        crypt_method=0,
        l1_size=m.l1_size,
        l1_table_offset=m.l1_table_offset,
        refcount_table_offset=m.refcount_table_offset,
        refcount_table_clusters=m.refcount_table_clusters,
        nb_snapshots=m.nb_snapshots,
        snapshots_offset=m.snapshots_offset,
    ).pack()
    if m.version == 3:
        fixed += HeaderV3(
            m.incompatible, m.compatible, m.autoclear, m.refcount_order, m.header_length
        ).pack()
        fixed += m.header_tail
    out = fixed + bytes(body) + name
    if len(out) > cs:
        raise UnsupportedFeatureError(
            f"the header, its extensions and the backing file name ({len(out)} bytes) do not "
            f"fit in one {cs}-byte cluster",
            hint="use a shorter backing file name or a larger cluster size",
        )
    return out
