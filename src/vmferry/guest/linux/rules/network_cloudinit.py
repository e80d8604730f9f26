"""cloud-init: keep it from regenerating the netplan file vmferry made portable.

cloud-init writes ``/etc/netplan/50-cloud-init.yaml`` ("changes to it will not persist across
an instance reboot") and renders it again when it believes it runs on a new instance, from its
datasource's network config; a datasource left over from the old hypervisor (a NoCloud seed,
VMware guestinfo) would bring the old MAC match back.  When vmferry edited such a file it writes
the switch that file's own header documents, ``network: {config: disabled}``, in
``/etc/cloud/cloud.cfg.d/99-disable-network-config.cfg``.  On a cloud target (Azure), whose
datasource describes the new NIC, cloud-init is left in charge and that is reported instead.
"""

from __future__ import annotations

import re

from vmferry.guest.linux.rules.base import PlanContext

CFG_DIR = "/etc/cloud/cloud.cfg.d"
DISABLE = f"{CFG_DIR}/99-disable-network-config.cfg"
#: targets whose platform datasource supplies the network config for the new NIC
CLOUD_TARGETS = frozenset({"azure"})
_DISABLED = re.compile(r"config\s*:\s*disabled")
CONTENT = (
    "# Written by vmferry: the netplan file cloud-init generated was made portable for the new\n"
    "# hypervisor; without this, cloud-init could render it again from its old datasource.\n"
    "# Delete this file to let cloud-init manage the network configuration again.\n"
    "network: {config: disabled}\n"
)


def cloud_init_present(ctx: PlanContext) -> bool:
    return ctx.guest.exists("/etc/cloud/cloud.cfg")


def network_config_disabled(ctx: PlanContext) -> bool:
    """True when cloud-init is disabled, or its network rendering is."""
    if ctx.guest.exists("/etc/cloud/cloud-init.disabled"):
        return True
    paths = ["/etc/cloud/cloud.cfg"] + [
        f"{CFG_DIR}/{e.name}"
        for e in ctx.guest.try_listdir(CFG_DIR)
        if e.kind == "file" and e.name.endswith(".cfg")
    ]
    return any(_DISABLED.search(ctx.read(p) or "") for p in paths)


def plan_cloud_init(ctx: PlanContext, rule: str, edited: list[str]) -> None:
    if not edited or not cloud_init_present(ctx) or network_config_disabled(ctx):
        return
    files = ", ".join(edited)
    if ctx.target.name in CLOUD_TARGETS:
        ctx.find(
            rule,
            "info",
            f"cloud-init will render the network configuration again from the {ctx.target.name} "
            f"datasource on the first boot, replacing vmferry's edit of {files}",
            edited[0],
        )
        return
    if not ctx.guest.exists(CFG_DIR):
        ctx.find(
            rule,
            "warning",
            f"cloud-init may render {files} again from its old datasource and {CFG_DIR} is "
            "missing, so vmferry cannot disable that",
            edited[0],
        )
        return
    ctx.create(
        rule,
        DISABLE,
        CONTENT,
        f"cloud-init must not render {files} again from the old hypervisor's datasource",
    )
