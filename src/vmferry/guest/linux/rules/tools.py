"""Other hypervisors' guest tools: masked in systemd, so they cannot act on the new host.

Masking (a ``/etc/systemd/system/UNIT`` symlink to ``/dev/null``) is how systemd itself disables
a unit for good, and it is undone with ``systemctl unmask``; nothing is deleted.  Units the
administrator overrode in /etc, and SysV-only guests, are reported instead.
"""

from __future__ import annotations

from vmferry.errors import GuestError
from vmferry.guest.linux.rules.base import PlanContext

RULE = "tools"

UNITS = {
    "vmware": (
        "open-vm-tools.service",
        "vmtoolsd.service",
        "vmware-tools.service",
        "vgauth.service",
        "vmware-tools-thinprint.service",
    ),
    "virtualbox": ("vboxadd.service", "vboxadd-service.service", "vboxadd-x11.service"),
    "xen": ("xe-linux-distribution.service", "xe-daemon.service", "xen-guest-agent.service"),
    "hyperv": (
        "hv-kvp-daemon.service",
        "hypervkvpd.service",
        "hv_kvp_daemon.service",
        "hv-vss-daemon.service",
        "hypervvssd.service",
        "hv-fcopy-daemon.service",
        "hypervfcopyd.service",
    ),
}
SYSV = {
    "vmware": ("vmware-tools", "open-vm-tools", "vmware-tools-thinprint"),
    "virtualbox": ("vboxadd", "vboxadd-service", "vboxadd-x11"),
    "xen": ("xe-linux-distribution",),
    "hyperv": ("hv_kvp_daemon", "hypervkvpd"),
}
#: Which hypervisor family a target is; its own tools stay enabled.
TARGET_FAMILY = {
    "kvm": "kvm",
    "proxmox": "kvm",
    "hyperv": "hyperv",
    "hyperv-gen2": "hyperv",
    "azure": "hyperv",
    "vmware": "vmware",
    "ovf": "vmware",
    "xen": "xen",
    "virtualbox": "virtualbox",
}
UNIT_DIRS = ("/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system")
SYSTEMD = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
WHY = "guest tools of another hypervisor must not run on the target"


def plan(ctx: PlanContext) -> None:
    own = TARGET_FAMILY.get(ctx.target.name)
    has_systemd = any(ctx.guest.exists(p) for p in SYSTEMD)
    for family, units in UNITS.items():
        if family == own:
            continue
        if has_systemd:
            for unit in units:
                _mask(ctx, unit)
        for script in SYSV[family]:
            if not has_systemd and ctx.guest.exists(f"/etc/init.d/{script}"):
                ctx.find(
                    RULE,
                    "warning",
                    f"SysV service {script} ({family} tools) stays "
                    "enabled: vmferry does not edit runlevel links yet",
                    f"/etc/init.d/{script}",
                )


def _mask(ctx: PlanContext, unit: str) -> None:
    installed = [d for d in UNIT_DIRS if ctx.lexists(f"{d}/{unit}")]
    if not installed:
        return
    override = f"/etc/systemd/system/{unit}"
    if ctx.lexists(override):
        try:
            if ctx.guest.readlink(override) == "/dev/null":
                return  # already masked
        except GuestError:  # a regular file: the administrator's own unit
            pass
        ctx.find(
            RULE, "warning", f"{unit} is defined in /etc by the administrator; left alone", override
        )
        return
    if not ctx.guest.exists("/etc/systemd/system"):
        return
    ctx.symlink(RULE, override, "/dev/null", WHY)
