"""Build the archive that adds storage drivers to a guest's initramfs, from the guest's own
/lib/modules, without running anything from the guest.

Why an appended archive: the kernel unpacks every cpio archive of an initramfs in order, later
members replacing earlier ones.  Appending one more to the existing initrd file adds the modules
and replaces the module indexes, and works with every boot loader (GRUB legacy takes a single
initrd) and survives ``update-grub``; an extra file would have to be named in every boot entry.
The archive is compressed like the image's last part (gzip, xz or zstd: the kernel evidently
unpacks it, and Debian's ``lsinitramfs`` still reads the image), else left uncompressed.  The
guest's next initramfs rebuild drops it, which is why the rule also names the drivers in the
generator's configuration.

What the archive holds (paths where the image keeps its modules, ``usr/lib/modules/V`` or
``lib/modules/V``):

* the driver modules and their hard and soft dependencies, as compressed as the guest ships
  them, each checked to be an ELF module built for this kernel (``vermagic``);
* ``modules.dep``, ``modules.alias``, ``modules.symbols``, ``modules.softdep`` and the binary
  ``modules.dep.bin``, ``modules.alias.bin``, ``modules.symbols.bin`` kmod reads, covering the
  modules already in the image plus the new ones (built from the guest's depmod output);
* initramfs-tools: ``conf/modules`` (the image's own list plus the drivers), which its init
  loads explicitly; dracut: ``etc/cmdline.d/90-vmferry-drivers.conf`` with ``rd.driver.pre=``.
  udev loads them by modalias as well, through the new alias index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmferry.errors import GuestError
from vmferry.guest.guest import Guest
from vmferry.guest.linux.cpio import CpioEntry, compress_like, newc_archive, with_parents
from vmferry.guest.linux.initramfs import InitramfsInfo, member_name, read_initramfs
from vmferry.guest.linux.kmod import (
    DriverInjectionError,
    ModuleTree,
    check_vermagic,
    decompress_module,
    modinfo,
    module_name,
)

MAX_INITRAMFS = 512 << 20
MAX_INDEX_TEXT = 64 << 20
MAX_MODULE_FILE = 64 << 20
DRACUT_CMDLINE = "etc/cmdline.d/90-vmferry-drivers.conf"
GENERATORS = ("initramfs-tools", "dracut")
#: root filesystem type → the module alias the kernel requests to mount it
_FS_ALIAS = {"ext2": "fs-ext2", "ext3": "fs-ext3", "ext4": "fs-ext4", "xfs": "fs-xfs",
             "btrfs": "fs-btrfs", "vfat": "fs-vfat"}  # fmt: skip


@dataclass
class DriverPack:
    """What will be appended to one kernel's initramfs, and why it is enough."""

    version: str
    initramfs: str  # guest path of the initrd file
    old_size: int
    data: bytes  # the newc archive, compressed like the image's last part (else zero padding
    #: to a 4-byte boundary, then the archive uncompressed)
    compression: str
    generator: str
    added: list[str]  # module names added, dependencies first
    load: list[str]  # the drivers the initramfs is told to load explicitly

    @property
    def summary(self) -> str:
        how = "conf/modules" if self.generator == "initramfs-tools" else DRACUT_CMDLINE
        return (
            f"{self.compression if self.compression != 'none' else 'uncompressed'} "
            f"newc archive adding {len(self.added)} modules ({', '.join(self.added)}), "
            f"kmod indexes (modules.dep/alias/symbols + .bin, modules.softdep), {how} "
            f"loading {', '.join(self.load)}"
        )


