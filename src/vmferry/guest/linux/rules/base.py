"""What a fix rule returns, and the context it plans in.

A rule reads the guest through :class:`PlanContext`, which shows it the files as earlier rules
have already planned them (two rules may edit one file: ``/etc/default/grub`` holds both
``root=`` and ``resume=``).  A rule returns :class:`Change` records (whole-file before/after
texts, so ``diff()`` is exact) and :class:`Finding` records for what it will not change safely.
Rules never write: :func:`vmferry.guest.linux.fix.apply_fixes` does, all or nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from vmferry.errors import GuestError
from vmferry.guest.guest import Guest
from vmferry.vm.targets import TargetProfile


@dataclass(frozen=True)
class Change:
    """One planned file operation.  ``kind``: ``edit`` (before → after), ``create`` (a new file
    with content ``after``) or ``symlink`` (a new symlink whose target is ``after``)."""

    rule: str
    path: str
    before: str
    after: str
    why: str
    kind: str = "edit"
    mode: int = 0o644

    def diff(self) -> str:
        """A unified diff of this change (``a/`` and ``b/`` prefixes like git)."""
        if self.kind == "symlink":
            return f"--- /dev/null\n+++ b{self.path}\n@@ symlink @@\n+-> {self.after}\n"
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile="/dev/null" if self.kind == "create" else f"a{self.path}",
                tofile=f"b{self.path}",
            )
        )

    def to_json(self) -> dict[str, str]:
        return {
            "rule": self.rule,
            "path": self.path,
            "kind": self.kind,
            "why": self.why,
            "diff": self.diff(),
        }


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # error (guest will not boot as is) | warning | info
    message: str
    path: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return dict(self.__dict__)


@dataclass
class PlanContext:
    guest: Guest
    target: TargetProfile
    firmware: str  # bios | uefi
    naming: str = "uuid"  # uuid | label (LABEL= where there is one) | target (its /dev names)
    changes: list[Change] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    _pending: dict[str, str] = field(default_factory=dict)

    def read(self, path: str) -> str | None:
        """The file as planned so far (None when the guest has no such file)."""
        if path in self._pending:
            return self._pending[path]
        try:
            return self.guest.read_text(path)
        except GuestError:
            return None

    def edit(self, rule: str, path: str, after: str, why: str) -> None:
        before = self.read(path)
        if before is None or before == after:
            return
        self.changes.append(Change(rule, path, before, after, why))
        self._pending[path] = after

    def create(self, rule: str, path: str, content: str, why: str, mode: int = 0o644) -> None:
        """Plan a new regular file (the path must not exist in the guest)."""
        if self.read(path) is not None or self.guest.exists(path):
            return
        self.changes.append(Change(rule, path, "", content, why, "create", mode))
        self._pending[path] = content

    def symlink(self, rule: str, path: str, target: str, why: str) -> None:
        """Plan a new symlink (nothing happens when ``path`` exists, even dangling)."""
        if path in self._pending or self.lexists(path):
            return
        self.changes.append(Change(rule, path, "", target, why, "symlink"))
        self._pending[path] = target

    def lexists(self, path: str) -> bool:
        """True when ``path`` exists as anything, a dangling symlink included."""
        return path in self._pending or self.guest.lexists(path)

    def find(self, rule: str, severity: str, message: str, path: str | None = None) -> None:
        self.findings.append(Finding(rule, severity, message, path))

    @property
    def planned(self) -> dict[str, str]:
        """Final content of every file some rule changed."""
        return dict(self._pending)


Rule = Callable[[PlanContext], None]
