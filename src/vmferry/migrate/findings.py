"""Preflight findings: what will stop, change or surprise a migration, with the evidence.

A finding is what a careful administrator would write in a migration checklist: how bad it is,
what vmferry saw (file and line in the guest, or the file on the host), and what vmferry will do
about it.  Severities, most serious first:

* ``blocker``: the VM would not boot (or vmferry cannot do the job); nothing is written.
* ``will-fix``: would break the boot, and vmferry repairs it during the migration.
* ``warning``: may need a human after the migration.
* ``info``: worth knowing; no action needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("blocker", "will-fix", "warning", "info")


@dataclass(frozen=True)
class Evidence:
    """Where a finding comes from: a guest path (``guest:/etc/fstab``) or a host file."""

    path: str
    line: int | None = None
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "text": self.text}


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    message: str
    action: str
    evidence: tuple[Evidence, ...] = field(default_factory=tuple)
    disk: int | None = None  # index into the VM's disks, when the finding is about one

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:  # a programming error, not user input
            raise ValueError(f"unknown severity {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "action": self.action,
            "evidence": [e.to_json() for e in self.evidence],
            "disk": self.disk,
        }


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Most serious first; stable within a severity (the order they were found in)."""
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def summary(findings: list[Finding]) -> dict[str, int]:
    return {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
