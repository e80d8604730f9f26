"""Fix rules, one small module each; ``RULES`` is the order they run in."""

from __future__ import annotations

from vmferry.guest.linux.rules import fstab, grub, initramfs, network, resume, tools, xorg
from vmferry.guest.linux.rules.base import Change, Finding, PlanContext, Rule

RULES: dict[str, Rule] = {
    fstab.RULE: fstab.plan,
    grub.RULE: grub.plan,
    resume.RULE: resume.plan,
    initramfs.RULE: initramfs.plan,
    xorg.RULE: xorg.plan,
    network.RULE: network.plan,
    tools.RULE: tools.plan,
}

__all__ = ["RULES", "Change", "Finding", "PlanContext", "Rule"]
