"""FAT12/16/32 reading and writing against dosfstools and mtools.

Fixtures are made by ``mkfs.fat`` and filled by mtools (``mmd``, ``mcopy``, ``mdel``); what
vmferry reads is compared with ``mtype``/``mdir``, what it writes is read back with mtools and
judged by ``fsck.fat -n`` (which also compares the FAT copies and the FSInfo free count), and the
FAT type is checked against ``blkid -p``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vmferry
from tests.conftest import require_tool
from tests.guest.conftest import blkid
from vmferry.errors import GuestError, VmferryError
from vmferry.guest.errors import (
    CorruptGuestError,
    GuestWriteRefusedError,
    UnsupportedGuestFeatureError,
)
from vmferry.guest.fs.fat import FatFilesystem
from vmferry.guest.fs.probe import open_filesystem, probe

KIB = 1024
SIZES = {12: 2048, 16: 20480, 32: 40960}  # KiB: 1-sector clusters give 12/16/32-bit FATs
MT_ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1", TZ="UTC")


# --- oracles ----------------------------------------------------------------------------------


def mtool(*args: str | os.PathLike[str], data: bytes | None = None) -> bytes:
    require_tool(str(args[0]))
    proc = subprocess.run([str(a) for a in args], capture_output=True, env=MT_ENV, input=data)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def make_fat(
    tmp: Path, bits: int, *, kib: int | None = None, spc: int = 1, args: tuple[str, ...] = ()
) -> Path:
    require_tool("mkfs.fat")
    img = tmp / f"fat{bits}-{len(list(tmp.glob('fat*.img')))}.img"
    argv = ["mkfs.fat", "-F", str(bits), "-C", "-s", str(spc), "-n", f"VOL{bits}"]
    argv += ["-i", "1234ABCD", *args, str(img), str(kib or SIZES[bits])]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return img


OLD_TIME = 978307200  # 2001-01-01 00:00 UTC: fixture files carry it (mcopy -m keeps it)


def put(img: Path, path: str, data: bytes) -> None:
    src = img.parent / "mcopy-src"
    src.write_bytes(data)
    os.utime(src, (OLD_TIME, OLD_TIME))
    mtool("mcopy", "-m", "-o", "-i", img, src, f"::{path}")
    src.unlink()


def mdir_dates(img: Path, directory: str) -> dict[str, str]:
    """Long (or short) name → the modification date mdir shows (TZ=UTC, as vmferry writes)."""
    out = {}
    for line in mtool("mdir", "-i", img, f"::{directory}").decode().splitlines():
        m = re.match(r"(.{8}) (.{3}) +(\d+) (\d{4}-\d\d-\d\d) +\d+:\d\d(?:  (.+?))? *$", line)
        if m:
            short = m.group(1).rstrip() + ("." + m.group(2).rstrip() if m.group(2).strip() else "")
            out[m.group(5) or short] = m.group(4)
    return out


def mmd(img: Path, *paths: str) -> None:
    mtool("mmd", "-i", img, *[f"::{p}" for p in paths])


def mtype(img: Path, path: str) -> bytes:
    return mtool("mtype", "-i", img, f"::{path}")


def listing(img: Path) -> dict[str, bool]:
    """Every path in the volume (long names) → is a directory, as ``mdir -/ -b`` lists them."""
    out = {}
    for line in mtool("mdir", "-/", "-b", "-i", img, "::").decode().splitlines():
        path = line[2:]
        out[path.rstrip("/")] = path.endswith("/")
    return out


def fsck(img: Path) -> tuple[int, list[str]]:
    require_tool("fsck.fat")
    proc = subprocess.run(["fsck.fat", "-n", str(img)], capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def assert_clean(img: Path) -> tuple[int, int]:
    """fsck.fat -n finds nothing at all; returns its (used, total) cluster counts."""
    rc, lines = fsck(img)
    assert rc == 0 and len(lines) == 2, "\n".join(lines)
    m = re.search(r"(\d+)/(\d+) clusters", lines[1])
    assert m, lines
    return int(m.group(1)), int(m.group(2))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@contextmanager
def opened(img: Path, writable: bool = False) -> Iterator[FatFilesystem]:
    with vmferry.open(img, "raw", writable=writable) as disk:
        yield FatFilesystem(disk)
        if writable:
            disk.flush()


def poke(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fat_copies(fs: FatFilesystem) -> list[bytes]:
    g = fs.geo
    return [fs.dev.read(g.fat_offset(i), g.fat_used_bytes) for i in range(g.num_fats)]


# --- fixtures ---------------------------------------------------------------------------------


def populated(tmp: Path, bits: int) -> tuple[Path, dict[str, bytes]]:
    """LFN and 8.3 names, a 12-deep path, a many-cluster directory and a fragmented file."""
    img = make_fat(tmp, bits)
    rng = random.Random(bits)
    files = {
        "/EFI/debian/grub.cfg": b"search.fs_uuid 1234 root\nconfigfile /boot/grub/grub.cfg\n",
        "/EFI/BOOT/BOOTX64.EFI": rng.randbytes(3000),
        "/EFI/BOOT/A Long File Name With Spaces.efi": rng.randbytes(1500),
        "/Mixed.Case.Name.TXT": b"mixed\n",
        "/café ünïcode.txt": b"non-ascii long name\n",
        "/empty": b"",
    }
    mmd(img, "/EFI", "/EFI/debian", "/EFI/BOOT", "/big")
    deep = ""
    for i in range(12):
        deep += f"/level {i} directory"
        mmd(img, deep)
    files[deep + "/leaf.txt"] = b"deep\n"
    for i in range(60):  # ~4 entries each: the directory spans many 512-byte clusters
        files[f"/big/a rather long file name number {i:03d}.conf"] = f"{i}\n".encode()
    for path, data in files.items():
        put(img, path, data)
    # fragmentation: free a gap between two files, then write a file larger than the gap
    put(img, "/gap", rng.randbytes(3 * 512))
    put(img, "/after", rng.randbytes(512))
    mtool("mdel", "-i", img, "::/gap")
    if bits == 32:  # make mtools search from the start instead of after its last allocation
        poke(img, 512 + 492, b"\xff\xff\xff\xff")  # FSInfo (sector 1) next-free hint
    files["/after"] = mtype(img, "/after")
    files["/fragmented.bin"] = rng.randbytes(10 * 512 + 7)
    put(img, "/fragmented.bin", files["/fragmented.bin"])
    return img, files


def contiguous(chain: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(chain))


# --- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [12, 16, 32])
def test_reads_what_mtools_wrote(tmp_path: Path, bits: int) -> None:
    img, files = populated(tmp_path, bits)
    assert_clean(img)
    tree = listing(img)
    with opened(img) as fs:
        assert fs.fat_bits == bits
        frag = fs.resolve("/fragmented.bin")
        assert not contiguous(fs.chain(frag.cluster)), "the fixture should be fragmented"
        for path, is_dir in tree.items():
            if is_dir:
                children = {p.rsplit("/", 1)[1] for p in tree if p.rsplit("/", 1)[0] == path}
                assert {e.name for e in fs.listdir(path)} == children, path
                assert fs.stat(path).kind == "dir"
            else:
                want = mtype(img, path)
                assert fs.read_file(path) == want, path
                assert fs.stat(path).size == len(want)
                assert fs.read_head(path, 5) == want[:5]
        assert {p for p, d in tree.items() if not d} == set(files)
        assert {e.name for e in fs.listdir("/")} >= {"EFI", "big", "café ünïcode.txt"}


@pytest.mark.parametrize("bits", [12, 16, 32])
def test_identity_and_type_match_blkid(tmp_path: Path, bits: int) -> None:
    img = make_fat(tmp_path, bits)
    ids = blkid(img)
    with opened(img) as fs:
        assert (fs.uuid, fs.label, f"FAT{fs.fat_bits}") == (
            ids["UUID"],
            ids["LABEL"],
            ids["VERSION"],
        )
        assert fs.type == "vfat"
    with vmferry.open(img, "raw") as disk:
        sig = probe(disk)
        assert sig is not None and (sig.type, sig.uuid) == ("vfat", "1234-ABCD")
        assert isinstance(open_filesystem(disk, sig), FatFilesystem)


def test_type_comes_from_cluster_count_not_label_string(tmp_path: Path) -> None:
    img16 = make_fat(tmp_path, 16)
    poke(img16, 54, b"FAT12   ")
    img12 = make_fat(tmp_path, 12)
    poke(img12, 54, b"FAT16   ")
    for img, bits in ((img16, 16), (img12, 12)):
        assert blkid(img)["VERSION"] == f"FAT{bits}"
        with opened(img) as fs:
            assert fs.fat_bits == bits
            assert fs.listdir("/") == []


def test_case_insensitive_lookup_as_linux_vfat(tmp_path: Path) -> None:
    img, _ = populated(tmp_path, 16)
    with opened(img) as fs:
        want = mtype(img, "/EFI/debian/grub.cfg")
        for p in ("/efi/DEBIAN/GRUB.CFG", "/Efi/Debian/Grub.Cfg", "/EFI/debian/grub.cfg"):
            assert fs.read_file(p) == want
        long = mtype(img, "/EFI/BOOT/A Long File Name With Spaces.efi")
        assert fs.read_file("/efi/boot/a long file name with spaces.EFI") == long
        assert fs.read_file("/EFI/BOOT/ALONGF~1.EFI") == long  # the 8.3 alias works too
        assert fs.exists("/EFI/./BOOT/../debian/grub.cfg")
        assert not fs.exists("/EFI/debian/grub.cfg.bak")
        assert not fs.exists("/CAFÉ ÜNÏCODE.TXT")  # only ASCII letters fold, as utf8 vfat


def test_fat32_with_few_clusters_is_read_as_fat32(tmp_path: Path) -> None:
    """mkfs.fat makes it (with a warning); Linux, UEFI firmware and fsck.fat read it as FAT32,
    while mtools follows the cluster count and cannot use it: fsck.fat is the oracle here."""
    img = make_fat(tmp_path, 32, kib=20000)
    with opened(img, writable=True) as fs:
        assert fs.fat_bits == 32 and fs.geo.warning and "clusters" in fs.geo.warning
        fs.create_file("/grub.cfg", b"x" * 700)
        fs.write_file("/GRUB.CFG", b"y" * 2000)
    rc, lines = fsck(img)
    assert rc == 0 and "2 files, 5/39352 clusters" in lines[1], lines  # label + file; root + 4
    with opened(img) as fs:
        assert fs.read_file("/grub.cfg") == b"y" * 2000
        assert fs._fsinfo()[1].free_count == fs.free_clusters()


# --- writing ----------------------------------------------------------------------------------


def _check_consistent(img: Path) -> None:
    used, total = assert_clean(img)
    with opened(img) as fs:
        copies = fat_copies(fs)
        assert all(c == copies[0] for c in copies)
        assert total == fs.geo.cluster_count
        assert used == total - fs.free_clusters()
        info = fs._fsinfo()
        if fs.fat32:
            assert info is not None and info[1].free_count == fs.free_clusters()


@pytest.mark.parametrize("bits", [12, 16, 32])
def test_replace_content_grow_shrink_empty(tmp_path: Path, bits: int) -> None:
    img, files = populated(tmp_path, bits)
    rng = random.Random(7)
    target = "/EFI/debian/grub.cfg"
    assert mdir_dates(img, "/EFI/debian")["grub.cfg"] == "2001-01-01"
    for size in (40 * 512 + 3, 700, 0, 512, 5 * 512, 3):
        data = rng.randbytes(size)
        with opened(img, writable=True) as fs:
            fs.write_file(target, data)
            assert fs.read_file(target) == data  # the writer sees its own write
        assert mtype(img, target) == data
        assert mdir_dates(img, "/EFI/debian")["grub.cfg"] == time.strftime(
            "%Y-%m-%d", time.gmtime()
        )
        _check_consistent(img)
    with opened(img) as fs:  # nothing else moved
        for path, data in files.items():
            if path != target:
                assert fs.read_file(path) == data, path


def test_grown_file_spans_fragments(tmp_path: Path) -> None:
    img, _ = populated(tmp_path, 16)
    data = random.Random(3).randbytes(30 * 512)
    with opened(img, writable=True) as fs:
        fs.write_file("/empty", b"first")
        fs.write_file("/EFI/debian/grub.cfg", data)  # its neighbours pin it: must fragment
        chain = fs.chain(fs.resolve("/EFI/debian/grub.cfg").cluster)
        assert len(chain) == 30 and not contiguous(chain)
    assert mtype(img, "/EFI/debian/grub.cfg") == data
    assert mtype(img, "/empty") == b"first"
    _check_consistent(img)


NEW_NAMES = [
    "grub.cfg",  # 8.3 lower case: short entry with the NT case bits
    "BOOTX64.CSV",  # 8.3 upper case: short entry only
    "Mixed Case.Name.efi",
    "café ünïcode.txt",
    "a name much longer than thirteen characters, with commas + plus;semicolons.conf",
    "long name one.txt",  # same basis name as the next: LONGNA~1, LONGNA~2
    "long name two.txt",
    ".hidden",
    "x" * 255,
]


@pytest.mark.parametrize("bits", [12, 16, 32])
def test_create_files_with_long_and_short_names(tmp_path: Path, bits: int) -> None:
    img, files = populated(tmp_path, bits)
    rng = random.Random(11)
    new = {f"/EFI/new/{n}": rng.randbytes(rng.randrange(0, 2000)) for n in NEW_NAMES}
    new["/root file.txt"] = b"in the root directory\n"
    mmd(img, "/EFI/new")
    with opened(img, writable=True) as fs:
        for path, data in new.items():
            fs.check_creatable(path, len(data))
            fs.create_file(path, data, mode=0o600)
            assert fs.read_file(path) == data
    _check_consistent(img)
    tree = listing(img)
    for path, data in {**files, **new}.items():
        assert tree.get(path) is False, path
        assert mtype(img, path) == data, path
    shorts = mtool("mdir", "-i", img, "::/EFI/new").decode()
    assert "LONGNA~1 TXT" in shorts and "LONGNA~2 TXT" in shorts
    with opened(img) as fs:
        assert {e.name for e in fs.listdir("/EFI/new")} == set(NEW_NAMES)


def test_directory_grows_by_a_cluster(tmp_path: Path) -> None:
    img = make_fat(tmp_path, 32)
    mmd(img, "/d")
    names = [f"entry with a long name {i:03d}.cfg" for i in range(50)]  # 3 entries each
    with opened(img, writable=True) as fs:
        before = len(fs.chain(fs.resolve("/d").cluster))
        for n in names:
            fs.create_file(f"/d/{n}", n.encode())
        after = len(fs.chain(fs.resolve("/d").cluster))
    assert before == 1 and after >= 10  # 16 entries per 512-byte cluster
    _check_consistent(img)
    tree = listing(img)
    for n in names:
        assert mtype(img, f"/d/{n}") == n.encode() and tree[f"/d/{n}"] is False


def test_created_names_refused_when_they_would_not_survive(tmp_path: Path) -> None:
    img, _ = populated(tmp_path, 32)
    with opened(img, writable=True) as fs:
        before = sha(img)
        for bad in ("a:b", "q?", "trailing.", "trailing ", "x" * 256, "tab\there"):
            with pytest.raises(GuestWriteRefusedError):
                fs.create_file(f"/EFI/{bad}", b"x")
        with pytest.raises(GuestWriteRefusedError, match="exists"):
            fs.create_file("/EFI/DEBIAN/GRUB.CFG", b"x")
        with pytest.raises(GuestWriteRefusedError, match="symbolic"):
            fs.symlink("/EFI/link", "debian/grub.cfg")
        with pytest.raises(GuestWriteRefusedError, match="regular"):
            fs.write_file("/EFI", b"x")
        with pytest.raises(GuestError):
            fs.create_file("/no/such/dir/file", b"x")
    assert sha(img) == before


def test_full_filesystem_is_refused_before_writing(tmp_path: Path) -> None:
    img = make_fat(tmp_path, 12)
    with opened(img) as fs:
        free = fs.free_clusters()
        cs = fs.geo.cluster_size
    put(img, "/filler", b"\xaa" * (free - 2) * cs)
    put(img, "/small", b"small")
    before = sha(img)
    with opened(img, writable=True) as fs:
        assert fs.free_clusters() == 1
        with pytest.raises(GuestWriteRefusedError, match="free clusters"):
            fs.write_file("/small", b"z" * 3 * cs)
        with pytest.raises(GuestWriteRefusedError, match="free clusters"):
            fs.create_file("/new", b"z" * 2 * cs)
        with pytest.raises(GuestWriteRefusedError, match="free clusters"):
            fs.check_creatable("/new", 2 * cs)
    assert sha(img) == before
    with opened(img, writable=True) as fs:  # exactly the last cluster still fits
        fs.write_file("/small", b"z" * 2 * cs)
        assert fs.free_clusters() == 0
    _check_consistent(img)


def test_full_fixed_root_directory_is_refused(tmp_path: Path) -> None:
    img = make_fat(tmp_path, 16, args=("-r", "16"))  # root holds 16 entries (one sector's worth)
    with opened(img) as fs:
        assert fs.geo.root_entries == 16
    with opened(img, writable=True) as fs:
        for i in range(15):  # plus the volume label entry
            fs.create_file(f"/F{i}.TXT", b"%d" % i)
        before = sha(img)
        with pytest.raises(GuestWriteRefusedError, match="root directory is full"):
            fs.create_file("/ONEMORE.TXT", b"x")
    assert sha(img) == before
    _check_consistent(img)


@pytest.mark.parametrize("bits", [16, 32])
def test_dirty_volume_is_refused(tmp_path: Path, bits: int) -> None:
    img, _ = populated(tmp_path, bits)
    with opened(img) as fs:
        state = fs.geo.state_offset
        fat1 = fs.geo.fat_offset(0) + (2 if bits == 16 else 4)
        width = 2 if bits == 16 else 4
        flags = int.from_bytes(fs.dev.read(fat1, width), "little")
    clean = 0x8000 if bits == 16 else 0x08000000
    for what, offset, data in (
        ("dirty", state, bytes([1])),
        ("not cleanly unmounted", fat1, (flags & ~clean).to_bytes(width, "little")),
    ):
        copy = tmp_path / f"dirty-{offset}.img"
        copy.write_bytes(img.read_bytes())
        poke(copy, offset, data)
        before = sha(copy)
        with opened(copy, writable=True) as fs:
            assert fs.read_file("/EFI/debian/grub.cfg")  # reading is still allowed
            with pytest.raises(GuestWriteRefusedError, match=what):
                fs.write_file("/EFI/debian/grub.cfg", b"new")
            with pytest.raises(GuestWriteRefusedError, match=what):
                fs.check_creatable("/EFI/new")
        assert sha(copy) == before
        assert fsck(copy)[0] != 0 or what == "not cleanly unmounted"


def test_differing_fat_copies_are_refused(tmp_path: Path) -> None:
    img, _ = populated(tmp_path, 16)
    with opened(img) as fs:
        g = fs.geo
        second = g.fat_offset(1) + 2 * 2
        assert fs._get(2) != 0
    poke(img, second, b"\x00\x00")  # cluster 2 marked free in the second copy only
    rc, lines = fsck(img)
    assert rc != 0 and any("differ" in line for line in lines), lines  # the oracle sees it too
    before = sha(img)
    with opened(img, writable=True) as fs, pytest.raises(GuestWriteRefusedError, match="differs"):
        fs.write_file("/empty", b"x")
    assert sha(img) == before


def test_read_only_disk_is_refused(tmp_path: Path) -> None:
    img, _ = populated(tmp_path, 12)
    before = sha(img)
    with opened(img) as fs, pytest.raises(VmferryError, match="read-only"):
        fs.write_file("/empty", b"x")
    assert sha(img) == before


# --- hostile input ----------------------------------------------------------------------------


def _file_chain(img: Path, path: str) -> tuple[list[int], int]:
    """(chain, entry offset) of ``path``."""
    with opened(img) as fs:
        node = fs.resolve(path)
        return fs.chain(node.cluster), node.ino


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("loop", "loops"),
        ("outside", "not a cluster"),
        ("free", "not a cluster"),
        ("bad", "bad cluster"),
        ("short", "shorter|holds"),
    ],
)
def test_corrupt_chains_are_named_errors(tmp_path: Path, damage: str, match: str) -> None:
    img, _ = populated(tmp_path, 16)
    chain, entry = _file_chain(img, "/EFI/BOOT/BOOTX64.EFI")
    assert len(chain) >= 3
    value = {"loop": chain[0], "outside": 0xFFF0, "free": 0, "bad": 0xFFF7}.get(damage)
    for copy in (0, 1):
        with opened(img) as fs:
            off = fs.geo.fat_offset(copy)
        if value is not None:
            poke(img, off + 2 * chain[1], struct.pack("<H", value))
    if damage == "short":
        poke(img, entry + 28, struct.pack("<I", 10 * 512))
    with opened(img, writable=True) as fs:
        with pytest.raises(CorruptGuestError, match=match):
            fs.read_file("/EFI/BOOT/BOOTX64.EFI")
        with pytest.raises(CorruptGuestError):
            fs.write_file("/EFI/BOOT/BOOTX64.EFI", b"x")


def test_directory_chain_loop_is_an_error(tmp_path: Path) -> None:
    img, _ = populated(tmp_path, 32)
    with opened(img) as fs:
        chain = fs.chain(fs.resolve("/big").cluster)
        offs = [fs.geo.fat_offset(i) for i in range(fs.geo.num_fats)]
    for off in offs:
        poke(img, off + 4 * chain[-1], struct.pack("<I", chain[1]))
    with opened(img) as fs, pytest.raises(CorruptGuestError, match="loops"):
        fs.listdir("/big")


BPB_DAMAGE = [
    (11, struct.pack("<H", 600), CorruptGuestError),  # bytes per sector
    (11, struct.pack("<H", 8192), CorruptGuestError),
    (13, bytes([3]), CorruptGuestError),  # sectors per cluster
    (14, struct.pack("<H", 0), CorruptGuestError),  # reserved sectors
    (16, bytes([0]), CorruptGuestError),  # FAT count
    (16, bytes([5]), CorruptGuestError),
    (21, bytes([0x12]), CorruptGuestError),  # media
    (32, struct.pack("<I", 0xFFFFFFF0), CorruptGuestError),  # total sectors past the file
    (36, struct.pack("<I", 1), CorruptGuestError),  # FAT32 FAT size too small
    (42, struct.pack("<H", 0x0100), UnsupportedGuestFeatureError),  # FAT32 version 1.0
    (44, struct.pack("<I", 0), CorruptGuestError),  # root cluster
    (44, struct.pack("<I", 0x0FFFFFF0), CorruptGuestError),
    (17, struct.pack("<H", 512), CorruptGuestError),  # FAT32 with a fixed root
    (510, b"\0\0", CorruptGuestError),
]


@pytest.mark.parametrize(("offset", "data", "error"), BPB_DAMAGE)
def test_hostile_boot_sector_fields(tmp_path: Path, offset: int, data: bytes, error: type) -> None:
    img = make_fat(tmp_path, 32)
    poke(img, offset, data)
    with vmferry.open(img, "raw") as disk, pytest.raises(error):
        FatFilesystem(disk)


class _Damaged:
    """The pristine volume with a few bytes changed, in memory (no 40 MB copy per round)."""

    def __init__(self, data: bytes, patches: dict[int, int]) -> None:
        self.data = data
        self.patches = patches
        self.virtual_size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(self.data), "read past the volume"
        out = self.data[offset : offset + length]
        hits = {k: v for k, v in self.patches.items() if offset <= k < offset + length}
        if hits:
            buf = bytearray(out)
            for k, v in hits.items():
                buf[k - offset] = v
            out = bytes(buf)
        return out


def test_random_damage_never_escapes_as_a_traceback(tmp_path: Path) -> None:
    """Change bytes in the boot sector, FATs and directories: only vmferry's errors come out."""
    for bits in (12, 32):
        img, _ = populated(tmp_path, bits)
        pristine = img.read_bytes()
        with opened(img) as fs:
            meta_end = fs.geo.data_offset + 64 * fs.geo.cluster_size
        rng = random.Random(bits)
        for _ in range(150):
            patches = {}
            for _ in range(rng.randrange(1, 8)):
                at = rng.randrange(0, 512) if rng.random() < 0.3 else rng.randrange(0, meta_end)
                patches[at] = rng.randrange(256)
            try:
                _walk(FatFilesystem(_Damaged(pristine, patches)), "/", 0)
            except GuestError:
                pass


def _walk(fs: FatFilesystem, path: str, depth: int) -> None:
    if depth > 20:
        return
    for e in fs.listdir(path):
        child = path.rstrip("/") + "/" + e.name
        try:
            if e.kind == "dir":
                _walk(fs, child, depth + 1)
            else:
                fs.read_file(child, limit=1 << 20)
        except GuestError:
            continue
