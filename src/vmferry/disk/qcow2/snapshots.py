"""The internal snapshot table (read only: for info, check and read-only snapshot views)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmferry.disk.blockfile import BlockFile
from vmferry.disk.qcow2.header import Meta
from vmferry.disk.qcow2.layout import (
    MAX_SNAPSHOT_EXTRA,
    MAX_SNAPSHOT_TABLE_BYTES,
    SnapshotHeader,
)
from vmferry.errors import CorruptImageError, ResourceLimitError


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_offset: int
    l1_size: int
    vm_state_size: int
    disk_size: int | None
    date_sec: int
    entry_size: int = 0  # bytes in the table, padding included

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "vm_state_size": self.vm_state_size,
            "disk_size": self.disk_size,
            "date_sec": self.date_sec,
        }


def read_snapshots(f: BlockFile, m: Meta) -> list[Snapshot]:
    """Parse the table entry by entry; every length is bounded before it is read."""
    out: list[Snapshot] = []
    pos = m.snapshots_offset
    path = str(f.path)
    for i in range(m.nb_snapshots):
        if pos - m.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES:
            raise ResourceLimitError("snapshot table is larger than 64 MiB", path=path)
        sh = SnapshotHeader.unpack(f.read_exact(pos, SnapshotHeader.size, f"snapshot {i} header"))
        if sh.extra_data_size > MAX_SNAPSHOT_EXTRA:
            raise CorruptImageError(
                f"snapshot {i} has {sh.extra_data_size} bytes of extra data (at most "
                f"{MAX_SNAPSHOT_EXTRA})",
                path=path,
            )
        rest = sh.extra_data_size + sh.id_str_size + sh.name_size
        body = f.read_exact(pos + SnapshotHeader.size, rest, f"snapshot {i} entry")
        extra = body[: sh.extra_data_size]
        vm_state = sh.vm_state_size
        disk_size = None
        if len(extra) >= 8:
            vm_state = int.from_bytes(extra[0:8], "big")
        if len(extra) >= 16:
            disk_size = int.from_bytes(extra[8:16], "big")
        ident = body[sh.extra_data_size : sh.extra_data_size + sh.id_str_size]
        name = body[sh.extra_data_size + sh.id_str_size :]
        size = SnapshotHeader.size + rest
        entry_size = size + (-size % 8)
        out.append(
            Snapshot(
                id=ident.decode("utf-8", "replace"),
                name=name.decode("utf-8", "replace"),
                l1_offset=sh.l1_table_offset,
                l1_size=sh.l1_size,
                vm_state_size=vm_state,
                disk_size=disk_size,
                date_sec=sh.date_sec,
                entry_size=entry_size,
            )
        )
        pos += entry_size
    return out
