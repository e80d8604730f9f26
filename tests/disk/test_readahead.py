"""read_ahead: the bytes come in plan order, a failed read raises in the consumer in its
turn, and stopping early (or failing) leaves no reader thread behind and no read in flight."""

from __future__ import annotations

import threading

import pytest

from vmferry.disk.readahead import read_ahead, read_ahead_into


class Source:
    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.reads: list[int] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        if offset == self.fail_at:
            raise OSError(5, "Input/output error")
        return bytes([offset % 256]) * length


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vmferry-read"]


def test_bytes_come_in_plan_order() -> None:
    src = Source()
    plan = [(src, i, 1 + i % 7) for i in range(200)]
    assert list(read_ahead(plan)) == [bytes([i % 256]) * (1 + i % 7) for i in range(200)]
    assert not _readers()


def test_a_failed_read_raises_in_its_turn() -> None:
    src = Source(fail_at=5)
    got = []
    with pytest.raises(OSError, match="Input/output"):
        for buf in read_ahead([(src, i, 4) for i in range(50)]):
            got.append(buf)
    assert len(got) == 5  # every chunk before the failed one was delivered
    assert not _readers()
    assert src.reads == list(range(6))  # and nothing was read past the failure


def test_closing_early_stops_the_reader() -> None:
    src = Source()
    chunks = read_ahead([(src, i, 4) for i in range(1000)], depth=2)
    next(chunks)
    next(chunks)
    chunks.close()
    assert not _readers()
    assert len(src.reads) <= 2 + 2 + 1  # consumed, read ahead, and at most one in flight


class IntoSource(Source):
    def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = self.read(offset, len(view))


def test_read_into_reuses_a_few_page_aligned_buffers() -> None:
    import ctypes

    src = IntoSource()
    plan = [(src, i, 4096 * (1 + i % 3)) for i in range(60)]
    seen: set[int] = set()
    for i, view in enumerate(read_ahead_into(plan, depth=2)):
        assert view.tobytes() == bytes([i % 256]) * plan[i][2]
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        assert address % 4096 == 0
        seen.add(address)
    assert len(seen) <= 3  # depth + 1 buffers, whatever the plan's length
    assert not _readers()


def test_read_into_a_failed_read_raises_in_its_turn_and_closing_stops_it() -> None:
    src = IntoSource(fail_at=5)
    got = []
    with pytest.raises(OSError, match="Input/output"):
        for view in read_ahead_into([(src, i, 4) for i in range(50)]):
            got.append(view.tobytes())
    assert got == [bytes([i]) * 4 for i in range(5)]
    assert not _readers()
    src = IntoSource()
    chunks = read_ahead_into([(src, i, 4) for i in range(1000)], depth=2)
    next(chunks)
    next(chunks)
    chunks.close()
    assert not _readers()
    assert len(src.reads) <= 2 + 2 + 1