def load_module_tree(guest: Guest, version: str, moddir: str) -> ModuleTree:
    """The guest's depmod output for ``version`` (modules.dep is required)."""
    dep = guest.try_read_text(f"{moddir}/modules.dep", MAX_INDEX_TEXT)
    if dep is None:
        raise DriverInjectionError(
            f"{moddir}/modules.dep is missing: vmferry needs the guest's depmod output",
            hint="run depmod in the guest (or reinstall its kernel package)",
        )

    def text(name: str) -> str:
        return guest.try_read_text(f"{moddir}/{name}", MAX_INDEX_TEXT) or ""

    return ModuleTree.parse(
        version,
        dep,
        alias=text("modules.alias"),
        symbols=text("modules.symbols"),
        softdep=text("modules.softdep"),
        order=text("modules.order"),
        builtin=text("modules.builtin"),
    )


def plan_driver_pack(
    guest: Guest,
    version: str,
    moddir: str | None,
    initramfs: str,
    drivers: Sequence[str],
    *,
    root_fs: str | None = None,
) -> DriverPack | None:
    """The archive adding ``drivers`` (and what they and the root filesystem need) to the
    initramfs of kernel ``version``; None when nothing is missing.

    Raises :class:`DriverInjectionError` (or another :class:`GuestError`) when it cannot be
    done completely: a module file missing or built for another kernel, an initramfs part
    unreadable or built by an unknown generator.  Never half a plan.
    """
    if not moddir:
        raise DriverInjectionError(f"kernel {version} has no /lib/modules/{version} directory")
    blob = guest.read_file(initramfs, MAX_INITRAMFS)
    info = read_initramfs(blob, capture=frozenset({"conf/modules"}))
    if not info.complete:
        raise DriverInjectionError(
            f"{initramfs}: part of it could not be read (compression without a decompressor "
            "here), so vmferry cannot tell what it already holds"
        )
    generator = info.generator
    if generator not in GENERATORS:
        raise DriverInjectionError(
            f"{initramfs}: built neither by initramfs-tools nor by dracut; vmferry does not "
            "know how its init loads drivers"
        )
    tree = load_module_tree(guest, version, moddir)
    prefix, present = _image_modules(info, version, initramfs, tree)
    present_names = {module_name(p) for p in present}
    wanted = [d for d in drivers if d not in tree.builtin and d not in present_names]
    wanted += _root_fs_modules(tree, root_fs, present_names)
    if not wanted:
        return None
    closure = tree.closure(wanted)
    new = [p for p in closure if p not in present]
    if not new:
        return None
    entries: list[CpioEntry] = []
    for rel in new:
        path = f"{moddir}/{rel}"
        try:
            raw = guest.read_file(path, MAX_MODULE_FILE)
        except GuestError as exc:
            raise DriverInjectionError(
                f"{rel} is listed in {moddir}/modules.dep but cannot be read: {exc}"
            ) from None
        check_vermagic(modinfo(decompress_module(path, raw), path), version, path)
        entries.append(CpioEntry.file(f"{prefix}/{rel}", raw))
    final = present | set(new)
    indexes = {
        "modules.dep": tree.dep_text(final).encode(),
        "modules.dep.bin": tree.dep_bin(final),
        "modules.alias": tree.alias_text(final).encode(),
        "modules.alias.bin": tree.alias_bin(final),
        "modules.symbols": tree.symbols_text(final).encode(),
        "modules.symbols.bin": tree.symbols_bin(final),
        "modules.softdep": tree.softdep_text(final).encode(),
    }
    entries += [CpioEntry.file(f"{prefix}/{name}", data) for name, data in indexes.items()]
    load = [d for d in drivers if d not in tree.builtin]
    if generator == "initramfs-tools":
        entries.append(CpioEntry.file("conf/modules", _conf_modules(info, load)))
    else:
        line = f"rd.driver.pre={','.join(load)}\n" if load else ""
        entries.append(CpioEntry.file(DRACUT_CMDLINE, line.encode()))
    entries = with_parents(entries)
    _check_parents(info, entries, initramfs)
    data, compression = compress_like(info.segments[-1].compression, newc_archive(entries))
    if compression == "none":
        data = b"\0" * (-len(blob) % 4) + data  # the kernel wants cpio headers 4-aligned
    return DriverPack(
        version=version,
        initramfs=initramfs,
        old_size=len(blob),
        data=data,
        compression=compression,
        generator=generator,
        added=[module_name(p) for p in new],
        load=load,
    )


