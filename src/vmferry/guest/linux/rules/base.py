"""What a fix rule returns, and the context it plans in.

A rule reads the guest through :class:`PlanContext`, which shows it the files as earlier rules
have already planned them (two rules may edit one file: ``/etc/default/grub`` holds both
``root=`` and ``resume=``).  A rule returns :class:`Change` records (whole-file before/after
texts, so ``diff()`` is exact; or, for binary files, bytes appended with a one-line summary)
and :class:`Finding` records for what it will not change safely.
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
    with content ``after``), ``symlink`` (a new symlink whose target is ``after``) or
    ``append`` (binary: ``data`` appended to a file of ``old_size`` bytes; ``before`` and
    ``after`` stay empty and ``summary`` says what the bytes are)."""

    rule: str
    path: str
    before: str
    after: str
    why: str
    kind: str = "edit"
    mode: int = 0o644
    data: bytes = field(default=b"", repr=False)
    old_size: int = 0
    summary: str = ""

    def diff(self) -> str:
        """A unified diff of this change (``a/`` and ``b/`` prefixes like git); an append is
        a summary line: sizes before and after, and what was added."""
        if self.kind == "symlink":
            return f"--- /dev/null\n+++ b{self.path}\n@@ symlink @@\n+-> {self.after}\n"
        if self.kind == "append":
            new = self.old_size + len(self.data)
            return (
                f"--- a{self.path}\n+++ b{self.path}\n"
                f"@@ binary: {self.old_size} -> {new} bytes (+{len(self.data)} appended) @@\n"
                f"+{self.summary}\n"
            )
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile="/dev/null" if self.kind == "create" else f"a{self.path}",
                tofile=f"b{self.path}",
            )
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "rule": self.rule,
            "path": self.path,
            "kind": self.kind,
            "why": self.why,
            "diff": self.diff(),
        }
        if self.kind == "append":
            out.update(
                summary=self.summary,
                size_before=self.old_size,
                size_after=self.old_size + len(self.data),
            )
        return out


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
    #: the boot disk controller the VM will get (None: the target's preferred one); the
    #: initramfs rule adds this controller's drivers
    controller: str | None = None
    changes: list[Change] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    _pending: dict[str, str] = field(default_factory=dict)

    @property
    def boot_controller(self) -> str:
        """The controller the guest's root disk will sit on."""
        return self.controller or self.target.preferred_boot_controller(self.firmware)

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

    def append(
        self, rule: str, path: str, data: bytes, old_size: int, summary: str, why: str
    ) -> None:
        """Plan appending ``data`` to the existing binary file ``path`` (``old_size`` bytes now).

        Binary files are not text: rules never read them back through :meth:`read`.
        """
        if not data or any(c.path == path for c in self.changes):
            return
        self.changes.append(
            Change(rule, path, "", "", why, "append", data=data, old_size=old_size,
                   summary=summary)
        )  # fmt: skip

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
