"""X server: a video driver of the old hypervisor → one that works on any (modesetting/fbdev).

With ``Driver "vmware"`` forced in xorg.conf, X fails on any other hypervisor and a desktop
guest boots to a black screen.  The replacement is the most generic driver the guest has
installed: modesetting (any KMS device), else fbdev, else vesa; if none is installed the line is
left and a finding says so.
"""

from __future__ import annotations

import re

from vmferry.guest.linux.rules.base import PlanContext

RULE = "xorg"

#: Video drivers tied to one hypervisor's virtual GPU → the target that keeps them.
HYPERVISOR_DRIVERS = {"vmware": "vmware", "vboxvideo": "virtualbox", "qxl": "kvm"}
GENERIC = ("modesetting", "fbdev", "vesa")
DRIVER_DIRS = (
    "/usr/lib/xorg/modules/drivers",
    "/usr/lib64/xorg/modules/drivers",
    "/usr/lib/x86_64-linux-gnu/xorg/modules/drivers",
    "/usr/X11R6/lib/modules/drivers",
)
_DRIVER = re.compile(r'^(\s*Driver\s+")([^"]+)(")', re.IGNORECASE)


def config_files(ctx: PlanContext) -> list[str]:
    paths = ["/etc/X11/xorg.conf"]
    for e in sorted(ctx.guest.try_listdir("/etc/X11/xorg.conf.d"), key=lambda e: e.name):
        if e.name.endswith(".conf"):
            paths.append(f"/etc/X11/xorg.conf.d/{e.name}")
    return paths


def _generic_driver(ctx: PlanContext) -> str | None:
    installed: set[str] = set()
    for d in DRIVER_DIRS:
        installed |= {e.name for e in ctx.guest.try_listdir(d)}
    for name in GENERIC:
        if f"{name}_drv.so" in installed:
            return name
    return None


def plan(ctx: PlanContext) -> None:
    looked_up = False
    replacement: str | None = None
    for path in config_files(ctx):
        text = ctx.read(path)
        if text is None:
            continue
        lines = text.splitlines(keepends=True)
        for n, line in enumerate(lines):
            m = _DRIVER.match(line)
            if not m:
                continue
            keeper = HYPERVISOR_DRIVERS.get(m.group(2).lower())
            if keeper is None or keeper == ctx.target.name:
                continue
            if not looked_up:
                replacement, looked_up = _generic_driver(ctx), True
            if replacement is None:
                ctx.find(
                    RULE,
                    "warning",
                    f'Driver "{m.group(2)}" only works on {keeper} and no '
                    "generic X driver (modesetting, fbdev, vesa) is installed",
                    path,
                )
                continue
            lines[n] = line[: m.start(2)] + replacement + line[m.end(2) :]
        ctx.edit(RULE, path, "".join(lines), "the old hypervisor's virtual GPU is gone")
