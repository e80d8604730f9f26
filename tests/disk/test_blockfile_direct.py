"""Direct (O_DIRECT) writes of durable outputs: same bytes as buffered writes, never an error.

The interesting cases are the ones where the page cache and the direct path meet: unaligned
edges written through the cache around a direct interior, a buffered write into a page beside
a direct one, buffers that are not page-aligned (bounced), and a filesystem that refuses
O_DIRECT (the write silently goes through the cache from then on).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from vmferry.disk import blockfile
from vmferry.disk.blockfile import DIRECT_MIN, BlockFile


def _fresh(tmp_path: Path, size: int = 8 << 20) -> BlockFile:
    bf = BlockFile.open(tmp_path / "out.img", writable=True, create=True)
    bf.truncate(size)
    return bf


def _disk_bytes(path: Path, offset: int, length: int) -> bytes:
    """What a reader that did not write the file sees (a new descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _direct_supported(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not _direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    return tmp_path


def _fail_direct(monkeypatch: pytest.MonkeyPatch, bf: BlockFile, err: int) -> list[int]:
    """Make every write on ``bf``'s direct descriptor fail with ``err``; returns the offsets
    tried there (the cached descriptor keeps working)."""
    direct_fd = bf._direct.fd  # type: ignore[union-attr]
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    tried: list[int] = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd == direct_fd:
            tried.append(offset)
            raise OSError(err, os.strerror(err))
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    def pwritev(fd: int, buffers: list, offset: int) -> int:
        if fd == direct_fd:
            tried.append(offset)
            raise OSError(err, os.strerror(err))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    return tried


def test_unaligned_bytes_are_bounced_and_edges_stay_buffered(direct_dir: Path) -> None:
    bf = _fresh(direct_dir)
    assert bf.write_direct()
    data = os.urandom(DIRECT_MIN * 3 + 1234)  # bytes: read-only, not page-aligned
    offset = 4096 * 5 + 777  # neither end on a page
    bf.write(offset, data)
    small = os.urandom(100)
    bf.write(10, small)  # buffered, in a page of its own
    bf.sync_now()
    bf.close()
    path = direct_dir / "out.img"
    assert _disk_bytes(path, offset, len(data)) == data
    assert _disk_bytes(path, 10, 100) == small
    assert _disk_bytes(path, 110, offset - 110) == bytes(offset - 110)


def test_page_aligned_buffer_is_written_without_a_copy(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf = _fresh(direct_dir)
    assert bf.write_direct()
    buf = mmap.mmap(-1, DIRECT_MIN * 2)
    buf.write(os.urandom(len(buf)))
    bounced: list[int] = []
    real = blockfile._DirectWriter._bounce_view
    monkeypatch.setattr(
        blockfile._DirectWriter, "_bounce_view", lambda self: bounced.append(1) or real(self)
    )
    view = memoryview(buf)
    bf.write(1 << 20, view)
    del view
    assert not bounced, "an aligned buffer must not be copied"
    bf.close()
    assert _disk_bytes(direct_dir / "out.img", 1 << 20, len(buf)) == bytes(buf)
    buf.close()


def test_cached_and_direct_writes_to_neighbouring_bytes_are_coherent(direct_dir: Path) -> None:
    """A bitmap sector written through the cache right before a block written directly."""
    bf = _fresh(direct_dir)
    assert bf.write_direct()
    bitmap = b"\xff" * 512
    bf.write(4096 * 8 - 512, bitmap)  # cached, same page as nothing direct
    block = os.urandom(DIRECT_MIN)
    bf.write(4096 * 8, block)  # direct interior, starts on the next page
    bf.write(4096 * 8 + 100, b"patched")  # cached write into a page just written directly
    # read back through this descriptor (the page cache) and a new one
    assert bf.pread(4096 * 8 - 512, 512) == bitmap
    expect = bytearray(block)
    expect[100:107] = b"patched"
    assert bf.pread(4096 * 8, len(block)) == bytes(expect)
    bf.sync_now()
    bf.close()
    assert _disk_bytes(direct_dir / "out.img", 4096 * 8, len(block)) == bytes(expect)


def test_a_refusing_filesystem_falls_back_to_the_page_cache(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf = _fresh(direct_dir)
    assert bf.write_direct()
    refused = _fail_direct(monkeypatch, bf, errno.EINVAL)
    data = os.urandom(DIRECT_MIN * 2)
    bf.write(0, data)
    bf.write(len(data), data)
    assert len(refused) == 1, "after one refusal direct writes stay off"
    monkeypatch.undo()
    bf.close()
    assert _disk_bytes(direct_dir / "out.img", 0, 2 * len(data)) == data + data


def test_other_errors_are_not_swallowed(direct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bf = _fresh(direct_dir)
    assert bf.write_direct()
    _fail_direct(monkeypatch, bf, errno.ENOSPC)
    with pytest.raises(OSError) as info:
        bf.write(0, os.urandom(DIRECT_MIN))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    bf.close()


def test_no_direct_for_read_only_files_or_when_open_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    ro = BlockFile.open(path)
    assert not ro.write_direct()
    ro.close()
    real_open = os.open

    def refuse(p: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    bf = _fresh(tmp_path)
    assert not bf.write_direct()
    data = os.urandom(DIRECT_MIN)
    bf.write(0, data)
    bf.close()
    monkeypatch.setattr(os, "open", real_open)
    assert _disk_bytes(tmp_path / "out.img", 0, len(data)) == data


def _pieces(sizes: list[int]) -> list[bytes]:
    return [os.urandom(n) for n in sizes]


@pytest.mark.parametrize("direct", [True, False])
def test_pieces_are_written_back_to_back(direct_dir: Path, direct: bool) -> None:
    """A VHD-like run (512-byte bitmaps between 2 MiB blocks) crossing the bounce buffer's
    size, starting and ending off a page: the same bytes whether direct or cached."""
    bf = _fresh(direct_dir, 32 << 20)
    assert bf.write_direct() is True or not direct
    if not direct:
        bf._direct = None
    pieces = _pieces([512, 2 << 20] * 5 + [512, 1000])
    offset = 4096 * 3 + 512
    bf.write_pieces(offset, pieces)
    bf.write_pieces(100, [b"ab", b"", b"cd"])  # small: all through the cache
    total = sum(len(p) for p in pieces)
    assert bf.size == 32 << 20
    bf.sync_now()
    bf.close()
    path = direct_dir / "out.img"
    assert _disk_bytes(path, offset, total) == b"".join(pieces)
    assert _disk_bytes(path, 100, 4) == b"abcd"
    assert _disk_bytes(path, offset + total, 4096) == bytes(4096)


def _record_writes(
    monkeypatch: pytest.MonkeyPatch, bf: BlockFile
) -> dict[str, list[list[memoryview]]]:
    """Every write syscall on ``bf`` as its list of buffers, by descriptor (direct, cached)."""
    direct_fd = bf._direct.fd  # type: ignore[union-attr]
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    calls: dict[str, list[list[memoryview]]] = {"direct": [], "cached": []}

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls["direct" if fd == direct_fd else "cached"].append([memoryview(data)])
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, buffers: list, offset: int) -> int:
        calls["direct" if fd == direct_fd else "cached"].append(list(buffers))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    return calls


def test_pieces_go_direct_in_bounce_sized_requests(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf = _fresh(direct_dir, 32 << 20)
    assert bf.write_direct()
    calls = _record_writes(monkeypatch, bf)
    pieces = _pieces([512, 2 << 20] * 4)  # 8 MiB + 2 KiB from a page boundary
    bf.write_pieces(0, pieces)
    monkeypatch.undo()
    assert [sum(map(len, c)) for c in calls["direct"]] == [blockfile._BOUNCE_SIZE]
    assert [sum(map(len, c)) for c in calls["cached"]] == [2048]
    bf.close()
    assert _disk_bytes(direct_dir / "out.img", 0, 4 * (512 + (2 << 20))) == b"".join(pieces)


def _aligned_blocks(count: int, size: int) -> tuple[mmap.mmap, list[memoryview]]:
    buf = mmap.mmap(-1, count * size)
    buf[:] = os.urandom(count * size)
    view = memoryview(buf)
    return buf, [view[i * size : (i + 1) * size] for i in range(count)]


def test_aligned_pieces_among_bounced_ones_are_not_copied(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of (zeros +) bitmap from bytes, then 2 MiB of a page-aligned read buffer, four
    times: one pwritev, the read buffer's slices in it as they are, the pages bounced."""
    bf = _fresh(direct_dir, 32 << 20)
    assert bf.write_direct()
    buf, blocks = _aligned_blocks(4, 2 << 20)
    pages = _pieces([4096] * 4)
    pieces = [p for pair in zip(pages, blocks, strict=True) for p in pair]
    calls = _record_writes(monkeypatch, bf)
    bf.write_pieces(8192, pieces)
    monkeypatch.undo()
    assert calls["cached"] == []
    [iov] = calls["direct"]
    assert [len(v) for v in iov] == [4096, 2 << 20] * 4
    assert all(v.obj is buf for v in iov[1::2])  # the caller's memory, no copy
    assert all(v.obj is not buf for v in iov[0::2])
    del iov, calls
    bf.close()
    expect = b"".join(bytes(p) for p in pieces)
    assert _disk_bytes(direct_dir / "out.img", 8192, len(expect)) == expect


def test_an_aligned_buffer_off_a_file_page_is_bounced(direct_dir: Path) -> None:
    """After 512 bytes the file position is off a page: an aligned buffer cannot go as it is,
    and the bytes still land right (the gathered pieces always restart on a page)."""
    bf = _fresh(direct_dir, 32 << 20)
    assert bf.write_direct()
    _buf, blocks = _aligned_blocks(3, 1 << 20)
    pieces = [b"x" * 512, blocks[0], b"y" * 3584, blocks[1], blocks[2], b"z" * 4096]
    bf.write_pieces(4096, pieces)
    bf.close()
    expect = b"".join(bytes(p) for p in pieces)
    assert _disk_bytes(direct_dir / "out.img", 4096, len(expect)) == expect


def test_short_direct_writes_go_on_where_they_stopped(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwritev may write less than asked (a page at a time here): the rest follows, in order,
    including a partly written buffer."""
    bf = _fresh(direct_dir, 32 << 20)
    assert bf.write_direct()
    direct_fd = bf._direct.fd  # type: ignore[union-attr]
    real_pwritev = os.pwritev
    calls: list[int] = []

    def pwritev(fd: int, buffers: list, offset: int) -> int:
        if fd != direct_fd:
            return real_pwritev(fd, buffers, offset)
        calls.append(offset)
        first = memoryview(buffers[0])
        return real_pwritev(fd, [first[: min(len(first), 3 * 4096)]], offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    _buf, blocks = _aligned_blocks(2, 128 << 10)
    pieces = [_pieces([4096])[0], blocks[0], _pieces([4096])[0], blocks[1]]
    bf.write_pieces(0, pieces)
    monkeypatch.undo()
    total = sum(len(p) for p in pieces)
    assert len(calls) == 2 * (1 + 11)  # each page, and each 128 KiB in 3-page steps
    assert calls == sorted(calls) and calls[-1] < total
    bf.close()
    expect = b"".join(bytes(p) for p in pieces)
    assert _disk_bytes(direct_dir / "out.img", 0, total) == expect


def test_a_write_of_many_aligned_pieces_is_split_at_the_iovec_limit(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf = _fresh(direct_dir, 32 << 20)
    assert bf.write_direct()
    count = blockfile._IOV_MAX + 10
    buf, blocks = _aligned_blocks(count, 4096)
    calls = _record_writes(monkeypatch, bf)
    bf.write_pieces(0, [b"", *blocks])
    monkeypatch.undo()
    assert [len(c) for c in calls["direct"]] == [blockfile._IOV_MAX, 10]
    del calls
    bf.close()
    assert _disk_bytes(direct_dir / "out.img", 0, count * 4096) == bytes(buf)


def test_refused_pieces_fall_back_to_the_page_cache(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf = _fresh(direct_dir, 32 << 20)
    assert bf.write_direct()
    refused = _fail_direct(monkeypatch, bf, errno.EINVAL)
    pieces = _pieces([512, DIRECT_MIN, 512, DIRECT_MIN])
    bf.write_pieces(4096, pieces)
    assert refused == [4096] and not bf.writes_direct  # one try, then the cache
    monkeypatch.undo()
    bf.close()
    assert _disk_bytes(direct_dir / "out.img", 4096, 2 * (512 + DIRECT_MIN)) == b"".join(pieces)


def test_cached_writes_are_handed_over_in_bounded_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large buffered writes reach the kernel in CACHED_WRITE_MAX pieces (why: blockfile.py)."""
    bf = _fresh(tmp_path, 0)
    real_pwrite = os.pwrite
    sizes: list[int] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(3 * blockfile.CACHED_WRITE_MAX + 5)
    bf.write(1 << 20, data)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert sizes == [blockfile.CACHED_WRITE_MAX] * 3 + [5]
    assert bf.size == (1 << 20) + len(data)
    bf.close()
    assert _disk_bytes(tmp_path / "out.img", 1 << 20, len(data)) == data