def _image_modules(
    info: InitramfsInfo, version: str, initramfs: str, tree: ModuleTree
) -> tuple[str, set[str]]:
    """Where the image keeps this kernel's modules, and which (paths relative to there)."""
    present: set[str] = set()
    prefixes: set[str] = set()
    for name in info.modules:
        clean = member_name(name)
        for prefix in (f"usr/lib/modules/{version}", f"lib/modules/{version}"):
            if clean.startswith(prefix + "/"):
                present.add(clean[len(prefix) + 1 :])
                prefixes.add(prefix)
                break
    unknown = sorted(p for p in present if p not in tree.deps)
    if unknown:
        raise DriverInjectionError(
            f"{initramfs} holds modules the guest's modules.dep does not list "
            f"({', '.join(unknown[:5])}); its indexes could not be rebuilt faithfully",
            hint="the initramfs is older than the installed modules; regenerate it in the guest",
        )
    resolved = {_resolve(info, p, initramfs) for p in prefixes}
    if len(resolved) > 1:
        raise DriverInjectionError(f"{initramfs} keeps modules under both /lib and /usr/lib")
    if resolved:
        return resolved.pop(), present
    for prefix in (f"usr/lib/modules/{version}", f"lib/modules/{version}"):
        if info.kinds.get(_resolve(info, prefix, initramfs)) == "dir":
            return _resolve(info, prefix, initramfs), present
    usr = info.kinds.get("lib") == "symlink" or info.kinds.get("usr/lib") == "dir"
    return (f"usr/lib/modules/{version}" if usr else f"lib/modules/{version}"), present


def _resolve(info: InitramfsInfo, path: str, initramfs: str) -> str:
    """``path`` with the image's symlinked directories followed (``lib`` -> ``usr/lib``), so
    the archive never writes a directory over a symlink."""
    parts = path.split("/")
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/".join([*done, part])
        target = info.links.get(here)
        if target is None:
            done.append(part)
            continue
        hops += 1
        if hops > 40:
            raise DriverInjectionError(f"{initramfs}: symlink loop at /{here}")
        if target.startswith("/"):
            done = []
        parts = target.split("/") + parts
    return "/".join(done)


def _root_fs_modules(tree: ModuleTree, root_fs: str | None, present: set[str]) -> list[str]:
    """The module that mounts the root filesystem, unless built in or already there."""
    alias = _FS_ALIAS.get(root_fs or "")
    if alias is None:
        return []
    mods = tree.lookup(alias)
    if not mods or any(m in tree.builtin or m in present for m in mods):
        return []
    return [mods[0]]


def _conf_modules(info: InitramfsInfo, load: Sequence[str]) -> bytes:
    """initramfs-tools' conf/modules: the image's list, then the drivers it lacks."""
    text = info.captured.get("conf/modules", b"").decode("utf-8", "replace")
    listed = {ln.split()[0] for ln in text.splitlines() if ln.strip() and ln[0] != "#"}
    if text and not text.endswith("\n"):
        text += "\n"
    text += "".join(f"{d}\n" for d in load if d not in listed)
    return text.encode()


def _check_parents(info: InitramfsInfo, entries: list[CpioEntry], initramfs: str) -> None:
    """A directory entry over an image symlink would replace it: refuse instead."""
    for e in entries:
        kind = info.kinds.get(e.name)
        if kind is None:
            continue
        want = "dir" if e.mode & 0o170000 == 0o040000 else "file"
        if kind != want:
            raise DriverInjectionError(
                f"{initramfs}: /{e.name} is a {kind} in the image, vmferry would write a {want}"
            )
