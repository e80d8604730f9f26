"""Network configs bound to the old NIC's MAC address, made portable.

The new virtual NIC has a new MAC: udev's 70-persistent-net.rules then names it eth1 and the
eth0 config never comes up; ifcfg ``HWADDR=`` and NetworkManager ``mac-address=`` refuse to
apply to it.  Those bindings are commented out (kept visible, marked ``vmferry:``) rather than
deleted.  netplan ``match: macaddress`` (YAML) and interface names chosen by the old PCI layout
(ens192, ...) are reported, not edited.
"""

from __future__ import annotations

import re

from vmferry.guest.linux.rules.base import PlanContext

RULE = "network"
MARK = "# vmferry: bound to the old NIC: "
UDEV_RULES = "/etc/udev/rules.d/70-persistent-net.rules"
_UDEV_MAC = re.compile(r'^\s*[^#\s].*ATTR\{address\}=="[0-9A-Fa-f:]{17}"')
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


def plan(ctx: PlanContext) -> None:
    _comment_out(ctx, UDEV_RULES, _UDEV_MAC)
    for base in ("/etc/sysconfig/network-scripts", "/etc/sysconfig/network"):
        for e in sorted(ctx.guest.try_listdir(base), key=lambda e: e.name):
            if e.name.startswith("ifcfg-") and e.name != "ifcfg-lo" and e.kind == "file":
                _comment_out(ctx, f"{base}/{e.name}", _IFCFG_MAC)
    nm = "/etc/NetworkManager/system-connections"
    for e in sorted(ctx.guest.try_listdir(nm), key=lambda e: e.name):
        if e.kind == "file":
            _comment_out(ctx, f"{nm}/{e.name}", _NM_MAC)
    for e in ctx.guest.try_listdir("/etc/netplan"):
        text = ctx.read(f"/etc/netplan/{e.name}") or ""
        if re.search(r"^\s*macaddress\s*:", text, re.MULTILINE):
            ctx.find(
                RULE,
                "warning",
                "netplan matches an interface by MAC address; edit it for the new NIC",
                f"/etc/netplan/{e.name}",
            )
    text = ctx.read("/etc/network/interfaces") or ""
    slot_names = sorted(set(re.findall(r"^\s*iface\s+(en[ops]\w+)", text, re.MULTILINE)))
    if slot_names:
        ctx.find(
            RULE,
            "warning",
            f"interfaces named by PCI slot ({', '.join(slot_names)}) will "
            "be named differently on the target",
            "/etc/network/interfaces",
        )
