"""Build small, real Debian 12 guest disk images for boot tests, cached between runs.

Why real guests: vmferry's claim is that a moved VM *boots*.  Only a real kernel, initramfs and
bootloader can show that, so the images are built from Debian's own packages with debootstrap,
partitioned with sfdisk, GRUB installed to the MBR through a loop device (root is acceptable for
fixtures; vmferry itself never needs it).  Nothing here downloads anything but Debian packages.

Building takes a minute or two, so it happens once per recipe and machine: the image is cached
under ``${VMFERRY_TEST_CACHE:-~/.cache/vmferry-tests}`` keyed by a hash of the recipe *and of
this file* (editing the builder rebuilds), under a file lock (pytest-xdist workers run in
parallel and must not build the same image twice).  The debootstrapped root filesystem is
cached once as a tarball and shared by every variant.  Tests get a sparse copy each
(:func:`guest_image`) so they may modify it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: what every guest boots to: a systemd unit prints this on ttyS0 after multi-user.target
MARKER = "VMFERRY-BOOT-OK"
SUITE = "bookworm"
MIRROR = os.environ.get("VMFERRY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: minbase plus what boots: kernel, systemd as init, udev, initramfs-tools, GRUB for BIOS
PACKAGES = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "kmod",
    "initramfs-tools",
    "grub-pc",
)
#: storage drivers of the other hypervisors' boot controllers: a VMware-built initramfs holds none
#: of them (the builder checks its listing and fails otherwise)
FOREIGN_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_pci", "ahci", "nvme", "ata_piix")
#: dracut --hostonly keeps the drivers of every storage controller the machine *has*, and a
#: VMware VM (like qemu's pc machine) always has the PIIX4 IDE controller of its CD-ROM drive:
#: ata_piix is in a VMware-built hostonly initramfs, so Hyper-V Gen 1 (IDE) needs no new driver
DRACUT_FOREIGN_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_pci", "ahci", "nvme")
#: the pvscsi stack a VMware-built initramfs-tools MODULES=list would hold (ext4's checksum
#: needs crc32c, which is only a soft dependency, so it is named)
PVSCSI_ONLY = ("vmw_pvscsi", "scsi_mod", "sd_mod", "ext4", "crc32c_generic")
#: left out of every guest so images copy, convert and boot faster (GRUB reads the kernel and
#: initramfs through the BIOS at ~3 MB/s under TCG, and MODULES=most packs every storage and
#: filesystem module it finds): network, graphics, sound, USB/HID, exotic filesystems.  The
#: storage controllers, ext4 and device-mapper stay, so "most" still covers every controller.
_MODS = "usr/lib/modules/*/kernel"
SLIM = (
    *(
        f"{_MODS}/drivers/{d}"
        for d in (
            "gpu",
            "media",
            "net",
            "infiniband",
            "usb",
            "hid",
            "mmc",
            "bluetooth",
            "staging",
            "iio",
            "isdn",
            "nfc",
            "thunderbolt",
            "firewire",
            "memstick",
            "video",
        )
    ),
    *(
        f"{_MODS}/fs/{d}"
        for d in (
            "btrfs",
            "xfs",
            "ocfs2",
            "nfs",
            "nfsd",
            "ceph",
            "f2fs",
            "gfs2",
            "jfs",
            "nilfs2",
            "reiserfs",
            "ubifs",
            "smb",
            "ntfs3",
            "cifs",
            "ksmbd",
            "afs",
            "coda",
            "orangefs",
        )
    ),
    f"{_MODS}/sound",
    f"{_MODS}/net",
    "usr/share/locale/*",
    "usr/share/doc/*",
    "usr/share/man/*",
    "var/lib/apt/lists/*_Packages",
)
#: seconds after which a cached image of an outdated key is deleted
STALE_AFTER = 24 * 3600
#: the debian packages needed on the build host (program, package)
BUILD_TOOLS = (
    ("debootstrap", "debootstrap"),
    ("sfdisk", "fdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkswap", "util-linux"),
    ("losetup", "mount"),
)


#: this file's bytes as imported: part of every cache key (editing the builder rebuilds), read
#: once so a run that is going on keeps the key it started with
_BUILDER_SOURCE = Path(__file__).read_bytes()


@dataclass(frozen=True)
class GuestRecipe:
    """One guest variant.  Every field goes into the cache key.

    ``naming``: how /etc/fstab and the kernel command line name the root (and swap):
    ``device`` writes ``root_device`` (e.g. /dev/sda1, as VMware-era guests do), ``uuid`` writes
    ``UUID=``.  ``initramfs_modules``: initramfs-tools ``MODULES=`` policy (``most``, ``dep``,
    ``list``); with ``list`` only ``module_list`` is loaded (plus what hooks add).
    ``initramfs_tool``: ``initramfs-tools`` (Debian's) or ``dracut``: the Red Hat way, dracut
    replaces initramfs-tools and the initramfs is rebuilt ``--hostonly`` *inside the guest*
    booted on ``hostonly_controller``, as an installer running on that hypervisor leaves it
    (``initramfs_modules``/``module_list`` do not apply).  ``extra_packages`` are installed with
    apt in the image (``--no-install-recommends``).  ``xorg_driver``: writes an
    /etc/X11/xorg.conf forcing that X video driver, as a desktop guest's tools left it.
    """

    name: str
    naming: str = "uuid"
    initramfs_modules: str = "most"
    module_list: tuple[str, ...] = ()
    root_device: str = "/dev/sda1"
    swap: bool = False
    size_mib: int = 1792
    swap_mib: int = 128
    extra_packages: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ("console=ttyS0,115200",)
    initramfs_tool: str = "initramfs-tools"
    hostonly_controller: str = "pvscsi"
    xorg_driver: str | None = None
    initramfs_must_have: tuple[str, ...] = ()
    initramfs_must_lack: tuple[str, ...] = ()

    def key(self) -> str:
        """Hash of the recipe, the package set and this builder's source."""
        h = hashlib.sha256()
        h.update(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(json.dumps([SUITE, MIRROR, PACKAGES, MARKER]).encode())
        h.update(_BUILDER_SOURCE)
        return h.hexdigest()[:16]

    def partition_uuid(self, what: str) -> str:
        """Deterministic filesystem UUIDs, so two builds of one recipe look alike."""
        return str(uuid.UUID(hashlib.sha256(f"{self.key()}:{what}".encode()).hexdigest()[:32]))


#: what VMware left in its guests besides the disk naming: its tools, and X forced to its GPU
#: driver (xserver-xorg-core brings the generic modesetting driver a repair can switch to;
#: the vmware driver itself pulls in Mesa's LLVM, ~100 MB, and X never starts in these boots)
VMWARE_PACKAGES = ("open-vm-tools", "xserver-xorg-core")

#: the classic VMware guest: /dev/sda1 everywhere, an initramfs holding only the pvscsi stack
VMWARE_GUEST = GuestRecipe(
    name="vmware-pvscsi",
    naming="device",
    initramfs_modules="list",
    module_list=PVSCSI_ONLY,
    swap=True,
    extra_packages=VMWARE_PACKAGES,
    xorg_driver="vmware",
    initramfs_must_have=("vmw_pvscsi", "sd_mod", "ext4"),
    initramfs_must_lack=FOREIGN_DRIVERS,
)
#: the same guest as Red Hat's installer leaves it on VMware: dracut --hostonly, run on the
#: pvscsi controller, so the initramfs holds the drivers of that machine and no others
VMWARE_DRACUT_GUEST = GuestRecipe(
    name="vmware-dracut",
    naming="device",
    initramfs_tool="dracut",
    hostonly_controller="pvscsi",
    swap=True,
    extra_packages=(*VMWARE_PACKAGES, "dracut"),
    xorg_driver="vmware",
    initramfs_must_have=("vmw_pvscsi", "sd_mod", "ext4", "ata_piix"),
    initramfs_must_lack=DRACUT_FOREIGN_DRIVERS,
)
#: a portable guest: UUID= references and initramfs-tools MODULES=most (every storage driver)
GENERIC_GUEST = GuestRecipe(name="generic", naming="uuid", initramfs_modules="most")
#: every driver in the initramfs but /dev/sda1 in fstab and on the command line: what vmferry's
#: fstab/grub rewrite alone can repair (it cannot add initramfs drivers yet)
SDA_NAMED_GUEST = GuestRecipe(name="sda-most", naming="device", initramfs_modules="most", swap=True)
#: every recipe, for ``python -m tests.bootkit.guest``
RECIPES = (VMWARE_GUEST, VMWARE_DRACUT_GUEST, GENERIC_GUEST, SDA_NAMED_GUEST)


@dataclass
class BuiltGuest:
    """A cached image and what the tests need to know about it."""

    recipe: GuestRecipe
    path: Path
    kernel: str
    root_uuid: str
    swap_uuid: str | None
    build_seconds: float
    meta: dict[str, object] = field(default_factory=dict)


def cache_dir() -> Path:
    base = os.environ.get("VMFERRY_TEST_CACHE") or os.path.expanduser("~/.cache/vmferry-tests")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_build_tools() -> list[str]:
    """Names (with the Debian package) of build prerequisites this machine lacks."""
    missing = [f"{p} (apt-get install {pkg})" for p, pkg in BUILD_TOOLS if not shutil.which(p)]
    if os.geteuid() != 0:
        missing.append("root (the fixture builder uses loop devices and mount)")
    elif not Path("/dev/loop-control").exists():
        missing.append("loop devices (/dev/loop-control)")
    return missing


def cached_image(recipe: GuestRecipe) -> Path | None:
    """The cached image for ``recipe`` if already built (no lock, no build)."""
    path = cache_dir() / f"{recipe.name}-{recipe.key()}.raw"
    return path if path.exists() and path.with_suffix(".json").exists() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(*args: str | os.PathLike[str], chroot: Path | None = None, **kw: object) -> str:
    """Run a build step; a failure shows the command and its output (the build log)."""
    argv = [str(a) for a in args]
    if chroot is not None:
        argv = ["chroot", str(chroot), *argv]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc.stdout


#: what one build may need at once: the rootfs tarball and its unpacked tree, the image, the debs
BUILD_FREE_BYTES = 4 << 30


def _require_free_space(cdir: Path, name: str) -> None:
    """Refuse to start a build that would fill the disk halfway and fail somewhere obscure."""
    free = shutil.disk_usage(cdir).free
    if free < BUILD_FREE_BYTES:
        raise RuntimeError(
            f"cannot build guest image {name}: {free / 2**30:.1f} GiB free in {cdir}, "
            f"a build needs {BUILD_FREE_BYTES / 2**30:.0f} GiB"
        )


def build_image(recipe: GuestRecipe) -> BuiltGuest:
    """Return the cached image for ``recipe``, building it first if needed (under a lock)."""
    cdir = cache_dir()
    key = recipe.key()
    image = cdir / f"{recipe.name}-{key}.raw"
    meta_path = image.with_suffix(".json")
    with _locked(cdir / f"{recipe.name}-{key}.lock"):
        if not (image.exists() and meta_path.exists()):
            missing = missing_build_tools()
            if missing:
                raise RuntimeError("cannot build guest images: missing " + ", ".join(missing))
            _require_free_space(cdir, recipe.name)
            started = time.monotonic()
            tmp = image.with_name(f".{image.name}.{os.getpid()}.tmp")
            try:
                meta = _build(recipe, tmp)
                meta["build_seconds"] = round(time.monotonic() - started, 1)
                os.replace(tmp, image)
            finally:
                tmp.unlink(missing_ok=True)
            meta_path.write_text(json.dumps(meta, indent=2))
            _remove_stale(cdir, recipe.name, keep=image.stem)
        meta = json.loads(meta_path.read_text())
    return BuiltGuest(
        recipe=recipe,
        path=image,
        kernel=str(meta["kernel"]),
        root_uuid=str(meta["root_uuid"]),
        swap_uuid=meta.get("swap_uuid"),  # type: ignore[arg-type]
        build_seconds=float(meta["build_seconds"]),  # type: ignore[arg-type]
        meta=meta,
    )


def _remove_stale(cdir: Path, name: str, keep: str) -> None:
    """Delete builds of recipe ``name`` with another key unused for a day.

    Another key is usually an older builder, but may be another checkout (CI's copy, another
    branch) sharing the cache and booting that image right now: only old files go.
    """
    stale = re.compile(rf"{re.escape(name)}-[0-9a-f]{{16}}\.(raw|json|lock)")
    cutoff = time.time() - STALE_AFTER
    for old in cdir.iterdir():
        if stale.fullmatch(old.name) and old.stem != keep:
            with contextlib.suppress(FileNotFoundError):
                if max(old.stat().st_mtime, old.stat().st_atime) < cutoff:
                    old.unlink()


def guest_image(recipe: GuestRecipe, dest: str | os.PathLike[str]) -> tuple[Path, BuiltGuest]:
    """A private, sparse (reflinked where the filesystem can) copy of the recipe's image."""
    built = build_image(recipe)
    dest = Path(dest)
    _run("cp", "--reflink=auto", "--sparse=always", built.path, dest)
    return dest, built


# --------------------------------------------------------------------------------------------
# the build


def _rootfs_tarball() -> Path:
    """debootstrap once (minbase + PACKAGES) and keep the tree as a tarball for every variant."""
    cdir = cache_dir()
    h = hashlib.sha256(json.dumps([SUITE, MIRROR, PACKAGES, "v1"]).encode()).hexdigest()[:16]
    tarball = cdir / f"rootfs-{SUITE}-{h}.tar"
    with _locked(cdir / f"rootfs-{h}.lock"):
        if tarball.exists():
            return tarball
        debs = cdir / "debs"
        debs.mkdir(exist_ok=True)
        # packages the machine already downloaded: debootstrap verifies them against the
        # mirror's checksums and fetches only what is missing or stale
        apt_cache = Path("/var/cache/apt/archives")
        if apt_cache.is_dir():
            for deb in apt_cache.glob("*.deb"):
                target = debs / deb.name
                if not target.exists():
                    try:
                        os.link(deb, target)
                    except OSError:
                        shutil.copy2(deb, target)
        with tempfile.TemporaryDirectory(dir=cdir, prefix=".rootfs-") as tmp:
            root = Path(tmp) / "root"
            _run(
                "debootstrap", "--variant=minbase", "--arch=amd64",
                "--include=" + ",".join(PACKAGES), f"--cache-dir={debs}",
                SUITE, root, MIRROR,
            )  # fmt: skip
            # the package cache is already outside; do not ship it in every image
            for deb in (root / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            part = tarball.with_name(f".{tarball.name}.tmp")
            _run("tar", "--numeric-owner", "--xattrs", "-C", root, "-cpf", part, ".")
            os.replace(part, tarball)
    return tarball


@contextlib.contextmanager
def _loop(image: Path) -> Iterator[str]:
    dev = _run("losetup", "--find", "--show", "--partscan", image).strip()
    try:
        for attempt in range(50):  # devtmpfs creates the partition nodes asynchronously
            if Path(dev + "p1").exists():
                break
            if attempt == 10:  # some kernels/containers do not scan: add them explicitly
                subprocess.run(["partx", "-a", dev], check=False, capture_output=True)
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{dev}p1 did not appear (losetup --partscan, partx -a)")
        yield dev
    finally:
        subprocess.run(["partx", "-d", dev], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def _mounted(dev: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _run("mount", dev, where)
    try:
        yield where
    finally:
        for _ in range(10):  # a build step killed just now may still hold files open
            if subprocess.run(["umount", where], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            _run("umount", "--lazy", where)


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    mounted: list[Path] = []
    try:
        for fs, args in (("dev", ["--rbind", "/dev"]), ("proc", ["-t", "proc", "proc"]),
                         ("sys", ["-t", "sysfs", "sysfs"])):  # fmt: skip
            _run("mount", *args, root / fs)
            mounted.append(root / fs)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-R", target], check=False, capture_output=True)


#: an xorg.conf as VMware Tools' configurator left it (X forced to the virtual GPU's driver)
XORG_CONF = """\
# xorg.conf written by the vmferry test builder, in the shape VMware Tools left it
Section "ServerLayout"
\tIdentifier\t"Default Layout"
\tScreen\t\t"Screen0"
EndSection

Section "Device"
\tIdentifier\t"VMware SVGA"
\tDriver\t\t"{driver}"
EndSection

Section "Screen"
\tIdentifier\t"Screen0"
\tDevice\t\t"VMware SVGA"
\tDefaultDepth\t24
EndSection
"""

MARKER_SCRIPT = f"""\
#!/bin/sh
# vmferry boot proof: the guest reached multi-user.target; say so on the serial console
printf '\\n%s root=%s\\n' '{MARKER}' "$(findmnt -no SOURCE /)" > /dev/ttyS0
"""

MARKER_UNIT = """\
[Unit]
Description=vmferry boot proof (marker on the serial console, then power off)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmferry-marker
ExecStartPost=/bin/systemctl poweroff --no-block
"""

# multi-user.target is reached first; this target then pulls the marker in after it, which a
# WantedBy=multi-user.target unit ordered After= it could not do without an ordering cycle
MARKER_TARGET = """\
[Unit]
Description=vmferry boot proof target
Requires=multi-user.target vmferry-marker.service
After=multi-user.target
AllowIsolate=yes
"""


def _build(recipe: GuestRecipe, image: Path) -> dict[str, object]:
    tarball = _rootfs_tarball()
    size = recipe.size_mib << 20
    with open(image, "wb") as f:
        f.truncate(size)
    sectors = size // 512
    swap_sectors = (recipe.swap_mib << 20) // 512 if recipe.swap else 0
    root_sectors = sectors - 2048 - swap_sectors
    table = "label: dos\nunit: sectors\n\n"
    table += f"start=2048, size={root_sectors}, type=83, bootable\n"
    if recipe.swap:
        table += f"start={2048 + root_sectors}, size={swap_sectors}, type=82\n"
    _run("sfdisk", "--quiet", image, input=table)
    root_uuid = recipe.partition_uuid("root")
    swap_uuid = recipe.partition_uuid("swap") if recipe.swap else None
    dracut = recipe.initramfs_tool == "dracut"
    if recipe.initramfs_tool not in ("initramfs-tools", "dracut"):
        raise ValueError(f"unknown initramfs_tool {recipe.initramfs_tool!r}")
    with _loop(image) as dev:
        _run("mkfs.ext4", "-q", "-U", root_uuid, dev + "p1")
        if swap_uuid:
            _run("mkswap", "-U", swap_uuid, dev + "p2")
    with _image_root(image) as (root, dev):
        excludes = [f"--exclude=./{p}" for p in SLIM]
        _run("tar", "--numeric-owner", "--xattrs", *excludes, "-C", root, "-xpf", tarball)
        kernel = _configure(recipe, root, root_uuid, swap_uuid)
        with _chroot_mounts(root):
            if recipe.extra_packages:
                _install_packages(root, recipe.extra_packages)
            _run("depmod", "-a", kernel, chroot=root)
            if dracut:
                # a generic initramfs first, only to boot once on the VMware controller
                _run("dracut", "--force", "--no-hostonly", f"/boot/initrd.img-{kernel}", kernel,
                     chroot=root)  # fmt: skip
                _arm_firstboot(root, kernel)
            else:
                _run("update-initramfs", "-u", "-k", kernel, chroot=root)
            _run("grub-install", "--target=i386-pc", "--modules=part_msdos ext2", dev,
                 chroot=root)  # fmt: skip
        _write_grub_cfg(recipe, root, kernel, root_uuid)
    firstboot = None
    if dracut:
        firstboot = _run_firstboot(recipe, image)
        with _image_root(image) as (root, _):
            _disarm_firstboot(root)
    with _image_root(image) as (root, _):
        lister = "lsinitrd" if dracut else "lsinitramfs"
        listing = _run(lister, f"/boot/initrd.img-{kernel}", chroot=root)
    drivers = sorted(
        {Path(ln.split()[-1]).name.split(".ko")[0] for ln in listing.splitlines() if ".ko" in ln}
    )
    _check_initramfs(recipe, drivers)
    return {
        "recipe": asdict(recipe),
        "kernel": kernel,
        "root_uuid": root_uuid,
        "swap_uuid": swap_uuid,
        "initramfs_drivers": drivers,
        "firstboot_seconds": firstboot,
    }


@contextlib.contextmanager
def _image_root(image: Path) -> Iterator[tuple[Path, str]]:
    """The image's root filesystem mounted (and its loop device); on a clean exit the freed
    blocks are punched out of the sparse image and the filesystem must pass ``e2fsck``."""
    with _loop(image) as dev, tempfile.TemporaryDirectory(prefix="vmferry-guest-") as tmp:
        with _mounted(dev + "p1", Path(tmp) / "mnt") as root:
            yield root, dev
            # replaced initramfs and package files left data in freed blocks
            subprocess.run(["fstrim", root], check=False, capture_output=True)
        _run("e2fsck", "-fy", dev + "p1")


def _check_initramfs(recipe: GuestRecipe, drivers: list[str]) -> None:
    """The built guest must be the one the recipe describes, or the build fails."""
    missing = [d for d in recipe.initramfs_must_have if d not in drivers]
    extra = [d for d in recipe.initramfs_must_lack if d in drivers]
    if missing or extra:
        raise RuntimeError(
            f"{recipe.name}: initramfs is not as the recipe says: lacks {missing}, "
            f"holds {extra} (modules: {' '.join(drivers)})"
        )


def _install_packages(root: Path, packages: tuple[str, ...]) -> None:
    """apt-get install in the chroot, the downloaded packages kept in the shared deb cache.

    The rootfs tarball's package lists are left out of images, so apt reads fresh ones (the
    Debian mirror is the only network this needs).  No service starts in the chroot
    (policy-rc.d), and the lists are removed again afterwards.
    """
    cdir = cache_dir()
    debs = cdir / "debs"
    (debs / "partial").mkdir(parents=True, exist_ok=True)
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    resolv = root / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    archives = root / "var/cache/apt/archives"
    try:
        with _locked(cdir / "debs.lock"):  # one apt at a time on the shared cache
            _run("mount", "--bind", debs, archives)
            try:
                _run("apt-get", "update", "-q", chroot=root)
                _run("apt-get", "install", "-y", "-q", "--no-install-recommends", "--purge",
                     *packages, chroot=root)  # fmt: skip
                # what apt itself marked automatic and no longer needs.  initramfs-tools-core
                # (lsinitramfs, mkinitramfs) stays in the dracut guest: debootstrap marks
                # nothing automatic, and purging it by name made the guest's first-boot
                # dracut run never finish (not investigated; see docs/testing-boot.md)
                _run("apt-get", "autoremove", "-y", "-q", "--purge", chroot=root)
            finally:
                subprocess.run(["umount", archives], check=False, capture_output=True)
    finally:
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if saved is not None:
            resolv.write_bytes(saved)
        lists = root / "var/lib/apt/lists"
        for f in lists.iterdir() if lists.is_dir() else ():
            if f.is_file() and f.name != "lock":
                f.unlink()


#: printed on the serial console by the dracut guest's one-time first boot
FIRSTBOOT_MARKER = "VMFERRY-FIRSTBOOT"

FIRSTBOOT_SCRIPT = """\
#!/bin/sh
# vmferry test builder, first boot: rebuild the initramfs --hostonly on this (VMware-like)
# machine, as Red Hat's installer does on the hardware it installs on, then power off.
# dracut's "qemu" modules would add every qemu driver because systemd-detect-virt says qemu;
# on VMware they are not selected, so they are left out here.
dracut --force --hostonly --omit "qemu qemu-net" /boot/initrd.img-{kernel} {kernel} \\
    > /dev/ttyS0 2>&1
rc=$?
sync
printf '\\n%s rc=%s\\n' '{marker}' "$rc" > /dev/ttyS0
"""

FIRSTBOOT_UNIT = """\
[Unit]
Description=vmferry test builder: dracut --hostonly on the first boot
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmferry-firstboot
ExecStartPost=/bin/systemctl poweroff --no-block
"""

FIRSTBOOT_TARGET = """\
[Unit]
Description=vmferry test builder first boot
Requires=multi-user.target vmferry-firstboot.service
After=multi-user.target
AllowIsolate=yes
"""

#: Red Hat's dracut defaults (RHEL's /usr/lib/dracut/dracut.conf.d/01-dist.conf): host-only
#: images, the root given by the boot loader's command line rather than baked in
RHEL_DRACUT_CONF = 'hostonly="yes"\nhostonly_cmdline="no"\n'


def _arm_firstboot(root: Path, kernel: str) -> None:
    (root / "etc/dracut.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dracut.conf.d/01-dist.conf").write_text(RHEL_DRACUT_CONF)
    script = root / "usr/local/sbin/vmferry-firstboot"
    script.write_text(FIRSTBOOT_SCRIPT.format(kernel=kernel, marker=FIRSTBOOT_MARKER))
    script.chmod(0o755)
    system = root / "etc/systemd/system"
    (system / "vmferry-firstboot.service").write_text(FIRSTBOOT_UNIT)
    (system / "vmferry-firstboot.target").write_text(FIRSTBOOT_TARGET)
    default = system / "default.target"
    default.unlink(missing_ok=True)
    default.symlink_to("/etc/systemd/system/vmferry-firstboot.target")


def _disarm_firstboot(root: Path) -> None:
    system = root / "etc/systemd/system"
    for name in ("vmferry-firstboot.service", "vmferry-firstboot.target"):
        (system / name).unlink()
    (root / "usr/local/sbin/vmferry-firstboot").unlink()
    default = system / "default.target"
    default.unlink()
    default.symlink_to("/etc/systemd/system/vmferry-boot.target")
    # the first boot's journal and random seed are not part of the guest as built
    shutil.rmtree(root / "var/log/journal", ignore_errors=True)


def _run_firstboot(recipe: GuestRecipe, image: Path) -> float:
    """Boot the image (writable) on the recipe's controller until dracut has run in it."""
    from tests.bootkit.boot import boot

    log = image.with_name(f"{image.name}.firstboot.log")
    try:
        result = boot(image, "raw", recipe.hostonly_controller, timeout=1500,
                      log_path=log, marker=FIRSTBOOT_MARKER, snapshot=False,
                      wait_exit=120)  # fmt: skip
        if not result.booted or not (result.marker_line or "").endswith("rc=0"):
            raise RuntimeError(f"{recipe.name}: the dracut first boot failed:\n{result}")
        return result.elapsed
    finally:
        log.unlink(missing_ok=True)


def _root_ref(recipe: GuestRecipe, root_uuid: str) -> str:
    return recipe.root_device if recipe.naming == "device" else f"UUID={root_uuid}"


def _configure(recipe: GuestRecipe, root: Path, root_uuid: str, swap_uuid: str | None) -> str:
    """Configure the guest the way the recipe's hypervisor would have left it."""
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the rootfs, found {kernels}")
    kernel = kernels[0]
    (root / "etc/hostname").write_text(f"vmferry-{recipe.name}\n")
    fstab = f"# /etc/fstab written by the vmferry test builder ({recipe.name})\n"
    fstab += f"{_root_ref(recipe, root_uuid)}\t/\text4\terrors=remount-ro\t0\t1\n"
    if swap_uuid:
        swap = "/dev/sda2" if recipe.naming == "device" else f"UUID={swap_uuid}"
        fstab += f"{swap}\tnone\tswap\tsw\t0\t0\n"
    (root / "etc/fstab").write_text(fstab)
    if recipe.initramfs_tool == "initramfs-tools":
        conf = root / "etc/initramfs-tools/initramfs.conf"
        text = conf.read_text()
        lines = [
            f"MODULES={recipe.initramfs_modules}" if ln.startswith("MODULES=") else ln
            for ln in text.splitlines()
        ]
        conf.write_text("\n".join(lines) + "\n")
        if recipe.module_list:
            mods = root / "etc/initramfs-tools/modules"
            mods.write_text(mods.read_text() + "\n".join(recipe.module_list) + "\n")
        # no resume device: the initramfs would otherwise wait for it
        (root / "etc/initramfs-tools/conf.d/resume").write_text("RESUME=none\n")
    if recipe.xorg_driver:
        (root / "etc/X11").mkdir(parents=True, exist_ok=True)
        (root / "etc/X11/xorg.conf").write_text(XORG_CONF.format(driver=recipe.xorg_driver))
    default_grub = (
        "GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_DISTRIBUTOR=Debian\n"
        'GRUB_CMDLINE_LINUX_DEFAULT=""\n'
        f'GRUB_CMDLINE_LINUX="{" ".join(recipe.kernel_args)}"\n'
        'GRUB_TERMINAL=serial\nGRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
    )
    if recipe.naming == "device":
        default_grub += "GRUB_DISABLE_LINUX_UUID=true\n"
    (root / "etc/default/grub").write_text(default_grub)
    system = root / "etc/systemd/system"
    script = root / "usr/local/sbin/vmferry-marker"
    script.write_text(MARKER_SCRIPT)
    script.chmod(0o755)
    (system / "vmferry-marker.service").write_text(MARKER_UNIT)
    (system / "vmferry-boot.target").write_text(MARKER_TARGET)
    default = system / "default.target"
    default.unlink(missing_ok=True)
    default.symlink_to("/etc/systemd/system/vmferry-boot.target")
    # nothing on the network and no clock to sync under emulation: do not wait for them
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                 "fstrim.timer", "e2scrub_reap.service"):  # fmt: skip
        (system / unit).unlink(missing_ok=True)
        (system / unit).symlink_to("/dev/null")
    return kernel


def _write_grub_cfg(recipe: GuestRecipe, root: Path, kernel: str, root_uuid: str) -> None:
    """A grub.cfg as update-grub writes it (update-grub in a chroot would see the loop device).

    GRUB finds its files by BIOS disk order (hd0), which no controller change alters; only the
    kernel's ``root=`` depends on the guest's device naming.
    """
    args = " ".join([f"root={_root_ref(recipe, root_uuid)}", "ro", *recipe.kernel_args])
    search = (
        f"search --no-floppy --fs-uuid --set=root {root_uuid}"
        if recipe.naming == "uuid"
        else "set root='hd0,msdos1'"
    )
    cfg = f"""\
#
# DO NOT EDIT THIS FILE
#
# It is automatically generated by grub-mkconfig using templates
# from /etc/grub.d and settings from /etc/default/grub
#
set default="0"
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
insmod part_msdos
insmod ext2
{search}
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os {{
\tinsmod part_msdos
\tinsmod ext2
\t{search}
\techo\t'Loading Linux {kernel} ...'
\tlinux\t/boot/vmlinuz-{kernel} {args}
\techo\t'Loading initial ramdisk ...'
\tinitrd\t/boot/initrd.img-{kernel}
}}
"""
    (root / "boot/grub/grub.cfg").write_text(cfg)


if __name__ == "__main__":  # manual: python -m tests.bootkit.guest [recipe-name ...]
    import sys

    recipes = {r.name: r for r in RECIPES}
    for name in sys.argv[1:] or list(recipes):
        t0 = time.monotonic()
        g = build_image(recipes[name])
        print(f"{name}: {g.path} kernel {g.kernel} ({time.monotonic() - t0:.1f} s)")
