"""What a migration did, as one JSON document (``--json``; the HTML report renders from it).

The document is described in docs/migrate.md; its top-level ``schema`` names its version.
:class:`MigrationResult` keeps the same content as Python objects for callers of the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.migrate.findings import Finding, summary

SCHEMA = "vmferry-migrate/1"
STATUSES = ("planned", "blocked", "completed", "failed")


@dataclass
class DiskResult:
    index: int
    boot: bool
    source: dict[str, Any]  # label, chain (top first: path, format, sizes)
    virtual_size: int
    data_bytes: int  # bytes the source chain holds as data (what is read)
    output: dict[str, Any]  # path, name, format, driver, options, virtual_size, sizes
    fitted: dict[str, Any] | None  # the disk as the target config describes it
    status: str = "planned"  # planned | done | resumed | not-carried
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    digest: str | None = None
    verify: dict[str, Any] | None = None
    guest_changes: list[dict[str, Any]] = field(default_factory=list)
    guest_after: dict[str, Any] | None = None  # the rules re-run on the output (boot disk)

    @property
    def throughput(self) -> float | None:
        """Bytes of virtual content read per second (None when nothing was streamed)."""
        return round(self.bytes_read / self.seconds, 1) if self.seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "boot": self.boot,
            "status": self.status,
            "source": self.source,
            "virtual_size": self.virtual_size,
            "data_bytes": self.data_bytes,
            "output": self.output,
            "fitted": self.fitted,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "throughput_bytes_per_s": self.throughput,
            "digest": self.digest,
            "digest_algorithm": "sha256-1m-tree",
            "verify": self.verify,
            "guest_changes": self.guest_changes,
            "guest_after": self.guest_after,
        }


@dataclass
class MigrationResult:
    status: str
    dry_run: bool
    source: dict[str, Any]
    target: dict[str, Any]
    outdir: Path
    before: dict[str, Any]
    after: dict[str, Any] | None
    guest: dict[str, Any] | None
    findings: list[Finding]
    disks: list[DiskResult]
    choices: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    space: dict[str, Any] = field(default_factory=dict)
    config_path: Path | None = None
    outputs: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    resume: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    started_at: str | None = None  # ISO 8601 UTC
    finished_at: str | None = None

    @property
    def blockers(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "blocker"]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "status": self.status,
            "dry_run": self.dry_run,
            "source": self.source,
            "target": self.target,
            "outdir": str(self.outdir),
            "before": self.before,
            "after": self.after,
            "guest": self.guest,
            "summary": summary(self.findings),
            "findings": [f.to_json() for f in self.findings],
            "choices": list(self.choices),
            "not_carried": list(self.not_carried),
            "disks": [d.to_json() for d in self.disks],
            "space": dict(self.space),
            "config_path": str(self.config_path) if self.config_path else None,
            "outputs": [str(p) for p in self.outputs],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "resume": dict(self.resume),
            "notes": list(self.notes),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
        }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_text(doc: dict[str, Any]) -> str:
    """The terminal summary: the same content as the JSON, for a human."""
    lines: list[str] = []
    src, tgt = doc["source"], doc["target"]
    lines.append(
        f"{src.get('name')} ({src.get('kind')}) → {tgt.get('name')} "
        f"[{tgt.get('format')}] in {doc['outdir']}"
    )
    s = doc["summary"]
    lines.append(
        f"preflight: {s['blocker']} blocker(s), {s['will-fix']} to fix, "
        f"{s['warning']} warning(s), {s['info']} note(s)"
    )
    for f in doc["findings"]:
        if f["severity"] == "info" and f["code"] in ("space", "target-choice", "not-carried"):
            continue
        lines.append(f"  {f['severity']:>8}: {f['message']}")
        for e in f["evidence"][:3]:
            where = e["path"] + (f":{e['line']}" if e.get("line") else "")
            lines.append(f"            {where}" + (f"  {e['text']}" if e.get("text") else ""))
        if f["severity"] != "info":
            lines.append(f"            → {f['action']}")
    for d in doc["disks"]:
        out = d["output"]
        line = f"disk {d['index']}{' (boot)' if d['boot'] else ''}: {d['source']['label']} → "
        line += f"{out['name']} ({out['format']}, {_size(d['virtual_size'])})"
        if d["status"] in ("done", "resumed"):
            tp = d.get("throughput_bytes_per_s")
            line += f": {d['status']}, {_size(d['bytes_written'])} written"
            if tp:
                line += f" in {d['seconds']:.1f} s ({_size(tp)}/s)"
            v = d.get("verify") or {}
            if v:
                line += ", verified" if v.get("ok") else ", VERIFY FAILED"
        lines.append(line)
    status = doc["status"]
    if status == "completed":
        lines.append(f"completed: {doc['config_path']}")
    elif status == "blocked":
        lines.append("blocked: nothing was written (exit 9)")
    elif status == "planned":
        lines.append("dry run: nothing was written")
    return "\n".join(lines)
