"""fstab and crypttab: controller-bound device names → ``UUID=`` of the filesystem there.

Why UUID and not the target's name: the same image may boot on several targets, and the
filesystem's UUID is read from its own superblock, so it is right whatever the disk is called.
"""

from __future__ import annotations

from vmferry.guest.linux.parse import parse_crypttab, parse_fstab
from vmferry.guest.linux.rules.base import PlanContext
from vmferry.guest.linux.rules.common import stable_name

RULE = "fstab"


def plan(ctx: PlanContext) -> None:
    for path, parser, span_of, spec_of in (
        ("/etc/fstab", parse_fstab, lambda e: e.spec_span, lambda e: e.spec),
        ("/etc/crypttab", parse_crypttab, lambda e: e.device_span, lambda e: e.device),
    ):
        text = ctx.read(path)
        if text is None:
            continue
        lines = text.splitlines(keepends=True)
        for entry in parser(text):
            new = stable_name(ctx, RULE, spec_of(entry), path)
            if new is None:
                continue
            a, b = span_of(entry)
            line = lines[entry.line]
            lines[entry.line] = line[:a] + new + line[b:]
        ctx.edit(RULE, path, "".join(lines), "device names change with the disk controller")
