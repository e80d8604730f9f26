"""Device-reference rewriting shared by the rules: ``/dev/sda1`` → ``UUID=...``."""

from __future__ import annotations

from vmferry.guest.linux.devices import classify
from vmferry.guest.linux.parse import BOOT_LINE, parse_cmdline
from vmferry.guest.linux.rules.base import PlanContext
from vmferry.vm.targets import CONTROLLERS

#: Namings that survive a controller change and are left alone.
STABLE = frozenset({"uuid", "label", "partuuid", "partlabel", "lvm", "mapper"})


def stable_name(ctx: PlanContext, rule: str, spec: str, path: str) -> str | None:
    """The stable replacement for a controller-bound ``spec`` (None: keep it; finding logged)."""
    kind = classify(spec)
    if kind in STABLE or kind in ("virtual", "network"):
        return None
    if kind in ("by-id", "by-path"):
        ctx.find(
            rule,
            "warning",
            f"{spec} names the disk by hardware id/path, which the target "
            "changes; it is left alone",
            path,
        )
        return None
    if kind != "path":
        return None
    target = ctx.guest.resolve_device(spec)
    if target is None:
        ctx.find(rule, "warning", f"{spec} is not on this disk image; left alone", path)
        return None
    if ctx.naming == "target":
        return target_device_name(ctx, target.partition.index if target.partition else None)
    if ctx.naming == "label" and target.label:
        return f"LABEL={target.label}"
    if not target.uuid:
        ctx.find(rule, "warning", f"{spec} holds no filesystem with a UUID; left alone", path)
        return None
    return f"UUID={target.uuid}"


def target_device_name(ctx: PlanContext, partition: int | None) -> str:
    """What the target's preferred boot controller calls this partition of the first disk."""
    model = ctx.target.preferred_boot_controller(ctx.firmware)
    disk = CONTROLLERS[model].linux_device(0)
    if partition is None:
        return disk
    return f"{disk}p{partition}" if disk[-1].isdigit() else f"{disk}{partition}"


def rewrite_cmdline(ctx: PlanContext, rule: str, path: str, text: str, keys: set[str]) -> str:
    """Rewrite ``key=/dev/...`` words of kernel command lines found in a boot config."""
    lines = text.splitlines(keepends=True)
    for n, line in enumerate(lines):
        m = BOOT_LINE.match(line.rstrip("\n"))
        if not m:
            continue
        rest_start = m.start("rest")
        words = parse_cmdline(line[rest_start:].rstrip("\n"), rest_start)
        lines[n] = _replace_args(ctx, rule, path, line, words, keys)
    return "".join(lines)


def rewrite_args_string(ctx: PlanContext, rule: str, path: str, args: str, keys: set[str]) -> str:
    """The same for a bare command-line string (a shell variable's value)."""
    return _replace_args(ctx, rule, path, args, parse_cmdline(args), keys)


def _replace_args(ctx, rule, path, line, words, keys) -> str:  # type: ignore[no-untyped-def]
    out = line
    for word in sorted(words, key=lambda w: -w.span[0]):  # right to left keeps spans valid
        if word.key not in keys or not word.value:
            continue
        value = word.value.strip("\"'")
        new = stable_name(ctx, rule, value, path)
        if new is not None:
            a, b = word.span
            out = out[:a] + new + out[b:]
    return out
