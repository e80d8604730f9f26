"""Volume groups, physical and logical volumes as LVM2's text metadata describes them.

Sizes in the metadata are in 512-byte sectors (``extent_size``, ``pe_start``, ``stripe_size``)
and extents; the model keeps those units and offers byte helpers.  Linear LVs are written by
LVM as ``type = "striped"`` with ``stripe_count = 1``; every other segment type (mirror, raid*,
thin, cache, snapshot, vdo, ...) is kept by name so inspection can report it, and refused when
something asks to read the LV.  Problems confined to one LV are stored on that LV (``error``)
rather than raised, so one odd volume does not hide the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.errors import VmferryError
from vmferry.guest.errors import GuestLimitError
from vmferry.guest.lvm.config import Section
from vmferry.guest.lvm.errors import LvmMetadataError, UnsupportedSegmentError

SECTOR = 512
MAX_PVS = 1024
MAX_LVS = 16384
MAX_SEGMENTS = 16384
MAX_STRIPES = 128  # LVM's own limit is 128 stripes
#: extent_size and pe_count are 32-bit on disk; larger values are not LVM's.
MAX_U32 = (1 << 32) - 1
#: Segment types vmferry maps; ``linear`` is accepted for hand-written metadata.
MAPPED_TYPES = frozenset({"striped", "linear"})


@dataclass
class PhysicalVolume:
    name: str  # pv0, pv1, ... (the key inside the VG)
    uuid: str
    device_hint: str | None  # the guest's device name when the metadata was written
    pe_start: int  # sectors
    pe_count: int
    dev_size: int | None  # sectors
    status: list[str]


@dataclass(frozen=True)
class Stripe:
    pv: str  # PV key (pv0) the stripe lives on
    start_extent: int  # first extent on that PV


@dataclass
class Segment:
    start_extent: int  # in the LV
    extent_count: int
    type: str
    stripes: list[Stripe] = field(default_factory=list)  # mapped types only
    stripe_size: int = 0  # sectors; 0 for a single stripe
    origin: str | None = None  # snapshot segments: the LV they are a snapshot of

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "type": "linear" if self.type == "striped" and len(self.stripes) == 1 else self.type,
            "start_extent": self.start_extent,
            "extent_count": self.extent_count,
        }
        if self.stripes:
            out["stripes"] = [{"pv": s.pv, "start_extent": s.start_extent} for s in self.stripes]
            if len(self.stripes) > 1:
                out["stripe_size"] = self.stripe_size * SECTOR
        return out


@dataclass
class LogicalVolume:
    name: str
    uuid: str
    status: list[str]
    segments: list[Segment]
    extent_count: int
    error: VmferryError | None = None  # why it cannot be mapped (unsupported or inconsistent)
    snapshot_origin: bool = False  # old-style snapshots exist: writing would break them

    @property
    def visible(self) -> bool:
        return "VISIBLE" in self.status

    @property
    def segment_types(self) -> list[str]:
        return sorted({s.to_json()["type"] for s in self.segments})  # type: ignore[misc]


@dataclass
class VolumeGroup:
    name: str
    uuid: str
    seqno: int
    extent_size: int  # sectors
    status: list[str]
    pvs: dict[str, PhysicalVolume]
    lvs: dict[str, LogicalVolume]

    @property
    def extent_bytes(self) -> int:
        return self.extent_size * SECTOR

    def pv_by_uuid(self, uuid: str) -> PhysicalVolume | None:
        return next((p for p in self.pvs.values() if p.uuid == uuid), None)


def vg_sections(root: Section) -> list[Section]:
    """The VG section(s) of a metadata text: top-level sections holding ``physical_volumes``."""
    return [s for s in root.sections.values() if "physical_volumes" in s.sections]


def build_volume_group(vg: Section) -> VolumeGroup:
    """Turn one parsed VG section into the model, validating what mapping relies on."""
    extent_size = vg.integer("extent_size")
    if not 1 <= extent_size <= MAX_U32:
        raise LvmMetadataError(f"VG {vg.name}: extent_size {extent_size} is not 1..2^32-1")
    seqno = vg.integer("seqno")
    pvs_section = vg.section("physical_volumes")
    if len(pvs_section.sections) > MAX_PVS:
        raise GuestLimitError(f"VG {vg.name} lists more than {MAX_PVS} physical volumes")
    pvs: dict[str, PhysicalVolume] = {}
    for key, s in pvs_section.sections.items():
        pe_start, pe_count = s.integer("pe_start"), s.integer("pe_count")
        if not 0 <= pe_start <= 1 << 48 or not 0 <= pe_count <= MAX_U32:
            raise LvmMetadataError(f"VG {vg.name}: PV {key} pe_start/pe_count out of range")
        dev_size = s.values.get("dev_size")
        pvs[key] = PhysicalVolume(
            key,
            s.text("id"),
            s.text("device") if "device" in s.values else None,
            pe_start,
            pe_count,
            dev_size if isinstance(dev_size, int) else None,
            s.strings("status"),
        )
    lvs: dict[str, LogicalVolume] = {}
    lvs_section = vg.sections.get("logical_volumes", Section("logical_volumes"))
    if len(lvs_section.sections) > MAX_LVS:
        raise GuestLimitError(f"VG {vg.name} lists more than {MAX_LVS} logical volumes")
    for key, s in lvs_section.sections.items():
        lvs[key] = _logical_volume(vg.name, key, s, pvs)
    for lv in lvs.values():
        for seg in lv.segments:
            if seg.type == "snapshot" and seg.origin in lvs:
                lvs[seg.origin].snapshot_origin = True
    return VolumeGroup(vg.name, vg.text("id"), seqno, extent_size, vg.strings("status"), pvs, lvs)


def _logical_volume(
    vg: str, name: str, s: Section, pvs: dict[str, PhysicalVolume]
) -> LogicalVolume:
    lv = LogicalVolume(name, s.text("id", ""), s.strings("status"), [], 0)
    try:
        _segments(vg, lv, s, pvs)
    except (LvmMetadataError, GuestLimitError, UnsupportedSegmentError) as exc:
        lv.error = exc
    return lv


def _segments(vg: str, lv: LogicalVolume, s: Section, pvs: dict[str, PhysicalVolume]) -> None:
    where = f"LV {vg}/{lv.name}"
    segs = [sub for key, sub in s.sections.items() if key.startswith("segment")]
    if len(segs) > MAX_SEGMENTS:
        raise GuestLimitError(f"{where} has more than {MAX_SEGMENTS} segments")
    declared = s.values.get("segment_count")
    if declared is not None and declared != len(segs):
        raise LvmMetadataError(f"{where}: segment_count {declared} but {len(segs)} segments")
    unsupported: list[str] = []
    for sub in segs:
        seg = Segment(sub.integer("start_extent"), sub.integer("extent_count"), sub.text("type"))
        if seg.type == "snapshot" and isinstance(sub.values.get("origin"), str):
            seg.origin = str(sub.values["origin"])
        lv.segments.append(seg)
        if seg.type not in MAPPED_TYPES:
            unsupported.append(seg.type)
            continue
        _stripes(where, seg, sub, pvs)
    lv.segments.sort(key=lambda g: g.start_extent)
    at = 0
    for seg in lv.segments:
        if seg.start_extent != at or not 0 < seg.extent_count <= MAX_U32 * MAX_STRIPES:
            raise LvmMetadataError(
                f"{where}: segment at extent {seg.start_extent} (+{seg.extent_count}) "
                f"does not follow the previous one (extent {at})"
            )
        at += seg.extent_count
    lv.extent_count = at
    if unsupported:
        kinds = sorted(set(unsupported))
        raise UnsupportedSegmentError(
            f"{where} uses segment type {', '.join(kinds)}; vmferry maps linear and striped "
            "volumes only",
            features=kinds,
            hint="activate the volume with LVM on a host, or convert it to linear (lvconvert)",
        )


def _stripes(where: str, seg: Segment, sub: Section, pvs: dict[str, PhysicalVolume]) -> None:
    count = sub.integer("stripe_count", 1)
    if not 1 <= count <= MAX_STRIPES:
        raise LvmMetadataError(f"{where}: stripe_count {count} is not 1..{MAX_STRIPES}")
    raw = sub.array("stripes")
    if len(raw) != 2 * count:
        raise LvmMetadataError(f"{where}: {count} stripes but {len(raw) // 2} listed")
    if seg.extent_count % count:
        raise LvmMetadataError(
            f"{where}: {seg.extent_count} extents do not divide into {count} stripes"
        )
    per = seg.extent_count // count
    for i in range(count):
        pv, start = raw[2 * i], raw[2 * i + 1]
        if not isinstance(pv, str) or not isinstance(start, int):
            raise LvmMetadataError(f"{where}: stripe {i} is not a (name, extent) pair")
        if pv not in pvs:
            raise UnsupportedSegmentError(
                f"{where}: stripe {i} lies on {pv!r}, which is not a physical volume of the VG "
                "(a stacked or pvmove volume)",
                features=["stacked"],
            )
        if start < 0 or start + per > pvs[pv].pe_count:
            raise LvmMetadataError(
                f"{where}: stripe {i} extents {start}..{start + per - 1} are outside PV {pv} "
                f"({pvs[pv].pe_count} extents)"
            )
        seg.stripes.append(Stripe(pv, start))
    if count > 1:
        seg.stripe_size = sub.integer("stripe_size")
        if not 1 <= seg.stripe_size <= MAX_U32:
            raise LvmMetadataError(f"{where}: stripe_size {seg.stripe_size} is out of range")
