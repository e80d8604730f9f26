"""Offline inspection of a Linux guest: what it is, how it boots, what ties it to its old host.

Every fact comes from files read through vmferry's own filesystem readers; nothing in the guest
runs.  A missing or unreadable file leaves its fact empty (inspection reports, it does not
stop), but a damaged partition table or an unreadable root raises a named error.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any

from vmferry.errors import GuestError
from vmferry.guest.guest import Guest, open_guest
from vmferry.guest.linux.devices import classify
from vmferry.guest.linux.initramfs import read_initramfs
from vmferry.guest.linux.parse import (
    BOOT_LINE,
    parse_cmdline,
    parse_crypttab,
    parse_os_release,
)
from vmferry.guest.overlay import ReadableDisk

MAX_INITRAMFS = 512 << 20

_FAMILIES = {
    "debian": ("debian", "ubuntu", "linuxmint", "devuan", "raspbian", "kali", "pop", "elementary"),
    "redhat": (
        "rhel",
        "centos",
        "fedora",
        "rocky",
        "almalinux",
        "ol",
        "scientific",
        "amzn",
        "cloudlinux",
        "eurolinux",
        "virtuozzo",
    ),
    "suse": ("sles", "sled", "opensuse", "opensuse-leap", "opensuse-tumbleweed", "suse"),
    "arch": ("arch", "manjaro", "endeavouros"),
    "alpine": ("alpine",),
    "gentoo": ("gentoo",),
}

_ELF_MACHINES = {
    3: "i386",
    62: "x86_64",
    183: "aarch64",
    40: "arm",
    8: "mips",
    20: "ppc",
    21: "ppc64",
    22: "s390x",
    243: "riscv64",
    258: "loongarch64",
}

ARCH_PROBES = ("/bin/ls", "/usr/bin/ls", "/bin/sh", "/usr/bin/env", "/sbin/init", "/bin/bash")

#: Guest tools of other hypervisors: (hypervisor, name, dpkg/rpm package names, telltale paths).
GUEST_TOOLS = (
    (
        "vmware",
        "open-vm-tools",
        ("open-vm-tools", "open-vm-tools-desktop"),
        ("/usr/bin/vmtoolsd", "/etc/vmware-tools/tools.conf", "/usr/lib/open-vm-tools"),
    ),
    (
        "vmware",
        "vmware-tools",
        ("vmware-tools",),
        ("/etc/vmware-tools/locations", "/usr/lib/vmware-tools", "/etc/init.d/vmware-tools"),
    ),
    (
        "virtualbox",
        "virtualbox-guest-additions",
        ("virtualbox-guest-utils", "virtualbox-guest-x11", "virtualbox-guest-dkms"),
        ("/usr/sbin/VBoxService", "/etc/init.d/vboxadd", "/opt/VBoxGuestAdditions"),
    ),
    (
        "xen",
        "xe-guest-utilities",
        ("xe-guest-utilities", "xenserver-guest-utilities"),
        (
            "/usr/sbin/xe-daemon",
            "/usr/sbin/xe-linux-distribution",
            "/etc/init.d/xe-linux-distribution",
        ),
    ),
    (
        "hyperv",
        "hyperv-daemons",
        ("hyperv-daemons", "hyperv-daemons-license"),
        ("/usr/sbin/hv_kvp_daemon", "/usr/sbin/hypervkvpd"),
    ),
    ("kvm", "qemu-guest-agent", ("qemu-guest-agent",), ("/usr/bin/qemu-ga", "/usr/sbin/qemu-ga")),
)


def inspect_image(
    path: str | os.PathLike[str], format: str | None = None, **open_kw: Any
) -> dict[str, Any]:
    """Open an image (any format, with its parents) read-only and inspect the guest in it."""
    import vmferry

    with vmferry.open(path, format, **open_kw) as disk:
        return inspect_disk(disk)


def inspect_disk(disk: ReadableDisk) -> dict[str, Any]:
    return inspect_guest(open_guest(disk))


def inspect_guest(guest: Guest) -> dict[str, Any]:
    """The inspection report (a JSON-ready dict)."""
    osinfo = detect_os(guest)
    osinfo["arch"] = detect_arch(guest)
    boot = detect_bootloader(guest)
    return {
        "os": osinfo,
        "partition_table": {"scheme": guest.table.scheme, "id": guest.table.id},
        "filesystems": [g.to_json() for g in guest.filesystems],
        "root": guest.root.to_json(),
        "mounts": {mp: g.where for mp, g in sorted(guest.mounts.items())},
        "lvm": guest.lvm.to_json(),
        "fstab": fstab_report(guest),
        "crypttab": crypttab_report(guest),
        "resume": resume_report(guest, boot),
        "bootloader": boot,
        "kernels": detect_kernels(guest),
        "guest_tools": detect_guest_tools(guest),
        "xorg": detect_xorg(guest),
        "network": detect_network(guest),
        "warnings": guest.warnings,
    }


# --- OS ---------------------------------------------------------------------------------------


def detect_os(guest: Guest) -> dict[str, Any]:
    out: dict[str, Any] = {"family": None, "distro": None, "version": None, "pretty_name": None}
    text = guest.try_read_text("/etc/os-release") or guest.try_read_text("/usr/lib/os-release")
    if text:
        kv = parse_os_release(text)
        out["distro"] = kv.get("ID", "").lower() or None
        out["version"] = kv.get("VERSION_ID") or None
        out["pretty_name"] = kv.get("PRETTY_NAME") or kv.get("NAME")
        out["family"] = _family(out["distro"], kv.get("ID_LIKE", ""))
        if out["distro"] == "debian" and not out["version"]:
            out["version"] = _debian_version(guest)
        out["source"] = "os-release"
        return out
    lsb = guest.try_read_text("/etc/lsb-release")
    if lsb:
        kv = parse_os_release(lsb)
        if kv.get("DISTRIB_ID"):
            distro = kv["DISTRIB_ID"].lower()
            out.update(
                distro=distro,
                version=kv.get("DISTRIB_RELEASE"),
                pretty_name=kv.get("DISTRIB_DESCRIPTION"),
                family=_family(distro, ""),
                source="lsb-release",
            )
            return out
    rh = guest.try_read_text("/etc/redhat-release")
    if rh:
        line = rh.strip().splitlines()[0] if rh.strip() else ""
        low = line.lower()
        distro = "rhel"
        for key, name in (
            ("centos", "centos"),
            ("fedora", "fedora"),
            ("scientific", "scientific"),
            ("oracle", "ol"),
            ("rocky", "rocky"),
            ("alma", "almalinux"),
        ):
            if key in low:
                distro = name
                break
        m = re.search(r"release\s+(\d+(?:\.\d+)*)", line)
        out.update(
            distro=distro,
            version=m.group(1) if m else None,
            pretty_name=line,
            family="redhat",
            source="redhat-release",
        )
        return out
    suse = guest.try_read_text("/etc/SuSE-release")
    if suse:
        first = suse.strip().splitlines()[0] if suse.strip() else ""
        kv = {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in suse.splitlines())}
        version = kv.get("VERSION")
        if version and kv.get("PATCHLEVEL") and kv["PATCHLEVEL"] != "0":
            version = f"{version}.{kv['PATCHLEVEL']}"
        distro = "opensuse" if "opensuse" in first.lower() else "sles"
        out.update(
            distro=distro, version=version, pretty_name=first, family="suse", source="SuSE-release"
        )
        return out
    version = _debian_version(guest)
    if version:
        out.update(distro="debian", version=version, family="debian", source="debian_version")
    return out


def _debian_version(guest: Guest) -> str | None:
    text = guest.try_read_text("/etc/debian_version")
    return text.strip() or None if text else None


def _family(distro: str | None, id_like: str) -> str | None:
    for candidate in [distro or "", *id_like.lower().split()]:
        for family, members in _FAMILIES.items():
            if candidate in members:
                return family
    return distro


def detect_arch(guest: Guest) -> str | None:
    for path in ARCH_PROBES:
        try:
            head = guest.read_head(path, 64)
        except GuestError:
            continue
        if len(head) < 20 or head[:4] != b"\x7fELF":
            continue
        order = "little" if head[5] == 1 else "big"
        machine = int.from_bytes(head[18:20], order)
        arch = _ELF_MACHINES.get(machine, f"elf-machine-{machine}")
        if arch == "ppc64" and order == "little":
            arch = "ppc64le"
        return arch
    return None


# --- storage references -----------------------------------------------------------------------


def _ref(guest: Guest, spec: str) -> dict[str, Any]:
    target = guest.resolve_device(spec)
    return {
        "device": spec,
        "naming": classify(spec),
        "resolves_to": (
            {
                "partition": target.partition.index if target.partition else None,
                "lv": target.lv,
                "type": target.type,
                "uuid": target.uuid,
                "label": target.label,
            }
            if target
            else None
        ),
    }


def fstab_report(guest: Guest) -> list[dict[str, Any]]:
    return [
        {
            **_ref(guest, e.spec),
            "mountpoint": e.mountpoint,
            "type": e.type,
            "options": e.options,
            "line": e.line + 1,
        }
        for e in guest.fstab
    ]


def crypttab_report(guest: Guest) -> list[dict[str, Any]]:
    text = guest.try_read_text("/etc/crypttab")
    if not text:
        return []
    return [
        {**_ref(guest, e.device), "name": e.name, "line": e.line + 1} for e in parse_crypttab(text)
    ]


def resume_report(guest: Guest, boot: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for arg in boot.get("kernel_args", []):
        for word in parse_cmdline(arg["args"]):
            if word.key == "resume" and word.value:
                out.append({**_ref(guest, word.value), "source": arg["path"]})
    for path in ("/etc/initramfs-tools/conf.d/resume", "/etc/uswsusp.conf"):
        text = guest.try_read_text(path)
        if not text:
            continue
        for line in text.splitlines():
            m = re.match(r"^\s*(?:RESUME\s*=|resume device\s*=)\s*(\S+)", line)
            if m:
                out.append({**_ref(guest, m.group(1).strip("\"'")), "source": path})
    return out


# --- boot -------------------------------------------------------------------------------------

GRUB_LEGACY = ("/boot/grub/menu.lst", "/boot/grub/grub.conf", "/etc/grub.conf")
GRUB2 = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg")
GRUBENV = ("/boot/grub/grubenv", "/boot/grub2/grubenv")
EXTLINUX = (
    "/boot/extlinux/extlinux.conf",
    "/boot/extlinux.conf",
    "/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/syslinux.cfg",
)
DEVICE_MAPS = ("/boot/grub/device.map", "/boot/grub2/device.map")


def detect_bootloader(guest: Guest) -> dict[str, Any]:
    configs: list[str] = []
    kinds: list[str] = []
    args: list[dict[str, Any]] = []

    def scan(path: str, kind: str) -> None:
        text = guest.try_read_text(path)
        if text is None:
            return
        configs.append(path)
        if kind not in kinds:
            kinds.append(kind)
        for n, line in enumerate(text.splitlines()):
            m = BOOT_LINE.match(line)
            if not m:
                continue
            rest = m.group("rest")
            words = rest.split(None, 1)
            if m.group("cmd") in ("kernel", "linux", "linux16", "linuxefi"):
                cmdline = words[1] if len(words) > 1 else ""
            else:
                cmdline = rest
            args.append({"path": path, "line": n + 1, "args": cmdline.strip()})

    for path in GRUB_LEGACY:
        scan(path, "grub-legacy")
    for path in GRUB2:
        scan(path, "grub2")
    for entry in guest.try_listdir("/boot/efi/EFI"):
        if entry.kind == "dir":
            scan(f"/boot/efi/EFI/{entry.name}/grub.cfg", "grub2")
    for entry in sorted(guest.try_listdir("/boot/loader/entries"), key=lambda e: e.name):
        if entry.name.endswith(".conf"):
            scan(f"/boot/loader/entries/{entry.name}", "bls")
    for path in GRUBENV:
        scan(path, "grub2")
    for path in EXTLINUX:
        scan(path, "extlinux")
    for path in (
        "/boot/efi/loader/loader.conf",
        "/boot/loader/loader.conf",
        "/efi/loader/loader.conf",
    ):
        if guest.exists(path):
            configs.append(path)
            kinds.append("systemd-boot")
    defaults = guest.try_read_text("/etc/default/grub")
    default_cmdline: dict[str, str] = {}
    if defaults is not None:
        configs.append("/etc/default/grub")
        kv = parse_os_release(defaults)
        default_cmdline = {k: v for k, v in kv.items() if k.startswith("GRUB_CMDLINE_LINUX")}
        for k, v in default_cmdline.items():
            args.append({"path": "/etc/default/grub", "line": None, "args": v, "variable": k})
    device_map = next((p for p in DEVICE_MAPS if guest.exists(p)), None)
    primary = None
    for k in ("grub2", "bls", "grub-legacy", "extlinux", "systemd-boot"):
        if k in kinds:
            primary = "grub2" if k == "bls" else k
            break
    roots = []
    for a in args:
        for word in parse_cmdline(a["args"]):
            if word.key == "root" and word.value:
                roots.append(
                    {
                        "path": a["path"],
                        "line": a["line"],
                        "device": word.value,
                        "naming": classify(word.value),
                    }
                )
    return {
        "type": primary,
        "kinds": kinds,
        "configs": configs,
        "device_map": device_map,
        "kernel_args": args,
        "root_args": roots,
    }


# --- kernels ----------------------------------------------------------------------------------

_INITRAMFS_PATTERNS = (
    "/boot/initrd.img-{v}",
    "/boot/initramfs-{v}.img",
    "/boot/initrd-{v}",
    "/boot/initrd-{v}.img",
    "/boot/initramfs-{v}",
)


def detect_kernels(guest: Guest) -> list[dict[str, Any]]:
    versions: dict[str, dict[str, Any]] = {}
    for entry in guest.try_listdir("/boot"):
        for prefix in ("vmlinuz-", "vmlinux-", "kernel-"):
            if entry.name.startswith(prefix) and entry.kind in ("file", "symlink"):
                v = entry.name[len(prefix) :]
                versions.setdefault(v, {"version": v})["image"] = f"/boot/{entry.name}"
    for moddir in ("/lib/modules", "/usr/lib/modules"):
        for entry in guest.try_listdir(moddir):
            if entry.kind == "dir":
                info = versions.setdefault(entry.name, {"version": entry.name})
                info.setdefault("modules_dir", f"{moddir}/{entry.name}")
    out = []
    for v in sorted(versions):
        info = versions[v]
        info.setdefault("image", None)
        info.setdefault("modules_dir", None)
        info["builtin_drivers"] = _builtin(guest, info["modules_dir"])
        info["initramfs"] = None
        info["drivers"] = []
        for pattern in _INITRAMFS_PATTERNS:
            path = pattern.format(v=v)
            if not guest.exists(path):
                continue
            info["initramfs"] = path
            try:
                ird = read_initramfs(guest.read_file(path, MAX_INITRAMFS))
                info["drivers"] = ird.drivers
                info["initramfs_info"] = ird.to_json()
            except GuestError as exc:
                info["initramfs_info"] = {"error": str(exc), "complete": False}
            break
        out.append(info)
    return out


def _builtin(guest: Guest, moddir: str | None) -> list[str]:
    if not moddir:
        return []
    text = guest.try_read_text(f"{moddir}/modules.builtin", 16 << 20)
    if not text:
        return []
    names = set()
    for line in text.splitlines():
        base = line.strip().rsplit("/", 1)[-1]
        if base.endswith(".ko"):
            names.add(base[:-3].replace("-", "_"))
    return sorted(names)


# --- other hypervisors' leftovers -------------------------------------------------------------


def installed_packages(guest: Guest) -> set[str]:
    """dpkg's installed package names (rpm's database is not read: file presence is used)."""
    text = guest.try_read_text("/var/lib/dpkg/status", 64 << 20)
    if not text:
        return set()
    out = set()
    for stanza in text.split("\n\n"):
        name = status = None
        for line in stanza.splitlines():
            if line.startswith("Package:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Status:"):
                status = line.split(":", 1)[1].split()
        if name and status and status[-1] == "installed":
            out.add(name)
    return out


def detect_guest_tools(guest: Guest) -> list[dict[str, Any]]:
    packages = installed_packages(guest)
    out = []
    for hypervisor, name, pkgs, paths in GUEST_TOOLS:
        evidence = [f"dpkg:{p}" for p in pkgs if p in packages]
        evidence += [p for p in paths if guest.exists(p)]
        if evidence:
            out.append({"hypervisor": hypervisor, "name": name, "evidence": evidence})
    return out


def detect_xorg(guest: Guest) -> list[dict[str, Any]]:
    paths = ["/etc/X11/xorg.conf"]
    paths += [
        f"/etc/X11/xorg.conf.d/{e.name}"
        for e in guest.try_listdir("/etc/X11/xorg.conf.d")
        if e.name.endswith(".conf")
    ]
    out = []
    for path in paths:
        text = guest.try_read_text(path)
        if text is None:
            continue
        drivers = re.findall(r'^\s*Driver\s+"([^"]+)"', text, re.MULTILINE | re.IGNORECASE)
        out.append({"path": path, "drivers": drivers})
    return out


_MAC = r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}"


def detect_network(guest: Guest) -> list[dict[str, Any]]:
    """Network configs bound to a MAC address or to an interface name of the old hardware."""
    out: list[dict[str, Any]] = []
    for path in (
        "/etc/udev/rules.d/70-persistent-net.rules",
        "/etc/udev/rules.d/70-persistent-net.rules.d",
    ):
        text = guest.try_read_text(path)
        if text:
            for m in re.finditer(rf'ATTR\{{address\}}=="({_MAC})".*?NAME="([^"]+)"', text):
                out.append(
                    {
                        "path": path,
                        "kind": "udev",
                        "mac": m.group(1).lower(),
                        "interface": m.group(2),
                    }
                )
    for base in ("/etc/sysconfig/network-scripts", "/etc/sysconfig/network"):
        for e in guest.try_listdir(base):
            if not fnmatch.fnmatch(e.name, "ifcfg-*"):
                continue
            kv = parse_os_release(guest.try_read_text(f"{base}/{e.name}") or "")
            mac = kv.get("HWADDR") or kv.get("MACADDR")
            out.append(
                {
                    "path": f"{base}/{e.name}",
                    "kind": "ifcfg",
                    "mac": mac.lower() if mac else None,
                    "interface": kv.get("DEVICE") or e.name[6:],
                }
            )
    for e in guest.try_listdir("/etc/netplan"):
        if e.name.endswith((".yaml", ".yml")):
            text = guest.try_read_text(f"/etc/netplan/{e.name}") or ""
            macs = re.findall(rf"macaddress:\s*[\"']?({_MAC})", text)
            names = re.findall(r"^\s{4}([A-Za-z0-9_.-]+):\s*$", text, re.MULTILINE)
            out.append(
                {
                    "path": f"/etc/netplan/{e.name}",
                    "kind": "netplan",
                    "mac": macs[0].lower() if macs else None,
                    "interfaces": names,
                }
            )
    text = guest.try_read_text("/etc/network/interfaces")
    if text:
        names = sorted(set(re.findall(r"^\s*iface\s+(\S+)", text, re.MULTILINE)) - {"lo"})
        out.append(
            {
                "path": "/etc/network/interfaces",
                "kind": "ifupdown",
                "mac": None,
                "interfaces": names,
            }
        )
    for e in guest.try_listdir("/etc/NetworkManager/system-connections"):
        text = guest.try_read_text(f"/etc/NetworkManager/system-connections/{e.name}") or ""
        m = re.search(rf"^mac-address=({_MAC})", text, re.MULTILINE)
        if m:
            out.append(
                {
                    "path": f"/etc/NetworkManager/system-connections/{e.name}",
                    "kind": "networkmanager",
                    "mac": m.group(1).lower(),
                }
            )
    return out
