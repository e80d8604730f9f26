"""initramfs reading against archives made by GNU cpio and the real compressors."""

from __future__ import annotations

import importlib.util
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from vmferry.guest.errors import CorruptGuestError, GuestLimitError
from vmferry.guest.linux.initramfs import read_initramfs

KVER = "6.1.0-18-amd64"
MODULES = {
    f"lib/modules/{KVER}/kernel/drivers/scsi/vmw_pvscsi.ko": "vmw_pvscsi",
    f"lib/modules/{KVER}/kernel/drivers/ata/ata_piix.ko.xz": "ata_piix",
    f"usr/lib/modules/{KVER}/kernel/drivers/block/virtio_blk.ko.zst": "virtio_blk",
    f"lib/modules/{KVER}/kernel/drivers/net/vmxnet3/vmxnet3.ko": "vmxnet3",
    f"lib/modules/{KVER}/kernel/drivers/scsi/hv-storvsc.ko": "hv_storvsc",
}

COMPRESSORS = {
    "gzip": ["gzip", "-9c"],
    "xz": ["xz", "--check=crc32", "-c"],
    "lzma": ["xz", "--format=lzma", "-c"],
    "zstd": ["zstd", "-q", "-c"],
    "lz4": ["lz4", "-l", "-q", "-c"],
    "bzip2": ["bzip2", "-c"],
}


def _cpio(tree: Path) -> bytes:
    require_tool("cpio")
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    return subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"],
        cwd=tree,
        input=names,
        capture_output=True,
        check=True,
    ).stdout


def _compress(kind: str, data: bytes) -> bytes:
    argv = COMPRESSORS[kind]
    require_tool(argv[0])
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text * 50)
    return root


def _count_members(archive: bytes) -> int:
    out = subprocess.run(["cpio", "--quiet", "-t"], input=archive, capture_output=True).stdout
    return len([n for n in out.decode().splitlines() if n != "."])


def _optional(kind: str) -> None:
    mod = {"zstd": "zstandard", "lz4": "lz4"}.get(kind)
    if mod and importlib.util.find_spec(mod) is None:
        pytest.skip(f"python module {mod} not installed")


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_compressed_archive_lists_the_modules(tmp_path: Path, kind: str) -> None:
    _optional(kind)
    tree = _tree(tmp_path / "t", {**dict.fromkeys(MODULES, "m"), "init": "#!/bin/sh\n"})
    archive = _cpio(tree)
    info = read_initramfs(_compress(kind, archive))
    assert info.drivers == sorted(MODULES.values())
    assert [s.compression for s in info.segments] == [kind]
    # "." is a member too; cpio -t lists it, so compare against everything it lists
    assert info.segments[0].members == _count_members(archive) + 1


def test_early_microcode_then_compressed_then_another(tmp_path: Path) -> None:
    early = _cpio(_tree(tmp_path / "early", {"kernel/x86/microcode/GenuineIntel.bin": "u"}))
    main = _cpio(_tree(tmp_path / "main", {next(iter(MODULES)): "m", "init": "x"}))
    extra = _cpio(_tree(tmp_path / "extra", {list(MODULES)[2]: "m"}))
    blob = early + bytes(512) + _compress("gzip", main) + bytes(3) + _compress("xz", extra)
    info = read_initramfs(blob)
    assert info.early_microcode
    assert [s.compression for s in info.segments] == ["none", "gzip", "xz"]
    assert info.drivers == ["virtio_blk", "vmw_pvscsi"]


def test_unknown_compression_is_reported_not_guessed(tmp_path: Path) -> None:
    early = _cpio(_tree(tmp_path / "early", {next(iter(MODULES)): "m"}))
    info = read_initramfs(early + b"\x89LZO\x00garbage" * 10)
    assert info.drivers == ["vmw_pvscsi"]
    assert info.segments[-1].status == "unknown"
    assert not info.complete


def _header(namesize: int, filesize: int = 0) -> bytes:
    fields = [0, 0o100644, 0, 0, 1, 0, filesize, 0, 0, 0, 0, namesize, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def test_absurd_name_size(tmp_path: Path) -> None:
    with pytest.raises(CorruptGuestError, match="name size"):
        read_initramfs(_header(0xFFFFFFFF) + b"x" * 64)
    with pytest.raises(CorruptGuestError, match="name size"):
        read_initramfs(_compress("gzip", _header(0x7FFFFFFF) + b"x" * 64))


def test_member_past_end_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(CorruptGuestError, match="past the end"):
        read_initramfs(_header(5, 0xFFFFFF) + b"abcd\0" + b"\0" * 3 + b"x" * 10)
    with pytest.raises(CorruptGuestError):
        read_initramfs(b"070701" + b"zz" * 60)
    with pytest.raises(CorruptGuestError, match="damaged"):
        good = _compress("gzip", _cpio(_tree(tmp_path / "t", {"a": "b"})))
        read_initramfs(good[:20] + bytes(x ^ 0x55 for x in good[20:40]) + good[40:])


def test_decompression_bomb_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vmferry.guest.linux.initramfs as mod

    monkeypatch.setattr(mod, "MAX_DECOMPRESSED", 1 << 20)
    member = _header(6, 8 << 20) + b"bomb\0\0" + bytes(8 << 20)
    with pytest.raises(GuestLimitError):
        read_initramfs(_compress("gzip", member))


@pytest.mark.parametrize("kind", ["none", "gzip", "xz"])
def test_fuzzed_archives_fail_only_with_named_errors(tmp_path: Path, kind: str) -> None:
    from vmferry.errors import GuestError

    archive = _cpio(_tree(tmp_path / "t", {**dict.fromkeys(MODULES, "m"), "init": "x"}))
    blob = archive if kind == "none" else _compress(kind, archive)
    rng = random.Random(kind)
    for _ in range(300):
        buf = bytearray(blob)
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            read_initramfs(bytes(buf))
        except GuestError:
            pass
