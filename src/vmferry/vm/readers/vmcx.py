"""Hyper-V 2016+ binary configuration container (``.vmcx``, also ``.vmrs``), read into a key tree.

Layout (learnt from reading fox-it's dissect.hypervisor parser and the sample files; this is an
independent implementation): two 46-byte headers at 0x0 and 0x1000 (signature 0x01282014, the
higher sequence number wins), an object table at 0x2000 listing key tables and file objects, and
key tables holding typed entries that point at their parent node by (table index, offset).  The
tree is the same one Hyper-V 2012 writes as XML, so one interpreter serves both.

Every offset and length is checked against the buffer before use, entry counts are bounded by the
space they claim, and any inconsistency is a ConfigError with the file offset: the input may be
truncated, corrupted or crafted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.errors import ConfigError
from vmferry.vm.readers._common import read_limited

SIGNATURE = 0x01282014
HEADER_OFFSETS = (0x0, 0x1000)
HEADER = struct.Struct(
    "<IIHIQIQQI"
)  # signature, checksum, sequence, version, ?, alignment, log off/size, size
OBJECT_TABLE_OFFSET = 0x2000
OBJECT_TABLE_SIGNATURE = 0x01110001
OBJECT_TABLE_HEADER = struct.Struct("<II")
OBJECT_ENTRY = struct.Struct("<BIQIB")  # type, checksum, offset, size, allocated
KEY_TABLE_SIGNATURE = 0x0002
KEY_TABLE_HEADER = struct.Struct("<HHHI")  # signature, index, sequence, checksum
KEY_ENTRY = struct.Struct(
    "<HIHIIIB"
)  # type|flags, size, parent table, parent offset, checksum, seq, data off
SUPPORTED_VERSION = 0x400

OBJ_OBJECT_TABLE, OBJ_KEY_TABLE, OBJ_FILE = 1, 2, 3
T_FREE, T_INT, T_UINT, T_DOUBLE, T_STRING, T_ARRAY, T_BOOL, T_NODE = 1, 3, 4, 5, 6, 7, 8, 9
FLAG_FILE_OBJECT = 0x01
MAX_OBJECT_TABLES = 64
MAX_DEPTH = 64


@dataclass
class _Entry:
    table: int
    offset: int
    type: int
    flags: int
    parent_table: int
    parent_offset: int
    key: str
    data: bytes
    children: dict[str, _Entry] = field(default_factory=dict)


class VmcxFile:
    """A parsed container: ``version`` and ``tree`` (nested dicts of typed values)."""

    def __init__(self, data: bytes, path: Path | str) -> None:
        self.data = data
        self.path = str(path)
        self.version = 0
        self.file_objects: dict[int, int] = {}
        self.tree = self._parse()

    # -- helpers ---------------------------------------------------------------------------

    def _fail(self, message: str, offset: int | None = None) -> ConfigError:
        return ConfigError(
            message,
            path=self.path,
            offset=offset,
            hint="the .vmcx is truncated or corrupt; try the XML export or another copy",
        )

    def _unpack(self, st: struct.Struct, offset: int, buf: bytes | None = None) -> tuple[Any, ...]:
        buf = self.data if buf is None else buf
        if offset < 0 or offset + st.size > len(buf):
            raise self._fail(
                f"structure of {st.size} bytes at {offset:#x} runs past the end", offset
            )
        return st.unpack_from(buf, offset)

    # -- layout ----------------------------------------------------------------------------

    def _parse(self) -> dict[str, Any]:
        headers = []
        for off in HEADER_OFFSETS:
            if off + HEADER.size <= len(self.data):
                fields = self._unpack(HEADER, off)
                if fields[0] == SIGNATURE:
                    headers.append(fields)
        if not headers:
            raise ConfigError(
                "not a Hyper-V .vmcx (no valid header signature)", path=self.path, offset=0
            )
        header = max(headers, key=lambda h: h[2])
        self.version = header[3]
        if self.version != SUPPORTED_VERSION:
            raise ConfigError(
                f"unsupported .vmcx version {self.version:#x} (only {SUPPORTED_VERSION:#x} known)",
                path=self.path,
                offset=0,
            )
        key_tables = self._read_object_tables()
        return self._build_tree(key_tables)

    def _read_object_tables(self) -> dict[int, tuple[int, bytes]]:
        """index → (sequence, raw table bytes) for the newest key table of each index."""
        pending, seen = [OBJECT_TABLE_OFFSET], set()
        key_tables: dict[int, tuple[int, bytes]] = {}
        while pending:
            table_off = pending.pop()
            if table_off in seen:
                continue
            seen.add(table_off)
            if len(seen) > MAX_OBJECT_TABLES:
                raise self._fail("too many object tables", table_off)
            sig, count = self._unpack(OBJECT_TABLE_HEADER, table_off)
            if sig != OBJECT_TABLE_SIGNATURE:
                raise self._fail(f"bad object table signature {sig:#x}", table_off)
            first = table_off + OBJECT_TABLE_HEADER.size
            if count > (len(self.data) - first) // OBJECT_ENTRY.size:
                raise self._fail(
                    f"object table claims {count} entries, more than the file holds", table_off
                )
            for i in range(count):
                etype, _crc, off, size, allocated = self._unpack(
                    OBJECT_ENTRY, first + i * OBJECT_ENTRY.size
                )
                if not allocated:
                    continue
                if off + size > len(self.data) or (size == 0 and etype == OBJ_KEY_TABLE):
                    raise self._fail(
                        f"object {i} ({off:#x}+{size:#x}) lies outside the file", first
                    )
                if etype == OBJ_OBJECT_TABLE:
                    pending.append(off)
                elif etype == OBJ_KEY_TABLE:
                    raw = self.data[off : off + size]
                    sig, index, seq, _crc = self._unpack(KEY_TABLE_HEADER, 0, raw)
                    if sig != KEY_TABLE_SIGNATURE:
                        raise self._fail(f"bad key table signature {sig:#x}", off)
                    if index not in key_tables or seq > key_tables[index][0]:
                        key_tables[index] = (seq, raw, off)  # type: ignore[assignment]
                elif etype == OBJ_FILE:
                    self.file_objects[off] = size
        return key_tables

    def _entries(self, index: int, raw: bytes, base: int) -> dict[int, _Entry]:
        out: dict[int, _Entry] = {}
        pos = KEY_TABLE_HEADER.size
        while pos + KEY_ENTRY.size <= len(raw):
            tf, size, ptable, poff, _crc, _seq, doff = self._unpack(KEY_ENTRY, pos, raw)
            if size == 0:
                break
            if size < KEY_ENTRY.size or pos + size > len(raw):
                raise self._fail(f"key entry of size {size:#x} overruns its table", base + pos)
            etype, flags = tf & 0xFF, tf >> 8
            body = raw[pos + KEY_ENTRY.size : pos + size]
            if etype != T_FREE:
                if not 1 <= doff <= len(body):
                    raise self._fail(f"key entry data offset {doff} outside the entry", base + pos)
                try:
                    key = body[: doff - 1].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise self._fail("key name is not UTF-8", base + pos) from exc
                out[pos] = _Entry(index, pos, etype, flags, ptable, poff, key, body[doff:])
            pos += size
        return out

    def _build_tree(self, key_tables: dict[int, tuple[int, bytes]]) -> dict[str, Any]:
        tables = {
            idx: self._entries(idx, raw, base) for idx, (_seq, raw, base) in key_tables.items()
        }
        root: dict[str, _Entry] = {}
        for entries in tables.values():
            for entry in entries.values():
                if entry.parent_table == 0:
                    root[entry.key] = entry
                    continue
                parent = tables.get(entry.parent_table, {}).get(entry.parent_offset)
                if parent is None or parent.type != T_NODE:
                    raise self._fail(
                        f"key {entry.key!r} names a missing parent "
                        f"({entry.parent_table}:{entry.parent_offset:#x})"
                    )
                parent.children[entry.key] = entry
        return {k: self._to_python(e, 0) for k, e in root.items()}

    # -- values ----------------------------------------------------------------------------

    def _to_python(self, entry: _Entry, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self._fail("key tree deeper than any Hyper-V config (loop?)")
        if entry.type == T_NODE:
            return {k: self._to_python(c, depth + 1) for k, c in entry.children.items()}
        data = entry.data
        if entry.flags & FLAG_FILE_OBJECT:
            size, off = self._unpack(struct.Struct("<IQ"), 0, data)
            if (
                off not in self.file_objects
                or size > self.file_objects[off]
                or off + size > len(self.data)
            ):
                raise self._fail(
                    f"value of {entry.key!r} points at an unknown file object {off:#x}", off
                )
            data = self.data[off : off + size]
            if entry.type in (T_STRING, T_ARRAY):
                return self._bytes_value(entry, data)
        if entry.type in (T_INT, T_UINT, T_DOUBLE):
            fmt = {T_INT: "<q", T_UINT: "<Q", T_DOUBLE: "<d"}[entry.type]
            return self._unpack(struct.Struct(fmt), 0, data)[0]
        if entry.type == T_BOOL:
            return self._unpack(struct.Struct("<I"), 0, data)[0] != 0
        if entry.type in (T_STRING, T_ARRAY):
            (length,) = self._unpack(struct.Struct("<I"), 0, data)
            if 4 + length > len(data):
                raise self._fail(f"value of {entry.key!r} ({length} bytes) overruns its entry")
            return self._bytes_value(entry, data[4 : 4 + length])
        return None  # unknown type: kept as None so the key still shows up

    def _bytes_value(self, entry: _Entry, data: bytes) -> str | bytes:
        if entry.type == T_ARRAY:
            return data
        try:
            return data.decode("utf-16-le").rstrip("\0")
        except UnicodeDecodeError as exc:
            raise self._fail(f"value of {entry.key!r} is not UTF-16") from exc


def read_vmcx_tree(path: Path) -> dict[str, Any]:
    return VmcxFile(read_limited(path), path).tree
