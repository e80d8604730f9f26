"""kmod indexes, module metadata and dependency closure against kmod's own tools.

The module files are real: a kernel's /lib/modules tree on this machine (or the one named by
``VMFERRY_TEST_MODULES``), copied in part into tmp_path, where kmod's ``depmod -b`` writes the
reference indexes and ``modprobe -d``/``modinfo`` judge what vmferry writes and reads.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from vmferry.guest.errors import CorruptGuestError, GuestLimitError
from vmferry.guest.linux.kmod import (
    DriverInjectionError,
    ModuleTree,
    check_vermagic,
    decompress_module,
    modinfo,
    read_index,
    write_index,
)

#: what the injection tests need: a pvscsi guest's stack and the virtio-blk driver
MODULES = ("vmw_pvscsi", "sd_mod", "ext4", "crc32c_generic", "virtio_blk", "virtio_pci")


def source_tree() -> tuple[Path, str]:
    """A real module tree holding virtio_blk (skip when the machine has none)."""
    require_tool("depmod")
    require_tool("modprobe")
    env = os.environ.get("VMFERRY_TEST_MODULES")
    candidates = [Path(env)] if env else sorted(Path("/lib/modules").glob("*"), reverse=True)
    for moddir in candidates:
        if _usable(moddir):
            return moddir, moddir.name
    moddir = _guest_kernel_modules()
    if moddir is not None:
        return moddir, moddir.name
    pytest.skip("no kernel module tree with virtio_blk here (set VMFERRY_TEST_MODULES)")


def _usable(moddir: Path) -> bool:
    return (moddir / "modules.dep").is_file() and any(
        moddir.glob("kernel/drivers/block/virtio_blk.ko*")
    )


def _guest_kernel_modules() -> Path | None:
    """The Debian guest kernel's module tree, from the boot tests' cached debootstrap (built
    here if missing: CI has no kernel of its own in /lib/modules, but builds that guest)."""
    from tests.bootkit.guest import _locked, _rootfs_tarball, cache_dir, missing_build_tools

    if missing_build_tools():
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot build the guest kernel tree: missing {missing_build_tools()}")
        return None
    tarball = _rootfs_tarball()
    dest = cache_dir() / f"modules-{tarball.stem}"
    with _locked(cache_dir() / f"modules-{tarball.stem}.lock"):
        if not dest.is_dir():
            part = dest.with_name(f".{dest.name}.tmp")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()
            subprocess.run(
                ["tar", "-C", str(part), "-xf", str(tarball), "./usr/lib/modules"],
                check=True,
                capture_output=True,
            )
            os.replace(part, dest)
    trees = [d for d in sorted((dest / "usr/lib/modules").glob("*"), reverse=True) if _usable(d)]
    return trees[0] if trees else None


def show_depends(root: Path, version: str, name: str) -> list[str]:
    """modprobe's load list for ``name`` (module paths relative to the modules directory)."""
    proc = subprocess.run(
        ["modprobe", "-d", str(root), "-S", version, "--show-depends", name],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("insmod "):
            path = line.split()[1]
            out.append(path.split(f"/modules/{version}/", 1)[1])
    return out


def copy_modules(dest_root: Path, names: tuple[str, ...] = MODULES, sub: str = "lib") -> str:
    """Copy ``names`` and their load lists from the source tree into ``dest_root/<sub>/modules``
    and run kmod's depmod there; returns the kernel version."""
    src, version = source_tree()
    dest = dest_root / sub / "modules" / version
    host_root = src.parent.parent.parent if src.parent.name == "modules" else Path("/")
    wanted: list[str] = []
    for name in names:
        for rel in show_depends(host_root, version, name):
            if rel not in wanted:
                wanted.append(rel)
    for rel in wanted:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)
    for extra in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / extra).exists():
            shutil.copyfile(src / extra, dest / extra)
    base = dest_root if sub == "lib" else dest_root / "usr"
    proc = subprocess.run(["depmod", "-b", str(base), version], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return version


def load_tree(moddir: Path, version: str) -> ModuleTree:
    def text(name: str) -> str:
        p = moddir / name
        return p.read_text() if p.exists() else ""

    return ModuleTree.parse(
        version,
        text("modules.dep"),
        alias=text("modules.alias"),
        symbols=text("modules.symbols"),
        softdep=text("modules.softdep"),
        order=text("modules.order"),
        builtin=text("modules.builtin"),
    )


def test_indexes_equal_depmods_byte_for_byte(tmp_path: Path) -> None:
    """Our .bin files for a tree are exactly the ones depmod writes for it."""
    version = copy_modules(tmp_path)
    moddir = tmp_path / "lib/modules" / version
    tree = load_tree(moddir, version)
    assert tree.deps
    for name, ours in (
        ("modules.dep.bin", tree.dep_bin(tree.deps)),
        ("modules.alias.bin", tree.alias_bin(tree.deps)),
        ("modules.symbols.bin", tree.symbols_bin(tree.deps)),
    ):
        theirs = (moddir / name).read_bytes()
        assert read_index(ours) == read_index(theirs), name
        assert ours == theirs, name
    assert tree.dep_text(tree.deps) == (moddir / "modules.dep").read_text()


def test_subset_indexes_answer_modprobe_like_depmods(tmp_path: Path) -> None:
    """Indexes restricted to a dep-closed subset (what an initramfs holds) answer kmod's
    modprobe exactly as depmod's indexes of a tree holding only that subset."""
    version = copy_modules(tmp_path / "full")
    tree = load_tree(tmp_path / "full/lib/modules" / version, version)
    subset = tree.closure(["virtio_blk", "virtio_pci"])
    ref_version = copy_modules(tmp_path / "ref", ("virtio_blk", "virtio_pci"))
    assert ref_version == version
    ours = tmp_path / "ours/lib/modules" / version
    shutil.copytree(tmp_path / "ref/lib/modules" / version, ours)
    for name in ("modules.dep.bin", "modules.alias.bin", "modules.symbols.bin"):
        (ours / name).unlink()
    (ours / "modules.dep.bin").write_bytes(tree.dep_bin(subset))
    (ours / "modules.alias.bin").write_bytes(tree.alias_bin(subset))
    (ours / "modules.symbols.bin").write_bytes(tree.symbols_bin(subset))
    for name in ("virtio_blk", "virtio_pci", "virtio:d00000002v00001AF4"):
        assert show_depends(tmp_path / "ours", version, name) == show_depends(
            tmp_path / "ref", version, name
        ), name
    ref_alias = read_index(
        (tmp_path / "ref/lib/modules" / version / "modules.alias.bin").read_bytes()
    )
    assert read_index(tree.alias_bin(subset)) == ref_alias


def test_closure_matches_modprobe_show_depends(tmp_path: Path) -> None:
    version = copy_modules(tmp_path)
    tree = load_tree(tmp_path / "lib/modules" / version, version)
    for name in MODULES:
        ours = tree.closure([name])
        theirs = show_depends(tmp_path, version, name)
        assert set(theirs) <= set(ours), name  # modprobe's list, soft deps included
        assert tree.paths[name] in ours
        pos = {p: i for i, p in enumerate(ours)}
        for path in ours:  # every hard dependency comes before its user
            assert all(pos[d] < pos[path] for d in tree.deps[path] if d in pos)


def test_closure_refuses_a_missing_module(tmp_path: Path) -> None:
    version = copy_modules(tmp_path, ("virtio_blk",))
    tree = load_tree(tmp_path / "lib/modules" / version, version)
    with pytest.raises(DriverInjectionError, match="hv_storvsc"):
        tree.closure(["virtio_blk", "hv_storvsc"])


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [
        (".ko", None),
        (".ko.xz", ["xz", "-c", "--check=crc32"]),
        (".ko.gz", ["gzip", "-c"]),
        (".ko.zst", ["zstd", "-q", "-c"]),
    ],
)
def test_modinfo_matches_kmod(tmp_path: Path, suffix: str, compress: list[str] | None) -> None:
    src, version = source_tree()
    ko = next(src.glob("kernel/drivers/block/virtio_blk.ko*"))
    raw = ko.read_bytes()
    elf = decompress_module(ko.name, raw)
    if compress:
        require_tool(compress[0])
        if suffix == ".ko.zst":
            pytest.importorskip("zstandard")
        raw = subprocess.run(compress, input=elf, capture_output=True, check=True).stdout
    path = tmp_path / f"virtio_blk{suffix}"
    path.write_bytes(raw)
    plain = tmp_path / "plain.ko"
    plain.write_bytes(elf)
    assert decompress_module(path.name, raw) == elf  # xz/gzip/zstd wrote it: they are the oracle
    info = modinfo(decompress_module(path.name, raw))
    for field in ("vermagic", "alias", "depends", "name"):
        # kmod may be built without one of the decompressors: then ask it about the ELF itself
        for target in (path, plain):
            proc = subprocess.run(
                ["modinfo", "-F", field, str(target)], capture_output=True, text=True
            )
            if proc.returncode == 0:
                break
        assert proc.returncode == 0, proc.stderr
        assert info.get(field, []) == proc.stdout.splitlines(), field
    check_vermagic(info, version, "virtio_blk")
    with pytest.raises(DriverInjectionError, match="built for kernel"):
        check_vermagic(info, version + "-other", "virtio_blk")


