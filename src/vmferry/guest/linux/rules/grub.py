"""Boot loader configs: ``root=/dev/sdaN`` → ``root=UUID=...``; device.map → target's disk.

Covers GRUB legacy (menu.lst/grub.conf ``kernel`` lines), GRUB 2 (grub.cfg ``linux`` lines,
grubenv ``kernelopts``), BLS entries (``options``), extlinux (``APPEND``) and
``/etc/default/grub`` (so the next update-grub in the guest keeps the fix).  GRUB's own device
names (``root (hd0,0)``, ``set root='hd0,msdos1'``) follow BIOS order, not the controller, and are
left alone.
"""

from __future__ import annotations

import re

from vmferry.guest.linux.inspect import DEVICE_MAPS, EXTLINUX, GRUB2, GRUB_LEGACY, GRUBENV
from vmferry.guest.linux.rules.base import PlanContext
from vmferry.guest.linux.rules.common import (
    rewrite_args_string,
    rewrite_cmdline,
    target_device_name,
)

RULE = "grub"
WHY = "the kernel's root device name changes with the disk controller"
GRUBENV_SIZE = 1024


def boot_configs(ctx: PlanContext) -> list[str]:
    """Every boot config that may hold a kernel command line (grubenv handled apart)."""
    paths = [*GRUB_LEGACY, *GRUB2, *EXTLINUX]
    for e in ctx.guest.try_listdir("/boot/efi/EFI"):
        if e.kind == "dir":
            paths.append(f"/boot/efi/EFI/{e.name}/grub.cfg")
    for e in sorted(ctx.guest.try_listdir("/boot/loader/entries"), key=lambda e: e.name):
        if e.name.endswith(".conf"):
            paths.append(f"/boot/loader/entries/{e.name}")
    return paths


def rewrite_boot_files(ctx: PlanContext, rule: str, keys: set[str], why: str) -> None:
    """Apply the ``keys`` rewrite to every boot config, grubenv and /etc/default/grub."""
    for path in boot_configs(ctx):
        text = ctx.read(path)
        if text is not None:
            ctx.edit(rule, path, rewrite_cmdline(ctx, rule, path, text, keys), why)
    for path in GRUBENV:
        text = ctx.read(path)
        if text is not None:
            _grubenv(ctx, rule, path, text, keys, why)
    text = ctx.read("/etc/default/grub")
    if text is not None:
        ctx.edit(rule, "/etc/default/grub", _default_grub(ctx, rule, text, keys), why)


def plan(ctx: PlanContext) -> None:
    rewrite_boot_files(ctx, RULE, {"root"}, WHY)
    _device_map(ctx)


def _default_grub(ctx: PlanContext, rule: str, text: str, keys: set[str]) -> str:
    lines = text.splitlines(keepends=True)
    for n, line in enumerate(lines):
        m = re.match(r"^(\s*GRUB_CMDLINE_LINUX(?:_DEFAULT)?=)(\"|')(.*)(\2)(\s*)$", line, re.S)
        if not m:
            continue
        new = rewrite_args_string(ctx, rule, "/etc/default/grub", m.group(3), keys)
        lines[n] = m.group(1) + m.group(2) + new + m.group(4) + m.group(5)
    return "".join(lines)


def _grubenv(ctx: PlanContext, rule: str, path: str, text: str, keys: set[str], why: str) -> None:
    """grubenv is a 1024-byte block padded with '#': keep it exactly that size."""
    body = text.rstrip("#")
    lines = body.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if line.startswith("kernelopts="):
            value = line[len("kernelopts=") :].rstrip("\n")
            lines[n] = "kernelopts=" + rewrite_args_string(ctx, rule, path, value, keys) + "\n"
    new_body = "".join(lines)
    if len(new_body.encode()) > GRUBENV_SIZE:
        ctx.find(rule, "warning", "grubenv would overflow its 1024 bytes; left alone", path)
        return
    ctx.edit(rule, path, new_body + "#" * (GRUBENV_SIZE - len(new_body.encode())), why)


def _device_map(ctx: PlanContext) -> None:
    """``(hd0) /dev/sda`` → the target's name for its boot disk (grub-install reads this)."""
    model = ctx.target.preferred_boot_controller(ctx.firmware)
    disk = target_device_name(ctx, None)
    for path in DEVICE_MAPS:
        text = ctx.read(path)
        if text is None:
            continue
        new = re.sub(
            r"^(\s*\(hd0\)\s+)(/dev/\S+)", lambda m: m.group(1) + disk, text, flags=re.MULTILINE
        )
        ctx.edit(RULE, path, new, f"the boot disk is {disk} on {ctx.target.name} ({model})")
