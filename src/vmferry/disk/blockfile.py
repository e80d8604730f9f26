"""The one door through which every driver touches a file.

Two jobs, both about not trusting image contents:

* every read names *what* it reads and is bounds-checked against the file (and against a
  memory cap) before a byte is allocated, so a hostile header turns into a
  ``TruncatedImageError``/``ResourceLimitError`` naming the structure instead of a MemoryError;
* the file is locked the way qemu locks it (OFD byte-range locks at 100+perm / 200+perm), so a
  running qemu/libvirt VM and vmferry see each other and neither corrupts the other's image.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmferry.errors import (
    ImageLockedError,
    ResourceLimitError,
    TruncatedImageError,
    UsageError,
    VmferryError,
)

#: Largest single metadata read a driver may ask for (a 1 TiB VHDX BAT at 1 MiB blocks is 8 MiB;
#: a 64 TiB one at 32 MiB blocks is far less).  Data reads pass their own limit.
MAX_METADATA_READ = 256 * 1024 * 1024

# qemu's permission bits (include/block/block-common.h) and lock-byte bases (block/file-posix.c).
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200

_FLOCK = struct.Struct("hhqqi4x")
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER

#: O_DIRECT transfers: file offsets, lengths and buffer addresses aligned to this (a page: it
#: satisfies every logical block size and DMA alignment Linux filesystems ask for)
DIRECT_ALIGN = 4096
#: writes smaller than this stay in the page cache (metadata, partial clusters)
DIRECT_MIN = 256 << 10
#: the reusable aligned buffer that unaligned data is copied into for a direct write
_BOUNCE_SIZE = 8 << 20
#: buffers one pwritev takes (Linux's UIO_MAXIOV)
_IOV_MAX = 1024
#: the most one buffered write() hands the kernel at once.  Linux sizes a new page-cache folio
#: from the write's length and alignment, and a large folio needs a large free block; in a VM
#: whose balloon reports free memory to its host (free-page reporting, order 9 here) those
#: blocks have been handed back, and every page of them faults in the host again.  Measured
#: here (2 GiB written at 1 MiB boundaries, 5 shuffled rounds, median system time): pieces of
#: 1 MiB 4.8 s, 512 KiB 4.7 s, 256 KiB 2.2 s, 128 KiB 0.77 s, 64 KiB 1.0 s (docs/engine.md,
#: "Buffered write size").  16 syscalls a MiB cost ~20 ms a GiB.
CACHED_WRITE_MAX = 128 << 10
#: bytes of started writeback a writer may run ahead of before it waits for the oldest (bounds
#: the dirty and in-flight memory a long copy holds; see ``start_writeback``)
WRITEBACK_LAG = 64 << 20
#: smaller written ranges are left to the final sync (metadata; see ``start_writeback``)
WRITEBACK_MIN = 256 << 10
#: written ranges remembered between two ``start_writeback`` calls before small ones are dropped
_DIRTY_RANGES_MAX = 64


@functools.cache
def _libc() -> tuple[Any, Any]:
    """(fallocate, sync_file_range or None) from the C library the interpreter already links.

    Loaded on first use: ctypes is not needed to read an image, and start-up is part of every
    command.  (Not ctypes.util.find_library, which runs `ldconfig -p` in a subprocess.)
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    sfr = getattr(libc, "sync_file_range", None)
    if sfr is not None:
        sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return libc.fallocate, sfr


def _lock_struct(kind: int, byte: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)


