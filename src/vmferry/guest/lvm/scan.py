"""Put an image's LVM together: PV labels → newest metadata per VG → PVs bound to partitions.

Every PV with a metadata area holds a copy of its VG's text metadata; LVM keeps them equal,
but a crash between writes leaves some behind, so the copy with the highest ``seqno`` wins
(older ones are reported).  VGs are told apart by UUID, not name (two cloned guests' disks may
both hold a ``VolGroup00``).  A PV of the VG that is not among this image's partitions is kept
as missing: the LVs that need it say so by name when opened, the others still work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.errors import VmferryError
from vmferry.guest.errors import GuestLimitError
from vmferry.guest.lvm.config import Section, parse_config
from vmferry.guest.lvm.errors import LvmMetadataError
from vmferry.guest.lvm.label import PvLabel, read_pv_label
from vmferry.guest.lvm.metadata import (
    SECTOR,
    LogicalVolume,
    VolumeGroup,
    build_volume_group,
    vg_sections,
)
from vmferry.guest.lvm.volume import LogicalVolumeDisk
from vmferry.guest.overlay import ReadableDisk


@dataclass
class FoundPv:
    """A partition (or the whole disk) carrying an LVM2 label."""

    device: ReadableDisk
    partition: int | None  # Linux partition number; None: the whole disk
    label: PvLabel | None = None
    vg: str | None = None  # the VG name it was bound to
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "uuid": self.label.uuid if self.label else None,
            "vg": self.vg,
            "metadata_copies": len(self.label.metadata) if self.label else 0,
            "error": self.error,
        }


@dataclass
class LvmScan:
    volume_groups: list[VolumeGroup] = field(default_factory=list)
    pvs: list[FoundPv] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _devices: dict[str, dict[str, FoundPv]] = field(default_factory=dict)  # vg uuid → key → pv

    def pv_partition(self, vg: VolumeGroup, key: str) -> FoundPv | None:
        return self._devices.get(vg.uuid, {}).get(key)

    def open_lv(self, vg: VolumeGroup, lv: LogicalVolume) -> LogicalVolumeDisk:
        """The LV as a disk; raises the LV's named error (unsupported, missing PV, ...)."""
        bound = self._devices.get(vg.uuid, {})
        return LogicalVolumeDisk(vg, lv, {k: f.device for k, f in bound.items()})

    def to_json(self) -> dict[str, object]:
        vgs = []
        for vg in self.volume_groups:
            pvs = []
            for key, pv in vg.pvs.items():
                found = self.pv_partition(vg, key)
                pvs.append(
                    {
                        "name": key,
                        "uuid": pv.uuid,
                        "device_hint": pv.device_hint,
                        "partition": found.partition if found else None,
                        "missing": found is None,
                        "pe_start": pv.pe_start * SECTOR,
                        "pe_count": pv.pe_count,
                    }
                )
            lvs = [
                {
                    "name": lv.name,
                    "uuid": lv.uuid,
                    "size": lv.extent_count * vg.extent_bytes,
                    "visible": lv.visible,
                    "status": lv.status,
                    "segment_types": lv.segment_types,
                    "segments": [s.to_json() for s in lv.segments],
                    "error": str(lv.error) if lv.error else None,
                }
                for lv in vg.lvs.values()
            ]
            vgs.append(
                {
                    "name": vg.name,
                    "uuid": vg.uuid,
                    "seqno": vg.seqno,
                    "extent_size": vg.extent_bytes,
                    "status": vg.status,
                    "pvs": pvs,
                    "lvs": lvs,
                }
            )
        return {
            "volume_groups": vgs,
            "physical_volumes": [p.to_json() for p in self.pvs],
            "warnings": self.warnings,
        }


def scan_lvm(candidates: list[tuple[ReadableDisk, int | None]]) -> LvmScan:
    """Read every candidate PV (device, partition number) and assemble the VGs on them."""
    scan = LvmScan()
    copies: dict[str, list[tuple[int, str, FoundPv, Section]]] = {}  # vg uuid → copies
    for device, partition in candidates:
        found = FoundPv(device, partition)
        scan.pvs.append(found)
        where = _where(partition)
        try:
            found.label = read_pv_label(device)
        except (LvmMetadataError, GuestLimitError) as exc:
            found.error = str(exc)
            scan.warnings.append(f"LVM PV on {where}: {exc}")
            continue
        for problem in found.label.problems:
            scan.warnings.append(f"LVM PV on {where}: {problem}")
        for copy in found.label.metadata:
            try:
                root = parse_config(copy.text)
                sections = vg_sections(root)
                if not sections:
                    raise LvmMetadataError("the metadata text holds no volume group")
                for section in sections:
                    vg_id, seqno = section.text("id"), section.integer("seqno")
                    copies.setdefault(vg_id, []).append((seqno, copy.text, found, section))
            except (LvmMetadataError, GuestLimitError) as exc:
                scan.warnings.append(f"LVM metadata on {where} (area at {copy.offset}): {exc}")
    names: dict[str, str] = {}
    for found_copies in copies.values():
        found_copies.sort(key=lambda c: -c[0])
        seqno, text, _, section = found_copies[0]
        for other_seqno, other_text, pv, _ in found_copies[1:]:
            if other_seqno < seqno:
                scan.warnings.append(
                    f"LVM PV on {_where(pv.partition)} holds older metadata "
                    f"(seqno {other_seqno} < {seqno}); the newest copy is used"
                )
            elif other_text != text:
                scan.warnings.append(
                    f"LVM metadata copies with seqno {seqno} differ; the first one is used"
                )
        try:
            vg = build_volume_group(section)
        except VmferryError as exc:
            scan.warnings.append(f"LVM VG {section.name}: {exc}")
            continue
        if vg.name in names.values():
            scan.warnings.append(f"two volume groups are named {vg.name}; names are ambiguous")
        names[vg.uuid] = vg.name
        scan.volume_groups.append(vg)
        scan._devices[vg.uuid] = _bind(scan, vg)
    return scan


def _bind(scan: LvmScan, vg: VolumeGroup) -> dict[str, FoundPv]:
    bound: dict[str, FoundPv] = {}
    for key, pv in vg.pvs.items():
        matches = [f for f in scan.pvs if f.label is not None and f.label.uuid == pv.uuid]
        if len(matches) > 1:
            parts = ", ".join(_where(m.partition) for m in matches)
            scan.warnings.append(
                f"PV {pv.uuid} of VG {vg.name} appears on {parts}; none is used (duplicate PV)"
            )
            continue
        if not matches:
            hint = f" (was {pv.device_hint})" if pv.device_hint else ""
            scan.warnings.append(f"PV {pv.uuid}{hint} of VG {vg.name} is not on this image")
            continue
        found = matches[0]
        found.vg = vg.name
        assert found.label is not None
        if found.label.pe_start is not None and found.label.pe_start != pv.pe_start * SECTOR:
            scan.warnings.append(
                f"PV {pv.uuid}: the label says extents start at byte {found.label.pe_start}, "
                f"the metadata at {pv.pe_start * SECTOR}; the metadata is used"
            )
        bound[key] = found
    return bound


def _where(partition: int | None) -> str:
    return f"partition {partition}" if partition is not None else "the whole disk"
