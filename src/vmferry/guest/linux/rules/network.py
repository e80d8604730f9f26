"""Network configs bound to the old NIC's MAC address or PCI position, made portable.

The new virtual NIC has a new MAC: udev's 70-persistent-net.rules then names it eth1 and the
eth0 config never comes up; ifcfg ``HWADDR=`` and NetworkManager ``mac-address=`` refuse to
apply to it.  Those bindings are commented out (kept visible, marked ``vmferry:``) rather than
deleted.  netplan and systemd-networkd MAC/driver matches become name matches
(:mod:`.network_netplan`, :mod:`.network_networkd`), and cloud-init is told not to render the
netplan file again (:mod:`.network_cloudinit`).  Then the one NIC name the configs expect
(``ens192`` from the old PCI layout, ``eth0`` of a removed MAC rule) is kept for the new NIC by
a udev rule (:mod:`.network_names`).  See docs/guest-network.md.
"""

from __future__ import annotations

import re

from vmferry.guest.linux.rules.base import PlanContext
from vmferry.guest.linux.rules.network_cloudinit import plan_cloud_init
from vmferry.guest.linux.rules.network_names import (
    ifcfg_names,
    ifupdown_names,
    nm_names,
    physical,
    plan_pin,
)
from vmferry.guest.linux.rules.network_netplan import plan_netplan
from vmferry.guest.linux.rules.network_networkd import plan_networkd

RULE = "network"
MARK = "# vmferry: bound to the old NIC: "
UDEV_RULES = "/etc/udev/rules.d/70-persistent-net.rules"
_UDEV_MAC = re.compile(r'^\s*[^#\s].*ATTR\{address\}=="[0-9A-Fa-f:]{17}"')
_UDEV_NAME = re.compile(r'\bNAME\s*:?=\s*"([^"$%*?]+)"')
_IFCFG_MAC = re.compile(r"^\s*HWADDR\s*=")
_NM_MAC = re.compile(r"^\s*mac-address\s*=")
WHY = "the target's NIC has a different MAC address"


def _comment_out(ctx: PlanContext, path: str, pattern: re.Pattern[str]) -> None:
    text = ctx.read(path)
    if text is None:
        return
    lines = text.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if pattern.match(line):
            lines[n] = MARK + line
    ctx.edit(RULE, path, "".join(lines), WHY)


def _udev_names(ctx: PlanContext) -> set[str]:
    """Names the MAC rules of 70-persistent-net.rules give (read before they are commented)."""
    text = ctx.read(UDEV_RULES) or ""
    return {
        m.group(1)
        for line in text.splitlines()
        if _UDEV_MAC.match(line) and (m := _UDEV_NAME.search(line))
    }


def plan(ctx: PlanContext) -> None:
    known = _udev_names(ctx)
    _comment_out(ctx, UDEV_RULES, _UDEV_MAC)
    for base in ("/etc/sysconfig/network-scripts", "/etc/sysconfig/network"):
        for e in sorted(ctx.guest.try_listdir(base), key=lambda e: e.name):
            if e.name.startswith("ifcfg-") and e.name != "ifcfg-lo" and e.kind == "file":
                _comment_out(ctx, f"{base}/{e.name}", _IFCFG_MAC)
    nm = "/etc/NetworkManager/system-connections"
    for e in sorted(ctx.guest.try_listdir(nm), key=lambda e: e.name):
        if e.kind == "file":
            _comment_out(ctx, f"{nm}/{e.name}", _NM_MAC)
    netplan = plan_netplan(ctx, RULE)
    plan_cloud_init(ctx, RULE, netplan.cloud_init_files)
    networkd = plan_networkd(ctx, RULE)
    known |= networkd.link_names
    by_file: dict[str, set[str]] = {}
    for names in (ifupdown_names(ctx, known), ifcfg_names(ctx, known), nm_names(ctx, known)):
        by_file.update(names)
    by_file.update(netplan.names)  # set-name and definition ids: NIC names by construction
    for path, names in networkd.names.items():
        if kept := {n for n in names if physical(n, known)}:
            by_file[path] = kept
    if netplan.unresolved or networkd.unresolved:
        return  # a config still bound to the old NIC: pinning a name could misfire
    plan_pin(ctx, RULE, by_file)
