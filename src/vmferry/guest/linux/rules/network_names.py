"""Interface names the guest's network configs expect, and a udev rule that keeps them.

ifupdown stanzas (``iface ens192 inet dhcp``), ifcfg ``DEVICE=``, NetworkManager
``interface-name=`` and netplan definitions name the NIC.  Names from the old virtual
hardware (``ens192`` is PCI slot 192 on VMware; ``enp0s3`` a bus position) are not what the
new hypervisor's NIC gets (``enp1s0``, ``ens3``, ``eth0`` on Hyper-V), and the MAC bindings
that gave older guests ``eth0`` are gone with the MAC.  When the guest's configs name exactly
one physical NIC, vmferry writes ``/etc/udev/rules.d/70-vmferry-net.rules`` giving the
(single) virtual NIC of any known hypervisor model that name, so every config keeps working
unchanged.  A udev rule rather than a systemd ``.link`` file: ``.link`` names are not
applied to an interface the initramfs already renamed (systemd issue 9006), rule names are.
Several NICs: a finding (the old-to-new mapping cannot be known offline).
"""

from __future__ import annotations

import re
from collections.abc import Set

from vmferry.errors import GuestError
from vmferry.guest.linux.rules.base import PlanContext
from vmferry.vm.targets import NICS

PIN_RULES = "/etc/udev/rules.d/70-vmferry-net.rules"
#: the name the kernel driver registers in sysfs (what udev's DRIVERS== sees), per NIC model;
#: module names are listed too where they differ, so a renamed driver still matches
DRIVER_NAMES = {
    "vmxnet3": ("vmxnet3",),
    "e1000": ("e1000",),
    "e1000e": ("e1000e",),
    "virtio": ("virtio_net",),
    "netvsc": ("hv_netvsc",),
    "dec21140": ("tulip",),
    "rtl8139": ("8139cp", "8139too"),
    "pcnet": ("pcnet32",),
    "xen-netfront": ("vif", "xen_netfront"),
    "ena": ("ena",),
}
#: physical ethernet names: kernel (eth0), predictable (eno1, ens192, enp0s3, enx..., enX0),
#: biosdevname (em1, p1p1); bridges, bonds, VLANs, Wi-Fi and tunnels are not NICs to pin
_PHYSICAL = re.compile(r"eth\d+|en[a-zA-Z][0-9A-Za-z_]*|em\d+|p\d+p\d+")
_IFUPDOWN_NAMES = re.compile(
    r"^\s*(?:iface|auto|allow-[a-z]+)\s+(.+?)\s*$"
    r"|^\s*(?:bridge[-_]ports|bond[-_]slaves|slaves|vlan[-_]raw[-_]device)\s+(.+?)\s*$",
    re.MULTILINE,
)
IGNORED_SUFFIXES = ("~", ".bak", ".orig", ".old", ".rpmnew", ".rpmsave", ".rpmorig")
IFCFG_DIRS = ("/etc/sysconfig/network-scripts", "/etc/sysconfig/network")
NM_DIR = "/etc/NetworkManager/system-connections"
KERNEL_CMDLINE_FILES = (
    "/etc/default/grub",
    "/boot/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/boot/grub/menu.lst",
    "/boot/grub/grub.conf",
    "/boot/grub2/grubenv",
    "/etc/kernel/cmdline",
)
NAMING_RULES = (  # where udev's predictable naming comes from (systemd 197 and later)
    "/lib/udev/rules.d/80-net-setup-link.rules",
    "/usr/lib/udev/rules.d/80-net-setup-link.rules",
    "/lib/udev/rules.d/80-net-name-slot.rules",
    "/usr/lib/udev/rules.d/80-net-name-slot.rules",
)
_IFNAMES_OFF = re.compile(r"(?<![\w.])net\.ifnames=0\b")
NAMING_MASKS = (
    "/etc/udev/rules.d/80-net-setup-link.rules",
    "/etc/udev/rules.d/80-net-name-slot.rules",
    "/etc/systemd/network/99-default.link",
)


def physical(name: str, known: Set[str] = frozenset()) -> str | None:
    """The NIC a configured interface name stands on (``ens192.10`` → ``ens192``), or None.

    ``known``: custom names (``lan0``) that a MAC rule or ``.link`` file gave a NIC."""
    base = re.split(r"[.:@]", name, maxsplit=1)[0]
    return base if _PHYSICAL.fullmatch(base) or base in known else None


def ifupdown_names(ctx: PlanContext, known: Set[str] = frozenset()) -> dict[str, set[str]]:
    """Physical NIC names in /etc/network/interfaces and interfaces.d/*, by file."""
    paths = ["/etc/network/interfaces"]
    paths += [
        f"/etc/network/interfaces.d/{e.name}"
        for e in sorted(ctx.guest.try_listdir("/etc/network/interfaces.d"), key=lambda e: e.name)
        if e.kind == "file"
    ]
    out: dict[str, set[str]] = {}
    for path in paths:
        text = ctx.read(path)
        if not text:
            continue
        for m in _IFUPDOWN_NAMES.finditer(text):
            words = (m.group(1) or m.group(2)).split()
            if m.group(0).lstrip().startswith("iface"):
                words = words[:1]  # iface NAME FAMILY METHOD
            names = {n for w in words if (n := physical(w, known))}
            if names:
                out.setdefault(path, set()).update(names)
    return out


