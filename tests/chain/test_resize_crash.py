"""resize stopped at every write: the image always opens, at the old or the new size, intact.

A real kill is too coarse to land inside a resize (a handful of writes), so this replays the
operation with the N-th write, truncate or sync made to fail and every later one refused, which
is what the file holds after a crash at that instant (without the page cache reordering, which
the fsync barriers in the drivers are there to prevent).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img
from tests.formats import EXTENSION, QEMU
from vmferry.chain.surgery import resize
from vmferry.disk.blockfile import BlockFile

MIB = 1 << 20
OLD, NEW = 6 * MIB, 80 * MIB
RESIZABLE = ["raw", "vhd", "vhdx", "qcow2", "vdi"]
# -r leaks: qemu must open a VHDX read-write to replay the log a crash leaves; it repairs
# nothing but leaks, so a corruption still fails.  qemu checks VDI only without -r.
CHECK_ARGS = {"vhdx": ["-r", "leaks"], "qcow2": ["-r", "leaks"], "vdi": []}


class Crash(Exception):
    pass


class _Injector:
    def __init__(self, fail_at: int, target: str) -> None:
        self.fail_at = fail_at
        self.target = target
        self.count = 0
        self.crashed = False
        self.opened: list[BlockFile] = []

    def wrap(self, original):  # type: ignore[no-untyped-def]
        def op(bf: BlockFile, *args, **kwargs):  # type: ignore[no-untyped-def]
            if not bf.writable or bf.path.name != self.target:  # (measure's scratch images)
                return original(bf, *args, **kwargs)
            if self.crashed:
                raise Crash("after the crash nothing reaches the disk")
            self.count += 1
            if self.count == self.fail_at:
                self.crashed = True
                raise Crash(f"crash at operation {self.count}")
            return original(bf, *args, **kwargs)

        return op


def _patch(monkeypatch: pytest.MonkeyPatch, inj: _Injector) -> None:
    for name in ("write", "truncate", "fsync", "punch_hole", "preallocate"):
        monkeypatch.setattr(BlockFile, name, inj.wrap(getattr(BlockFile, name)))
    init = BlockFile.__init__

    def tracking_init(bf: BlockFile, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(bf, *args, **kwargs)
        inj.opened.append(bf)

    monkeypatch.setattr(BlockFile, "__init__", tracking_init)


def _die(inj: _Injector) -> None:
    """What the kernel does for a killed process: close its files, dropping its locks."""
    import os

    for bf in inj.opened:
        if bf.fd >= 0:
            os.close(bf.fd)
            bf.fd = -1


def _content(path: Path, size: int) -> str:
    with vmferry.open(path) as d:
        return hashlib.sha256(d.read(0, size)).hexdigest()


@pytest.mark.parametrize("fmt", RESIZABLE)
def test_resize_crash_at_every_write(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = tmp_path / f"orig{EXTENSION[fmt]}"
    with vmferry.create(original, fmt, OLD) as d:
        d.write(MIB, b"\x5a" * (2 * MIB))
        d.write(OLD - 4096, b"\xa5" * 4096)
    want = _content(original, OLD)
    counting = _Injector(fail_at=-1, target=f"count{EXTENSION[fmt]}")
    with monkeypatch.context() as m:
        _patch(m, counting)
        trial = tmp_path / f"count{EXTENSION[fmt]}"
        shutil.copy(original, trial)
        resize(trial, NEW)
    assert counting.count > 0
    for n in range(1, counting.count + 1):
        img = tmp_path / f"t{n}{EXTENSION[fmt]}"
        shutil.copy(original, img)
        inj = _Injector(fail_at=n, target=img.name)
        with monkeypatch.context() as m:
            _patch(m, inj)
            with pytest.raises(Crash):
                resize(img, NEW)
            _die(inj)
        with vmferry.open(img) as d:
            size = d.virtual_size
        assert size in (OLD, NEW), (n, size)
        assert _content(img, OLD) == want, n
        if size == NEW:
            with vmferry.open(img) as d:
                assert d.read(OLD, NEW - OLD) == bytes(NEW - OLD), n
        if fmt in CHECK_ARGS:
            qemu_img("check", *CHECK_ARGS[fmt], "-f", QEMU[fmt][0], str(img))
