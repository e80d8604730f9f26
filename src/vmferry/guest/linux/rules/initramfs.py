"""Can each kernel's initramfs reach the root disk on the target's boot controller?

Findings only, for now: adding a driver (an extra initramfs archive built from the guest's own
/lib/modules) needs file creation in the guest filesystem, which vmferry does not do yet.  The
answer still matters today: ``fix`` exits non-zero when no kernel can boot on the target, and
the VM-config writer can pick a controller from :func:`usable_boot_controllers`.
"""

from __future__ import annotations

from typing import Any

from vmferry.guest.linux.inspect import detect_kernels
from vmferry.guest.linux.rules.base import PlanContext
from vmferry.vm.targets import CONTROLLERS, TargetProfile

RULE = "initramfs"


def usable_boot_controllers(
    kernel: dict[str, Any], target: TargetProfile, firmware: str
) -> list[str]:
    """The target's boot controllers whose every driver is in the initramfs or built in."""
    have = set(kernel.get("drivers", [])) | set(kernel.get("builtin_drivers", []))
    return [
        model
        for model in target.boot_controllers.get(firmware, ())
        if all(d in have for d in CONTROLLERS[model].linux_drivers)
    ]


def plan(ctx: PlanContext) -> None:
    kernels = [k for k in detect_kernels(ctx.guest) if k.get("image")]
    if not kernels:
        ctx.find(RULE, "warning", "no kernel found under /boot (a separate /boot not mounted?)")
        return
    preferred = ctx.target.preferred_boot_controller(ctx.firmware)
    bootable = []
    for k in kernels:
        path = k.get("initramfs")
        info = k.get("initramfs_info") or {}
        if path is None:
            ctx.find(
                RULE,
                "warning",
                f"kernel {k['version']} has no initramfs; vmferry cannot "
                "tell which storage drivers it has built in",
            )
            continue
        if "error" in info:
            ctx.find(RULE, "warning", f"initramfs unreadable: {info['error']}", path)
            continue
        usable = usable_boot_controllers(k, ctx.target, ctx.firmware)
        if usable:
            bootable.append(k["version"])
        if preferred not in usable:
            needed = ", ".join(CONTROLLERS[preferred].linux_drivers)
            alt = f"; it can boot from: {', '.join(usable)}" if usable else ""
            ctx.find(
                RULE,
                "warning" if usable else "error",
                f"kernel {k['version']}: initramfs lacks drivers for {preferred} ({needed})" + alt,
                path,
            )
        if not info.get("complete", True):
            ctx.find(
                RULE,
                "warning",
                "part of the initramfs could not be read; its driver list may be short",
                path,
            )
    if not bootable and any(f.severity == "error" and f.rule == RULE for f in ctx.findings):
        ctx.find(
            RULE,
            "error",
            f"no kernel's initramfs can reach the root disk on "
            f"{ctx.target.name}; vmferry cannot add drivers yet",
        )