def ifcfg_names(ctx: PlanContext, known: Set[str] = frozenset()) -> dict[str, set[str]]:
    """``DEVICE=`` (else the file name) of Red Hat / SUSE ifcfg files."""
    out: dict[str, set[str]] = {}
    for base in IFCFG_DIRS:
        for e in sorted(ctx.guest.try_listdir(base), key=lambda e: e.name):
            if not e.name.startswith("ifcfg-") or e.kind != "file" or e.name == "ifcfg-lo":
                continue
            if e.name.endswith(IGNORED_SUFFIXES):
                continue  # initscripts and NetworkManager skip these too
            path = f"{base}/{e.name}"
            text = ctx.read(path) or ""
            m = re.search(r"""^\s*DEVICE\s*=\s*["']?([^"'\s#]+)""", text, re.MULTILINE)
            name = physical(m.group(1) if m else e.name[len("ifcfg-") :], known)
            if name:
                out.setdefault(path, set()).add(name)
    return out


def nm_names(ctx: PlanContext, known: Set[str] = frozenset()) -> dict[str, set[str]]:
    """``interface-name=`` of NetworkManager keyfiles."""
    out: dict[str, set[str]] = {}
    for e in sorted(ctx.guest.try_listdir(NM_DIR), key=lambda e: e.name):
        if e.kind != "file":
            continue
        path = f"{NM_DIR}/{e.name}"
        text = ctx.read(path) or ""
        m = re.search(r"^\s*interface-name\s*=\s*(\S+)", text, re.MULTILINE)
        name = physical(m.group(1), known) if m else None
        if name:
            out.setdefault(path, set()).add(name)
    return out


def kernel_naming(ctx: PlanContext) -> bool:
    """True when the guest names NICs eth0, eth1... in probe order (no predictable names):
    ``net.ifnames=0`` on a kernel command line, the naming rules masked, or a udev too old
    to have them."""
    for path in KERNEL_CMDLINE_FILES:
        if re.search(r"(?<![\w.])net\.ifnames=0\b", ctx.read(path) or ""):
            return True
    for e in ctx.guest.try_listdir("/boot/loader/entries"):
        if re.search(
            r"(?<![\w.])net\.ifnames=0\b", ctx.read(f"/boot/loader/entries/{e.name}") or ""
        ):
            return True
    for path in NAMING_MASKS:
        if ctx.lexists(path):
            try:
                if ctx.guest.readlink(path) == "/dev/null":
                    return True
            except GuestError:
                if not (ctx.read(path) or "").strip():
                    return True
    return not any(ctx.guest.exists(p) for p in NAMING_RULES)


def pin_rule_text(name: str, target: str, sources: list[str]) -> str:
    drivers = "|".join(d for model in NICS for d in DRIVER_NAMES.get(model, ()))
    listed = "\n".join(f"#   {s}" for s in sources)
    return (
        f"# Written by vmferry when this guest was moved to {target}.\n"
        f'# The network configuration names its only NIC "{name}":\n{listed}\n'
        "# The new virtual hardware would give that NIC another name, so this rule gives it\n"
        f'# "{name}" (any NIC of the virtual models vmferry knows; pass-through devices are\n'
        "# not matched).  Delete this file to get the distribution's default naming back.\n"
        f'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="{drivers}", ATTR{{type}}=="1", '
        f'NAME="{name}"\n'
    )


def plan_pin(ctx: PlanContext, rule: str, by_file: dict[str, set[str]]) -> None:
    """Pin the single expected NIC name; report when there are several."""
    names = set().union(*by_file.values()) if by_file else set()
    if not names:
        return
    kernel = kernel_naming(ctx)
    if len(names) > 1:
        if kernel and all(re.fullmatch(r"eth\d+", n) for n in names):
            return  # probe order, as before the move
        where = "; ".join(f"{p}: {', '.join(sorted(n))}" for p, n in sorted(by_file.items()))
        ctx.find(
            rule,
            "warning",
            f"the network configuration names several NICs ({', '.join(sorted(names))}); "
            "which new NIC is which cannot be known offline: check the names on the target "
            f"({where})",
        )
        return
    (name,) = names
    if kernel and name == "eth0":
        return  # the kernel names the only NIC eth0
    existing = ctx.read(PIN_RULES)
    if existing is not None:
        if f'NAME="{name}"' not in existing:
            ctx.find(rule, "warning", f"{PIN_RULES} exists and does not name the NIC {name}; "
                     "left alone", PIN_RULES)  # fmt: skip
        return
    if not ctx.guest.exists("/etc/udev/rules.d"):
        ctx.find(
            rule,
            "warning",
            f"the configuration expects a NIC named {name} and the guest has no "
            "/etc/udev/rules.d to pin that name; check it on the target",
        )
        return
    sources = sorted(by_file)
    ctx.create(
        rule,
        PIN_RULES,
        pin_rule_text(name, ctx.target.name, sources),
        f"the configuration expects the NIC to be named {name}; the target would name it otherwise",
    )