def test_modinfo_rejects_what_is_not_a_module() -> None:
    with pytest.raises(CorruptGuestError):
        modinfo(b"\x7fELF" + bytes(60))
    with pytest.raises(CorruptGuestError):
        modinfo(Path("/bin/sh").read_bytes() if Path("/bin/sh").exists() else b"junk")
    with pytest.raises(CorruptGuestError):
        decompress_module("x.ko.xz", b"not xz at all")


def test_index_round_trip_and_wildcard_keys() -> None:
    items = [("pci:v00001AF4d*", "virtio_pci", 5), ("a", "x", 2), ("a", "y", 1), ("ab", "z", 0)]
    index = read_index(write_index(items))
    assert index == {
        "pci:v00001AF4d*": [(5, "virtio_pci")],
        "a": [(1, "y"), (2, "x")],
        "ab": [(0, "z")],
    }
    assert read_index(write_index([])) == {}
    with pytest.raises(GuestLimitError):
        write_index([("caf\u00e9", "m", 0)])


def test_damaged_indexes_fail_with_named_errors(tmp_path: Path) -> None:
    version = copy_modules(tmp_path, ("virtio_blk",))
    blob = (tmp_path / "lib/modules" / version / "modules.alias.bin").read_bytes()
    with pytest.raises(CorruptGuestError):
        read_index(b"\0" * 12)
    rng = random.Random(7)
    for _ in range(200):
        bad = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            bad[rng.randrange(12, len(bad))] = rng.randrange(256)
        cut = bytes(bad[: rng.randint(12, len(bad))])
        try:
            read_index(cut)
        except (CorruptGuestError, GuestLimitError):
            pass
