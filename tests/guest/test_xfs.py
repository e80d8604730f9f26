"""XFS reading against mkfs.xfs -p (protofile) images, xfs_db and blkid as oracles."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

import vmferry
from tests.conftest import require_tool
from tests.guest.conftest import blkid, fake_root, make_disk
from vmferry.errors import GuestError
from vmferry.guest.errors import GuestLimitError
from vmferry.guest.fs.xfs import XfsFilesystem
from vmferry.guest.linux.inspect import inspect_image
from vmferry.guest.overlay import Slice

MIB = 1 << 20
FS_SIZE = 320 * MIB  # mkfs.xfs refuses anything under 300 MiB; the file stays sparse


def _proto(root: Path) -> str:
    """An mkfs.xfs protofile describing the host tree ``root``."""

    def walk(d: Path, depth: int) -> list[str]:
        out = []
        pad = " " * depth
        for p in sorted(d.iterdir()):
            if p.is_symlink():
                out.append(f"{pad}{p.name} l--777 0 0 {os.readlink(p)}")
            elif p.is_dir():
                out.append(f"{pad}{p.name} d--755 0 0")
                out += walk(p, depth + 1)
                out.append(f"{pad}$")
            else:
                out.append(f"{pad}{p.name} ---644 0 0 {p}")
        return out

    return "\n".join(["/dev/null", "0 0", "d--755 0 0", *walk(root, 1), "$", ""])


def _tree(tmp: Path) -> Path:
    root = fake_root(tmp / "root")
    rng = random.Random(4)
    (root / "usr/bin/big").write_bytes(rng.randbytes(2 * MIB + 17))
    for n in (5, 40, 600):  # short form, block form, leaf/node form directories
        d = root / f"dir{n}"
        d.mkdir()
        for i in range(n):
            name = f"s{i}" if n == 5 else f"file-with-a-long-name-{i:04d}"
            (d / name).write_text(f"{n}:{i}\n")
    (root / "etc/alt").symlink_to("/etc/os-release")
    (root / "slow").symlink_to("/" + "s" * 120 + "/target")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    return root


_BUILT: dict[str, tuple[Path, Path, Path]] = {}


def _build(tmp: Path, variant: str, root: Path | None = None) -> tuple[Path, Path, Path]:
    """(disk image, source tree, the bare filesystem file mkfs.xfs wrote); ``root`` or _tree."""
    require_tool("mkfs.xfs")
    root = root or _tree(tmp)
    proto = tmp / "proto"
    proto.write_text(_proto(root))
    img, _ = make_disk(tmp, FS_SIZE + 2 * MIB, "label: dos\nstart=2048,type=83\n")
    part = tmp / "part.raw"
    with open(part, "wb") as f:
        f.truncate(FS_SIZE)
    args = ["-m", "crc=0", "-n", "ftype=0"] if variant == "v4" else []
    proc = subprocess.run(
        ["mkfs.xfs", "-q", *args, "-L", "xroot", "-p", str(proto), str(part)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    subprocess.run(
        ["dd", f"if={part}", f"of={img}", "bs=1M", "seek=1", "conv=sparse,notrunc", "status=none"],
        check=True,
    )
    return img, root, part


@pytest.fixture(params=["v5", "v4"])
def xfs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """Built once per session and variant (read-only use; copy before changing it)."""
    if request.param not in _BUILT:
        _BUILT[request.param] = _build(tmp_path_factory.mktemp(request.param), request.param)
    return _BUILT[request.param]


def _fs(disk: object) -> XfsFilesystem:
    return XfsFilesystem(Slice(disk, MIB, FS_SIZE))  # type: ignore[arg-type]


def test_reads_match_source_tree(xfs: tuple[Path, Path, Path]) -> None:
    img, root, _ = xfs
    with vmferry.open(img) as disk:
        fs = _fs(disk)
        count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            gdir = "/" if rel == "." else "/" + rel
            assert {e.name for e in fs.listdir(gdir)} == set(dirnames) | set(filenames), gdir
            for name in filenames + dirnames:
                p = Path(dirpath) / name
                gp = gdir.rstrip("/") + "/" + name
                if p.is_symlink():
                    assert fs.readlink(gp) == os.readlink(p)
                elif p.is_file():
                    assert fs.read_file(gp) == p.read_bytes(), gp
                    count += 1
        assert count > 600
        assert fs.read_file("/etc/alt") == (root / "etc/os-release").read_bytes()
        with pytest.raises(GuestLimitError):
            fs.read_file("/loop1")


def test_directory_forms_are_really_exercised(xfs: tuple[Path, Path, Path]) -> None:
    _, _, part = xfs
    formats = {}
    for n in (5, 40, 600):
        out = subprocess.run(
            ["xfs_db", "-r", "-c", f"path /dir{n}", "-c", "p core.format", str(part)],
            capture_output=True,
            text=True,
        ).stdout
        formats[n] = out.split("=")[-1].strip()
    assert formats[5].startswith("1") and formats[40].startswith("2")  # local, extents


def test_inspect_xfs_root(xfs: tuple[Path, Path, Path]) -> None:
    img, _, part = xfs
    ids = blkid(part)
    report = inspect_image(img)
    assert report["root"]["type"] == "xfs" and report["root"]["uuid"] == ids["UUID"]
    assert report["root"]["label"] == ids["LABEL"]
    assert report["os"]["distro"] == "debian"
    assert report["fstab"][0]["resolves_to"]["uuid"] == ids["UUID"]
    # fixing an XFS root: tests/guest/test_xfs_write.py


def test_fuzzed_xfs_fails_only_with_named_errors(
    xfs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    img = tmp_path / "fuzz.raw"
    subprocess.run(["cp", "--sparse=always", str(xfs[0]), str(img)], check=True)
    rng = random.Random(8)
    hot = 2 * MIB  # AG 0 headers, inode chunks and the small directories sit here
    with open(img, "r+b") as f:
        f.seek(MIB)
        pristine = f.read(hot)
        for _ in range(40):
            buf = bytearray(pristine)
            for _ in range(rng.randrange(1, 30)):
                buf[rng.randrange(hot)] = rng.randrange(256)
            f.seek(MIB)
            f.write(buf)
            f.flush()
            with vmferry.open(img) as disk:
                try:
                    fs = _fs(disk)
                    for d in ("/", "/etc", "/dir5", "/dir40", "/dir600"):
                        for e in fs.listdir(d):
                            if e.kind == "file":
                                fs.read_file(f"{d.rstrip('/')}/{e.name}", 1 << 20)
                except GuestError:
                    pass