class BlockFile:
    """A file opened for an image, with bounded reads, whole writes and qemu-style locks."""

    def __init__(self, path: str | os.PathLike[str], fd: int, writable: bool) -> None:
        self.path = Path(path)
        self.fd = fd
        self.writable = writable
        st = os.fstat(fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.size = st.st_size if not self.is_block_device else self._block_device_size()
        self.dev_ino = (st.st_dev, st.st_ino)
        self.blksize = st.st_blksize or 4096
        #: qemu's cache=unsafe: drivers' ordering fsyncs are skipped.  Only for a new output
        #: under a temporary name, which is synced once, whole, before it is renamed into place.
        self.cache_unsafe = False
        #: the name an output will have once complete (it is written under a temporary one)
        self.final_path: Path | None = None
        self._direct: _DirectWriter | None = None
        #: [start, end) written through the page cache since the last ``start_writeback``
        self._dirty: list[list[int]] = []
        #: ranges handed to writeback, oldest first, and their total size
        self._started: deque[tuple[int, int]] = deque()
        self._started_bytes = 0

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        create: bool = False,
        force_share: bool = False,
        lock: bool = True,
    ) -> BlockFile:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError as exc:
            raise VmferryError("no such file", path=str(path), hint="check the path") from exc
        except IsADirectoryError as exc:
            raise UsageError("is a directory, not an image", path=str(path)) from exc
        except PermissionError as exc:
            mode = "writing" if writable else "reading"
            raise VmferryError(f"permission denied opening for {mode}", path=str(path)) from exc
        except OSError as exc:
            raise VmferryError(f"cannot open: {exc.strerror}", path=str(path)) from exc
        bf = cls(path, fd, writable)
        if lock:
            try:
                bf._lock(force_share=force_share)
            except BaseException:
                os.close(fd)
                raise
        return bf

    def _block_device_size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    # --- locking ------------------------------------------------------------------------------

    def _lock(self, *, force_share: bool) -> None:
        """Take qemu's lock bytes and fail if another holder conflicts.

        A reader holds "consistent read" and refuses to share "write" (reading an image a VM is
        writing gives torn data), unless ``force_share`` (qemu-img's -U).  A writer also holds
        "write" and "resize" and shares neither.  Writing is never forced.
        """
        if force_share and not self.writable:
            return
        held = {PERM_CONSISTENT_READ}
        unshared = {PERM_WRITE, PERM_RESIZE}
        if self.writable:
            held |= {PERM_WRITE, PERM_RESIZE}
        try:
            for perm in held:
                self._setlk(fcntl.F_RDLCK, _LOCK_PERM_BASE + perm)
            for perm in unshared:
                self._setlk(fcntl.F_RDLCK, _LOCK_SHARED_BASE + perm)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise self._locked_error() from exc
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return  # filesystem without OFD locks: qemu carries on too
            raise
        # Someone refusing to share a permission we hold, or holding one we refuse to share.
        for perm in held:
            if self._conflicts(_LOCK_SHARED_BASE + perm):
                raise self._locked_error(perm)
        for perm in unshared:
            if self._conflicts(_LOCK_PERM_BASE + perm):
                raise self._locked_error(perm)

    def _setlk(self, kind: int, byte: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _lock_struct(kind, byte))

    def _conflicts(self, byte: int) -> bool:
        try:
            out = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _lock_struct(fcntl.F_WRLCK, byte))
        except OSError:
            return False
        return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK

    def _locked_error(self, perm: int | None = None) -> ImageLockedError:
        what = f' ("{_PERM_NAMES[perm]}" lock)' if perm is not None else ""
        hint = "shut the VM down first"
        if not self.writable:
            hint += ", or pass --force-share (-U) to read it anyway (data may be inconsistent)"
        return ImageLockedError(
            f"image is in use by another process, probably a running VM{what}",
            path=str(self.path),
            hint=hint,
        )

    # --- reading ------------------------------------------------------------------------------

    def read_exact(
        self, offset: int, length: int, what: str, *, limit: int = MAX_METADATA_READ
    ) -> bytes:
        """Read ``length`` bytes that must all be inside the file, or fail naming ``what``."""
        if offset < 0 or length < 0:
            raise TruncatedImageError(f"{what} has a negative offset or size", path=str(self.path))
        if length > limit:
            raise ResourceLimitError(
                f"{what} claims {length} bytes, more than the {limit}-byte limit",
                path=str(self.path),
                offset=offset,
            )
        if offset + length > self.size:
            raise TruncatedImageError(
                f"{what} ({length} bytes) extends past the end of the file ({self.size} bytes)",
                path=str(self.path),
                offset=offset,
            )
        data = self._pread(offset, length)
        if len(data) != length:
            raise TruncatedImageError(
                f"{what}: file ended while reading", path=str(self.path), offset=offset
            )
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes; past the end of file reads as zeros (sparse tails)."""
        data = self._pread(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pread_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` without an intermediate buffer; past the end is zeros."""
        got = self._preadv(offset, view)
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    def _preadv(self, offset: int, view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                break
            got += n
        return got

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def data_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Yield (offset, length, is_data) over [offset, offset+length) using SEEK_DATA/HOLE."""
        return self._data_runs(offset, min(offset + length, self.size))

    def _data_runs(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        pos = offset
        while pos < end:
            try:
                data_start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    yield pos, end - pos, False
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    yield pos, end - pos, True
                    return
                raise
            if data_start > pos:
                hole_end = min(data_start, end)
                yield pos, hole_end - pos, False
                pos = hole_end
                continue
            data_end = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            yield pos, data_end - pos, True
            pos = data_end

    @property
    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # --- writing ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; a short write is retried, never silently accepted."""
        view = _bytes_view(data)
        if self._direct is not None and len(view) >= DIRECT_MIN:
            self.write_pieces(offset, (view,))
            return
        self._pwrite_all(self.fd, view, offset)
        self.size = max(self.size, offset + len(view))

    def write_pieces(self, offset: int, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write ``pieces`` back to back from ``offset``: one write as far as the disk sees.

        Why: a format that interleaves metadata with data (a VHD block is its sector bitmap,
        then its data) would otherwise send the device one small request per piece.  With
        direct writes on, the page-aligned interior goes past the page cache (gathered into
        the bounce buffer when it is several pieces) in requests as large as the device wants;
        the edges stay buffered (Linux keeps the two coherent: a direct write flushes and
        drops cached pages).
        """
        views = [_bytes_view(p) for p in pieces]
        total = sum(len(v) for v in views)
        direct = self._direct
        if direct is not None and total >= DIRECT_MIN:
            lo = -offset % DIRECT_ALIGN
            hi = (total - lo) // DIRECT_ALIGN * DIRECT_ALIGN
            if hi and direct.write(offset + lo, _window(views, lo, lo + hi)):
                head = _placed(offset, _window(views, 0, lo))
                tail = _placed(offset + lo + hi, _window(views, lo + hi, total))
                for at, view in (*head, *tail):
                    self._pwrite_all(self.fd, view, at)
                self.size = max(self.size, offset + total)
                return
        for at, view in _placed(offset, views):
            self._pwrite_all(self.fd, view, at)
        self.size = max(self.size, offset + total)

    def _pwrite_all(self, fd: int, view: memoryview, offset: int) -> None:
        cached = fd == self.fd
        if cached:
            self._note_dirty(offset, offset + len(view))
        most = CACHED_WRITE_MAX if cached else len(view)
        while view:
            written = os.pwrite(fd, view[:most] if len(view) > most else view, offset)
            if written <= 0:
                raise VmferryError("short write", path=str(self.path), offset=offset)
            view = view[written:]
            offset += written

    @property
    def writes_direct(self) -> bool:
        """Large writes go past the page cache (``write_direct`` was asked for and works)."""
        return self._direct is not None and self._direct.fd >= 0

    def write_direct(self) -> bool:
        """Send large writes past the page cache (O_DIRECT) from now on; False if impossible.

        Why: a file written in place with ordering fsyncs (a merge's parent) would otherwise
        have each fsync wait for the data just copied into the cache; written directly, each
        byte crosses memory once and the fsyncs find only metadata to flush (qemu-img's
        ``-t none``).  A new output synced once at the end does better through the cache with
        ``start_writeback`` (docs/engine.md).  Only for files nothing else reads while they
        are written.
        """
        if not self.writable or self.fd < 0:
            return False
        if self._direct is None:
            self._direct = _DirectWriter.open(self)
        return self._direct is not None

    def truncate(self, size: int) -> None:
        if size == self.size == 0:
            # ext4 treats a truncate to zero as "file being replaced" and flushes the whole file
            # when it is closed (auto_da_alloc): a fresh output would pay a synchronous flush
            return
        os.ftruncate(self.fd, size)
        self.size = size

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range (reads back as zeros).  False when the filesystem cannot."""
        if length <= 0:
            return True
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        return _libc()[0](self.fd, mode, offset, length) == 0

    def preallocate(self, offset: int, length: int) -> None:
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            raise VmferryError(f"cannot preallocate: {exc.strerror}", path=str(self.path)) from exc
        self.size = max(self.size, offset + length)

    def fsync(self) -> None:
        """The ordering barrier drivers rely on (data before the pointer that publishes it)."""
        if self.writable and not self.cache_unsafe:
            os.fsync(self.fd)

    def _note_dirty(self, start: int, end: int) -> None:
        dirty = self._dirty
        for run in reversed(dirty[-4:]):
            if run[1] == start:  # the next piece of a sequential write (metadata between)
                run[1] = end
                return
        dirty.append([start, end])
        if len(dirty) > _DIRTY_RANGES_MAX:
            # scattered writes: keep the large ranges (small ones are left to the final sync),
            # or one range covering them all (writeback of a range touches only its dirty pages)
            large = [r for r in dirty if r[1] - r[0] >= WRITEBACK_MIN]
            if len(large) > _DIRTY_RANGES_MAX // 2:
                large = [[min(r[0] for r in large), max(r[1] for r in large)]]
            self._dirty = large

    def start_writeback(self) -> None:
        """Start writing to disk the data written since the last call; wait for what was
        started more than WRITEBACK_LAG bytes ago.

        Why: a copy whose output is synced at the end would otherwise leave all its data for
        that sync.  Started chunk by chunk, the kernel writes back with requests in flight
        while the copy goes on (measured here, 2 GiB synced: 1.5-1.8 s against 2.2-2.6 s for
        O_DIRECT writes, which ext4 takes one at a time into a new file), and the final sync
        finds little left.  Waiting for the oldest ranges keeps the dirty memory of a copy of
        any size bounded instead of leaving the kernel to throttle it.  Ranges smaller than
        WRITEBACK_MIN (metadata: a table page rewritten every chunk) are left to the final
        sync: starting and waiting for them would be a small synchronous write per call.
        Advisory: a failure here is reported by the final fsync.
        """
        dirty, self._dirty = self._dirty, []
        sync_file_range = _libc()[1]
        if not self.writable or sync_file_range is None or self.fd < 0:
            return
        started = self._started
        for start, end in dirty:
            if end - start >= WRITEBACK_MIN:
                sync_file_range(self.fd, start, end - start, _SYNC_FILE_RANGE_WRITE)
                started.append((start, end))
                self._started_bytes += end - start
        while self._started_bytes > WRITEBACK_LAG:
            start, end = started.popleft()
            self._started_bytes -= end - start
            sync_file_range(self.fd, start, end - start, _SYNC_FILE_RANGE_WAIT)

    def sync_now(self) -> None:
        """Make everything durable, whatever the cache mode (the last step of an output)."""
        if self.writable:
            os.fsync(self.fd)

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def slice(self, offset: int, length: int, name: str | None = None) -> SliceFile:
        """A read-only view of ``length`` bytes at ``offset`` (a member inside an archive).

        The view has its own descriptor (a ``dup``: closing it leaves this file open and the
        locks held) and is a ``BlockFile`` to whoever reads it, so a driver can open a disk
        stored inside a tar without a copy.  ``name`` only labels errors: ``path/name``.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TruncatedImageError(
                f"{name or 'slice'} ({length} bytes at {offset}) extends past the end of the file "
                f"({self.size} bytes)",
                path=str(self.path),
            )
        return SliceFile(self, offset, length, name)

    def __repr__(self) -> str:
        return f"BlockFile({str(self.path)!r}, writable={self.writable})"


class SliceFile(BlockFile):
    """Read-only window on part of another file; offsets are relative to the window."""

    def __init__(self, parent: BlockFile, offset: int, length: int, name: str | None) -> None:
        fd = os.dup(parent.fd)
        super().__init__(parent.path / name if name else parent.path, fd, False)
        self.base = offset
        self.size = length
        self.parent_path = parent.path

    def _pread(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return super()._pread(self.base + offset, min(length, self.size - offset))

    def _preadv(self, offset: int, view: memoryview) -> int:
        if offset >= self.size:
            return 0
        return super()._preadv(self.base + offset, view[: self.size - offset])

    def data_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        end = min(offset + length, self.size)
        if offset >= end:
            return
        for run_off, run_len, is_data in self._data_runs(self.base + offset, self.base + end):
            yield run_off - self.base, run_len, is_data

    def _read_only(self) -> UsageError:
        return UsageError("a slice of an archive is read-only", path=str(self.path))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise self._read_only()

    def truncate(self, size: int) -> None:
        raise self._read_only()

    def punch_hole(self, offset: int, length: int) -> bool:
        raise self._read_only()

    def preallocate(self, offset: int, length: int) -> None:
        raise self._read_only()

    @property
    def allocated_bytes(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"SliceFile({str(self.path)!r}, base={self.base}, size={self.size})"


class _DirectWriter:
    """A second descriptor on the same open file, with O_DIRECT, and an aligned bounce buffer.

    Reopened through ``/proc/self/fd`` so it is the very inode the caller holds (locks and all),
    even if the name has changed since.  Any refusal by the filesystem (EINVAL: no O_DIRECT,
    or an alignment it does not accept) turns direct writes off for good and the write is
    done through the page cache instead: never an error for the caller.
    """

    def __init__(self, owner: BlockFile, fd: int) -> None:
        self.owner = owner
        self.fd = fd
        self._bounce: Any = None  # mmap, page-aligned, made on first need

    @classmethod
    def open(cls, owner: BlockFile) -> _DirectWriter | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or owner.is_block_device:
            return None
        try:
            fd = os.open(f"/proc/self/fd/{owner.fd}", os.O_WRONLY | flag | os.O_CLOEXEC)
        except OSError:
            return None
        return cls(owner, fd)

    def write(self, offset: int, views: list[memoryview]) -> bool:
        """Write ``views`` back to back (page-aligned offset and total) directly; False: not
        done at all.

        A view of a page-aligned buffer that lands on a page boundary goes as it is (its whole
        pages); everything else is gathered into the bounce buffer, at page-aligned places.
        One ``pwritev`` then takes them in file order, so the device still sees one large
        request, and data read into aligned buffers is never copied (a VHD block: a page of
        zeros and bitmap from the bounce buffer, then 2 MiB straight from the read buffer).
        """
        if self.fd < 0:
            return False
        try:
            if len(views) == 1 and _aligned(views[0]):
                self.owner._pwrite_all(self.fd, views[0], offset)
                return True
            _Gathered(self, offset).write(views)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.close()  # the filesystem refuses: the page cache does it from now on
            return False

    def _bounce_view(self) -> memoryview:
        if self._bounce is None:
            import mmap

            self._bounce = mmap.mmap(-1, _BOUNCE_SIZE)
        return memoryview(self._bounce)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._bounce = None  # unmapped with its last view (one may still be on the stack)


class _Gathered:
    """One direct write being assembled: the iovecs of a ``pwritev`` and the bounce buffer
    that holds the pieces which cannot go as they are."""

    def __init__(self, writer: _DirectWriter, offset: int) -> None:
        self.writer = writer
        self.bounce = writer._bounce_view()
        self.at = offset  # file offset of the first iovec
        self.pos = offset  # file offset of the next byte
        self.iov: list[memoryview] = []
        self.used = 0  # bounce bytes handed out (a page multiple whenever no piece is open)
        self.open_at = -1  # where in the bounce the piece being filled starts

    def write(self, views: Sequence[memoryview]) -> None:
        for view in views:
            if self.pos % DIRECT_ALIGN == 0 and len(view) >= DIRECT_ALIGN and _aligned(view):
                whole = len(view) - len(view) % DIRECT_ALIGN
                self._close_piece()
                self._add(view[:whole])
                view = view[whole:]
            while view:
                if self.open_at < 0:
                    self.open_at = self.used
                n = min(len(self.bounce) - self.used, len(view))
                self.bounce[self.used : self.used + n] = view[:n]
                self.used += n
                self.pos += n
                view = view[n:]
                if self.used == len(self.bounce):
                    self._close_piece()
                    self._issue()
        self._close_piece()
        self._issue()

    def _close_piece(self) -> None:
        # a piece always starts on a page of the file and is closed there (or at the end)
        if self.open_at >= 0:
            self.iov.append(self.bounce[self.open_at : self.used])
            self.open_at = -1

    def _add(self, view: memoryview) -> None:
        self.iov.append(view)
        self.pos += len(view)
        if len(self.iov) >= _IOV_MAX:
            self._issue()

    def _issue(self) -> None:
        """pwritev everything gathered so far; a short write goes on from where it stopped."""
        iov, at = self.iov, self.at
        while iov:
            written = os.pwritev(self.writer.fd, iov, at)
            if written <= 0:
                raise VmferryError("short write", path=str(self.writer.owner.path), offset=at)
            at += written
            while iov and written >= len(iov[0]):
                written -= len(iov.pop(0))
            if written:
                iov[0] = iov[0][written:]
        self.iov, self.at, self.used = [], self.pos, 0


def _bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _window(views: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The bytes [start, end) of the concatenation of ``views``, as slices (no copies)."""
    out: list[memoryview] = []
    pos = 0
    for view in views:
        lo, hi = max(start - pos, 0), min(end - pos, len(view))
        if lo < hi:
            out.append(view[lo:hi])
        pos += len(view)
        if pos >= end:
            break
    return out


def _placed(offset: int, views: Sequence[memoryview]) -> Iterator[tuple[int, memoryview]]:
    """Each view with the file offset it goes to when written back to back from ``offset``."""
    for view in views:
        yield offset, view
        offset += len(view)


def _aligned(view: memoryview) -> bool:
    """The buffer behind ``view`` starts on a page (only writable buffers can tell)."""
    if view.readonly:
        return False
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0
