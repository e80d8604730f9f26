"""The newc writer and the appended-archive compression, judged by GNU cpio, gzip, xz, zstd."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from vmferry.guest.errors import GuestLimitError
from vmferry.guest.linux.cpio import CpioEntry, compress_like, newc_archive, with_parents
from vmferry.guest.linux.initramfs import read_initramfs

ENTRIES = [
    CpioEntry.file("usr/lib/modules/6.1.0-1-amd64/kernel/drivers/block/virtio_blk.ko", b"\x7fELF"),
    CpioEntry.file("usr/lib/modules/6.1.0-1-amd64/modules.dep", b"kernel/a.ko:\n"),
    CpioEntry.file("conf/modules", b"virtio_blk\n", perm=0o600),
    CpioEntry.file("empty", b""),
    CpioEntry.file("odd", b"x" * 4097),
    CpioEntry.symlink("lib", "usr/lib"),
]


def test_gnu_cpio_extracts_what_was_written(tmp_path: Path) -> None:
    require_tool("cpio")
    archive = newc_archive(with_parents(ENTRIES))
    assert len(archive) % 4 == 0
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = listing.split()
    # every parent directory precedes its members, each once
    assert names.index("usr") < names.index("usr/lib") < names.index("usr/lib/modules")
    assert len(names) == len(set(names))
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], cwd=out, input=archive, check=True)
    for e in ENTRIES:
        p = out / e.name
        if stat.S_ISLNK(e.mode):
            assert os.readlink(p) == e.data.decode()
        else:
            assert p.read_bytes() == e.data
            assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(e.mode)
    assert (out / "usr/lib/modules").is_dir()


def test_reader_sees_kinds_and_captures(tmp_path: Path) -> None:
    archive = newc_archive(with_parents(ENTRIES))
    info = read_initramfs(archive, capture=frozenset({"conf/modules", "odd"}))
    assert info.kinds["lib"] == "symlink" and info.kinds["usr/lib"] == "dir"
    assert info.kinds["conf/modules"] == "file"
    assert info.captured == {"conf/modules": b"virtio_blk\n", "odd": b"x" * 4097}
    assert info.drivers == ["virtio_blk"]


@pytest.mark.parametrize(
    ("kind", "tool"),
    [("gzip", ["gzip", "-dc"]), ("xz", ["xz", "-dc"]), ("zstd", ["zstd", "-dcq"])],
)
def test_appended_archive_compressed_like_the_image(
    kind: str, tool: list[str], tmp_path: Path
) -> None:
    require_tool(tool[0])
    if kind == "zstd":
        pytest.importorskip("zstandard")
    first = newc_archive([CpioEntry.file("init", b"#!/bin/sh\n")])
    second = newc_archive(with_parents(ENTRIES))
    head, used = compress_like(kind, first)
    tail, used2 = compress_like(kind, second)
    assert used == used2 == kind
    for blob, want in ((head, first), (tail, second)):
        assert subprocess.run(tool, input=blob, capture_output=True, check=True).stdout == want
    if kind == "xz":  # the kernel's xz decoder checks CRC32 only
        (tmp_path / "tail.xz").write_bytes(tail)
        listed = subprocess.run(["xz", "-lvv", str(tmp_path / "tail.xz")], capture_output=True)
        assert b"CRC32" in listed.stdout, listed.stdout + listed.stderr
    info = read_initramfs(head + tail)
    assert [s.compression for s in info.segments] == [kind, kind]
    assert "virtio_blk" in info.drivers and "init" in info.kinds


def test_unknown_compression_stays_uncompressed() -> None:
    data = newc_archive([CpioEntry.file("a", b"1")])
    assert compress_like("lz4", data) == (data, "none")
    assert compress_like("none", data) == (data, "none")


def test_invalid_names_are_refused() -> None:
    with pytest.raises(GuestLimitError):
        newc_archive([CpioEntry.file("", b"")])
    with pytest.raises(GuestLimitError):
        newc_archive([CpioEntry.file("a\0b", b"")])


def test_module_prefix_follows_the_images_symlinked_lib() -> None:
    """Modules listed under lib/modules while lib -> usr/lib: the new archive must write under
    usr/lib (a directory member over the symlink would replace it)."""
    from vmferry.guest.linux.inject import _image_modules
    from vmferry.guest.linux.kmod import ModuleTree

    version = "6.1.0-1-amd64"
    rel = "kernel/drivers/scsi/vmw_pvscsi.ko"
    archive = newc_archive(
        [
            CpioEntry.directory("usr"),
            CpioEntry.directory("usr/lib"),
            CpioEntry.symlink("lib", "usr/lib"),
            CpioEntry.file(f"lib/modules/{version}/{rel}", b"\x7fELF"),
            CpioEntry.symlink("loop", "loop/x"),
        ]
    )
    info = read_initramfs(archive)
    assert info.links == {"lib": "usr/lib", "loop": "loop/x"}
    tree = ModuleTree.parse(version, f"{rel}:\n")
    prefix, present = _image_modules(info, version, "/boot/initrd", tree)
    assert prefix == f"usr/lib/modules/{version}" and present == {rel}
