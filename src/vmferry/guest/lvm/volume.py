"""A logical volume as a disk: LV offsets mapped onto the extents of its physical volumes.

An LV is a list of segments; a segment of ``n`` stripes with a stripe size of ``s`` bytes puts
its chunk ``k`` on stripe ``k mod n``, row ``k div n``, at
``pe_start + (stripe start extent) * extent_size + row * s`` on that PV (``n = 1`` is linear).
Reads and writes are split at chunk and segment boundaries and passed to the PV devices, which
are partition views of the (overlaid) image, so filesystem writes inside an LV land in the
overlay like any other.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from vmferry.errors import UsageError
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.lvm.errors import LvmMetadataError, MissingPhysicalVolumeError
from vmferry.guest.lvm.metadata import SECTOR, LogicalVolume, VolumeGroup
from vmferry.guest.overlay import ReadableDisk


@dataclass(frozen=True)
class _Run:
    start: int  # byte offset in the LV
    size: int
    stripes: tuple[tuple[ReadableDisk, int], ...]  # (PV device, byte offset of stripe 0 row 0)
    stripe_size: int  # bytes; equal to size for a linear run


class LogicalVolumeDisk:
    """``read``/``write`` over an LV; built only when every extent it needs is on this image."""

    def __init__(self, vg: VolumeGroup, lv: LogicalVolume, devices: dict[str, ReadableDisk]):
        """``devices`` maps the VG's PV keys (pv0, ...) to the partition holding that PV."""
        if lv.error is not None:
            raise lv.error
        self.name = f"{vg.name}/{lv.name}"
        self.read_only_reason = (
            f"LV {self.name} has snapshots; writing it would corrupt them"
            if lv.snapshot_origin
            else None
        )
        ext = vg.extent_bytes
        runs: list[_Run] = []
        for seg in lv.segments:
            n = len(seg.stripes)
            per = seg.extent_count // n
            stripes = []
            for stripe in seg.stripes:
                pv = vg.pvs[stripe.pv]
                dev = devices.get(stripe.pv)
                if dev is None:
                    raise MissingPhysicalVolumeError(
                        f"LV {self.name} needs PV {pv.uuid}"
                        + (f" (was {pv.device_hint})" if pv.device_hint else "")
                        + ", which is not on this image",
                        pv_uuid=pv.uuid,
                        hint="inspect the disk that holds that PV together with this one",
                    )
                first = pv.pe_start * SECTOR + stripe.start_extent * ext
                end = first + per * ext
                if end > dev.virtual_size:
                    raise LvmMetadataError(
                        f"LV {self.name}: extents of PV {stripe.pv} end at byte {end}, past "
                        f"its {dev.virtual_size}-byte partition"
                    )
                stripes.append((dev, first))
            size = seg.extent_count * ext
            step = seg.stripe_size * SECTOR if n > 1 else size
            if (per * ext) % step:
                raise LvmMetadataError(
                    f"LV {self.name}: stripe size {step} does not divide the {per * ext}-byte "
                    "stripes (device-mapper refuses that table)"
                )
            runs.append(_Run(seg.start_extent * ext, size, tuple(stripes), step))
        self._runs = runs
        self._starts = [r.start for r in runs]
        self.virtual_size = lv.extent_count * ext

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        parts = [dev.read(at, n) for dev, at, n in self._map(offset, length)]
        return b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only_reason:
            raise GuestWriteRefusedError(self.read_only_reason)
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        pos = 0
        for dev, at, n in self._map(offset, len(view)):
            write = getattr(dev, "write", None)
            if write is None:
                raise UsageError("this disk is read-only")
            write(at, view[pos : pos + n])
            pos += n

    def _map(self, offset: int, length: int) -> Iterator[tuple[ReadableDisk, int, int]]:
        """(PV device, byte offset on it, byte count) pieces covering ``offset+length``."""
        i = bisect.bisect_right(self._starts, offset) - 1
        while length > 0:
            run = self._runs[i]
            inner = offset - run.start
            chunk, within = divmod(inner, run.stripe_size)
            row, stripe = divmod(chunk, len(run.stripes))
            dev, first = run.stripes[stripe]
            n = min(length, run.stripe_size - within, run.size - inner)
            yield dev, first + row * run.stripe_size + within, n
            offset += n
            length -= n
            if offset >= run.start + run.size:
                i += 1

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(f"range {offset}+{length} is outside the {self.virtual_size}-byte LV")
