"""Streamed writeback of fresh outputs (``BlockFile.start_writeback``).

What must hold: every data range written through the page cache is handed to writeback once,
as large ranges even when metadata writes come between its pieces; metadata ranges are left
to the final sync (starting and waiting for a table page every chunk would be a synchronous
small write per chunk); the writer waits for the oldest ranges once more than WRITEBACK_LAG is
in flight, so the dirty memory of a copy stays bounded; no call ever passes an empty range
(to sync_file_range a length of 0 means "to the end of the file"); the bookkeeping stays
bounded whatever the write pattern.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmferry.disk import blockfile
from vmferry.disk.blockfile import WRITEBACK_MIN, BlockFile

WRITE, WAIT = 2, 7  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER

MiB = 1 << 20


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Record (offset, length, flags) of every sync_file_range call, and still make it."""
    real_fallocate, real_sfr = blockfile._libc()
    seen: list[tuple[int, int, int]] = []

    def recording(fd: int, offset: int, length: int, flags: int) -> int:
        seen.append((offset, length, flags))
        return real_sfr(fd, offset, length, flags) if real_sfr is not None else 0

    monkeypatch.setattr(blockfile, "_libc", lambda: (real_fallocate, recording))
    return seen


def _out(tmp_path: Path) -> BlockFile:
    return BlockFile.open(tmp_path / "out.img", writable=True, create=True)


def test_pieces_of_one_run_are_one_range_with_metadata_between(tmp_path, calls):
    bf = _out(tmp_path)
    try:
        bf.write(0, bytes(512))  # a header: small, left to the final sync
        bf.write(MiB, b"\x01" * (512 << 10))
        bf.write(1536, b"\x02" * 16)  # a table entry between the pieces of the data run
        bf.write(MiB + (512 << 10), b"\x03" * (512 << 10))
        bf.write(2 * MiB, b"\x04" * (256 << 10))
        bf.start_writeback()
        assert calls == [(MiB, MiB + (256 << 10), WRITE)]
        bf.start_writeback()  # nothing new written: nothing started again
        assert len(calls) == 1
    finally:
        bf.close()
    with open(tmp_path / "out.img", "rb") as f:
        data = f.read()
    assert data[1536:1552] == b"\x02" * 16
    assert data[MiB : 2 * MiB] == b"\x01" * (512 << 10) + b"\x03" * (512 << 10)


def test_writer_waits_for_the_oldest_ranges_beyond_the_lag(tmp_path, calls, monkeypatch):
    monkeypatch.setattr(blockfile, "WRITEBACK_LAG", 2 * MiB)
    bf = _out(tmp_path)
    try:
        for i in range(5):
            bf.write(i * MiB, bytes([i + 1]) * MiB)
            bf.start_writeback()
    finally:
        bf.close()
    started = [c for c in calls if c[2] == WRITE]
    waited = [c for c in calls if c[2] == WAIT]
    assert started == [(i * MiB, MiB, WRITE) for i in range(5)]
    # more than 2 MiB in flight after the third range: the first is waited for, and so on
    assert waited == [(0, MiB, WAIT), (MiB, MiB, WAIT), (2 * MiB, MiB, WAIT)]
    order = [c[:2] for c in calls]
    assert order.index((0, MiB)) < order.index((2 * MiB, MiB)) < len(order) - 1


def test_empty_and_small_writes_never_reach_sync_file_range(tmp_path, calls):
    bf = _out(tmp_path)
    try:
        bf.write(4096, b"")
        bf.write(0, bytes(WRITEBACK_MIN - 1))
        bf.start_writeback()
    finally:
        bf.close()
    assert calls == []


def test_scattered_writes_keep_bounded_ranges_that_cover_every_large_one(tmp_path, calls):
    bf = _out(tmp_path)
    large = [(i * 4 * MiB, WRITEBACK_MIN) for i in range(200)]
    try:
        for n, (offset, length) in enumerate(large):
            bf.write(offset, b"\x05" * length)
            bf.write(900 * MiB + n * 8192, b"\x06" * 512)  # metadata far away, not adjacent
        assert len(bf._dirty) <= blockfile._DIRTY_RANGES_MAX + 1
        bf.start_writeback()
    finally:
        bf.close()
    ranges = [(o, o + n) for o, n, flags in calls if flags == WRITE]
    assert all(n > 0 for _, n, _ in calls)
    for offset, length in large:
        assert any(lo <= offset and offset + length <= hi for lo, hi in ranges)


def test_convert_synced_streams_its_data_to_disk_as_it_goes(tmp_path, calls, monkeypatch):
    """A synced convert starts writeback of every data range of the output (not O_DIRECT: a
    fresh file fills faster through writeback; docs/engine.md, "Streamed writeback")."""
    from vmferry.ops import convert as convert_mod

    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 8):
            f.seek(i * MiB)
            f.write(os.urandom(4 * MiB))
    opened_direct: list[str] = []
    real_open = blockfile._DirectWriter.open
    monkeypatch.setattr(
        blockfile._DirectWriter,
        "open",
        classmethod(lambda cls, owner: opened_direct.append(str(owner.path)) or real_open(owner)),
    )
    convert_mod.convert(src, tmp_path / "out.vhd")
    assert opened_direct == []
    started = sum(n for _, n, flags in calls if flags == WRITE)
    assert started >= 32 * MiB  # every data byte, plus the pages its bitmaps share
    with open(src, "rb") as a:
        raw = a.read()
    from vmferry import open as vopen

    with vopen(tmp_path / "out.vhd") as disk:
        assert disk.read(0, 64 * MiB) == raw
