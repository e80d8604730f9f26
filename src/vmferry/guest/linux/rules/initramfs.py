"""Can each kernel's initramfs reach the root disk on the target's boot controller?  If not,
add the driver of the target's preferred controller.

Per kernel: when the initramfs (plus ``modules.builtin``) lacks a driver of the preferred boot
controller, an archive built from the guest's own /lib/modules is appended to the initrd file
(:mod:`vmferry.guest.linux.inject`), and the generator's configuration names the drivers so the
guest's next initramfs rebuild keeps them (initramfs-tools ``/etc/initramfs-tools/modules``,
dracut ``/etc/dracut.conf.d/90-vmferry.conf``).  When that cannot be done completely (module
file missing, built for another kernel, unknown generator...), the finding says why and what the
initramfs can boot from; ``fix`` exits non-zero when no kernel can boot on the target, and the
VM-config writer can pick a controller from :func:`usable_boot_controllers`.
"""

from __future__ import annotations

from typing import Any

from vmferry.errors import GuestError
from vmferry.guest.linux.inject import DriverPack, plan_driver_pack
from vmferry.guest.linux.inspect import detect_kernels
from vmferry.guest.linux.kmod import is_module_word
from vmferry.guest.linux.rules.base import PlanContext
from vmferry.vm.targets import CONTROLLERS, TargetProfile

RULE = "initramfs"
ITOOLS_MODULES = "/etc/initramfs-tools/modules"
DRACUT_CONF_DIR = "/etc/dracut.conf.d"
DRACUT_CONF = "/etc/dracut.conf.d/90-vmferry.conf"


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
    preferred = ctx.boot_controller
    drivers = CONTROLLERS[preferred].linux_drivers
    bootable = []
    packs: list[DriverPack] = []
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
        if preferred not in usable:
            pack, why_not = _try_pack(ctx, k, path, drivers)
            if pack is not None:
                packs.append(pack)
                usable.insert(0, preferred)
                ctx.append(
                    RULE,
                    path,
                    pack.data,
                    pack.old_size,
                    pack.summary,
                    f"kernel {k['version']} needs {', '.join(drivers)} to reach its root disk on "
                    f"{preferred}",
                )
                ctx.find(
                    RULE,
                    "info",
                    f"kernel {k['version']}: adds the {preferred} drivers to its initramfs "
                    f"({', '.join(pack.added)}) from /lib/modules",
                    path,
                )
            else:
                needed = ", ".join(drivers)
                alt = f"; it can boot from: {', '.join(usable)}" if usable else ""
                ctx.find(
                    RULE,
                    "warning" if usable else "error",
                    f"kernel {k['version']}: initramfs lacks drivers for {preferred} ({needed})"
                    + alt
                    + (f"; vmferry cannot add them: {why_not}" if why_not else ""),
                    path,
                )
        if usable:
            bootable.append(k["version"])
        if not info.get("complete", True) and not packs:
            ctx.find(
                RULE,
                "warning",
                "part of the initramfs could not be read; its driver list may be short",
                path,
            )
    if packs:
        _persist(ctx, packs)
    if not bootable and any(f.severity == "error" and f.rule == RULE for f in ctx.findings):
        ctx.find(
            RULE,
            "error",
            f"no kernel's initramfs can reach the root disk on {ctx.target.name}, and vmferry "
            "could not add the drivers (see above)",
        )


def _try_pack(
    ctx: PlanContext, kernel: dict[str, Any], path: str, drivers: tuple[str, ...]
) -> tuple[DriverPack | None, str | None]:
    """The driver pack for one kernel, or None and the reason it cannot be built."""
    try:
        pack = plan_driver_pack(
            ctx.guest,
            kernel["version"],
            kernel.get("modules_dir"),
            path,
            drivers,
            root_fs=ctx.guest.root.type,
        )
    except GuestError as exc:
        return None, str(exc)
    if pack is None:  # the listing said a driver is missing, the tree says nothing is
        return None, "the module tree lists nothing to add"
    return pack, None


def _persist(ctx: PlanContext, packs: list[DriverPack]) -> None:
    """Name the drivers in the generator's configuration so a rebuild in the guest keeps them."""
    why = "the guest's next initramfs rebuild must keep the drivers vmferry added"
    names: list[str] = []
    for p in packs:
        names += [d for d in p.load if d not in names]
    generators = {p.generator for p in packs}
    header = f"# added by vmferry: drivers of the {ctx.target.name} boot disk controller\n"
    if "initramfs-tools" in generators:
        text = ctx.read(ITOOLS_MODULES)
        if text is None:
            ctx.create(RULE, ITOOLS_MODULES, header + "".join(f"{n}\n" for n in names), why)
        else:
            listed = {ln.split()[0] for ln in text.splitlines() if ln.strip() and ln[0] != "#"}
            missing = [n for n in names if n not in listed and is_module_word(n)]
            if missing:
                sep = "" if not text or text.endswith("\n") else "\n"
                added = header + "".join(f"{n}\n" for n in missing)
                ctx.edit(RULE, ITOOLS_MODULES, text + sep + added, why)
    if "dracut" in generators:
        line = f'add_drivers+=" {" ".join(names)} "\n'
        if ctx.guest.exists(DRACUT_CONF_DIR):
            ctx.create(RULE, DRACUT_CONF, header + line, why)
        elif (text := ctx.read("/etc/dracut.conf")) is not None:
            sep = "" if not text or text.endswith("\n") else "\n"
            ctx.edit(RULE, "/etc/dracut.conf", text + sep + header + line, why)
        else:
            ctx.find(
                RULE,
                "warning",
                "neither /etc/dracut.conf.d nor /etc/dracut.conf exists: a dracut rebuild in "
                f"the guest will drop {', '.join(names)} unless told to add them",
            )
