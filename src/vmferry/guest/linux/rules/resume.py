"""Hibernation resume device: ``resume=/dev/sdaN`` → ``resume=UUID=...``.

A wrong resume device is not harmless: initramfs-tools waits for it (the "Gave up waiting for
suspend/resume device" pause) and dracut may drop to a shell.  Covers the kernel command line in
every boot config, initramfs-tools' ``conf.d/resume`` and uswsusp's ``resume device``.
"""

from __future__ import annotations

import re

from vmferry.guest.linux.rules.base import PlanContext
from vmferry.guest.linux.rules.common import stable_name
from vmferry.guest.linux.rules.grub import rewrite_boot_files

RULE = "resume"
WHY = "the resume (swap) device name changes with the disk controller"

_FILES = (
    ("/etc/initramfs-tools/conf.d/resume", re.compile(r"^(\s*RESUME\s*=\s*[\"']?)([^\s\"']+)")),
    ("/etc/uswsusp.conf", re.compile(r"^(\s*resume device\s*=\s*)(\S+)")),
)


def plan(ctx: PlanContext) -> None:
    rewrite_boot_files(ctx, RULE, {"resume"}, WHY)
    for path, pattern in _FILES:
        text = ctx.read(path)
        if text is None:
            continue
        lines = text.splitlines(keepends=True)
        for n, line in enumerate(lines):
            m = pattern.match(line)
            if not m:
                continue
            new = stable_name(ctx, RULE, m.group(2), path)
            if new is not None:
                lines[n] = line[: m.start(2)] + new + line[m.end(2) :]
        ctx.edit(RULE, path, "".join(lines), WHY)
