"""``vmferry migrate`` on the command line: exit codes, --json document, --report, --dry-run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from click.testing import CliRunner

from vmferry.cli.main import cli
from vmferry.migrate.findings import SEVERITIES

TOP_KEYS = {
    "schema", "status", "dry_run", "source", "target", "outdir", "before", "after", "guest",
    "summary", "findings", "choices", "not_carried", "disks", "space", "config_path", "outputs",
    "timings", "resume", "notes", "error", "started_at", "finished_at",
}  # fmt: skip
DISK_KEYS = {
    "index", "boot", "status", "source", "virtual_size", "data_bytes", "output", "fitted",
    "bytes_read", "bytes_written", "seconds", "throughput_bytes_per_s", "digest",
    "digest_algorithm", "verify", "guest_changes", "guest_after",
}  # fmt: skip


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["migrate", *args], catch_exceptions=False)


def test_json_document_of_a_completed_migration(guest: Path, tmp_path: Path) -> None:
    res = run(str(guest), "--to", "kvm", "-o", str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == "vmferry-migrate/1" and doc["status"] == "completed"
    assert doc["target"]["name"] == "kvm" and doc["target"]["format"] == "qcow2"
    assert set(doc["summary"]) == set(SEVERITIES)
    for f in doc["findings"]:
        assert f["severity"] in SEVERITIES and f["code"] and f["message"] and f["action"]
        assert all(set(e) == {"path", "line", "text"} for e in f["evidence"])
    (disk,) = doc["disks"]
    assert set(disk) == DISK_KEYS
    assert disk["verify"]["ok"] and disk["verify"]["check"]["clean"]
    assert disk["output"]["path"] in doc["outputs"] and doc["config_path"] in doc["outputs"]
    assert all({"rule", "path", "kind", "why", "diff"} <= set(c) for c in disk["guest_changes"])
    assert doc["before"]["disks"][0]["controller_model"] is None  # a bare image
    assert doc["after"]["disks"][0]["controller_model"] == "virtio-blk"
    fstab = next(c for c in disk["guest_changes"] if c["path"] == "/etc/fstab")
    assert "-/dev/sda1" in fstab["diff"] and "+UUID=" in fstab["diff"]
    assert doc["guest"]["os"]["distro"] == "debian"


def test_blocked_exits_9_and_writes_nothing(guest: Path, tmp_path: Path) -> None:
    res = run(str(guest), "--to", "hyperv-gen2", "-o", str(tmp_path / "out"))
    assert res.exit_code == 9
    assert "blocker" in res.output and "nothing was written" in res.output
    assert not (tmp_path / "out").exists()


def test_dry_run_exits_0_and_writes_nothing(guest: Path, tmp_path: Path) -> None:
    res = run(str(guest), "--to", "kvm", "-o", str(tmp_path / "out"), "--dry-run", "--json")
    assert res.exit_code == 0
    assert json.loads(res.output)["status"] == "planned"
    assert not (tmp_path / "out").exists()


def test_unknown_format_for_the_target_is_a_usage_error(guest: Path, tmp_path: Path) -> None:
    res = run(str(guest), "--to", "hyperv", "-o", str(tmp_path / "o"), "--format", "qcow2")
    assert res.exit_code == 64
    assert "vhdx" in res.output


def test_report_option(guest: Path, tmp_path: Path) -> None:
    html = tmp_path / "r.html"
    res = run(str(guest), "--to", "kvm", "-o", str(tmp_path / "out"), "--report", str(html))
    if importlib.util.find_spec("vmferry.migrate.report") is None:
        assert res.exit_code == 64 and "report" in res.output
        assert not (tmp_path / "out").exists()  # refused before anything was written
    else:
        assert res.exit_code == 0 and html.is_file()


def test_report_path_is_checked_before_any_disk_is_written(tmp_path: Path) -> None:
    """A --report in a missing directory is a usage error up front, with OUTDIR untouched."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        ["migrate", str(image), "--to", "kvm", "-o", str(out), "--report",
         str(tmp_path / "missing" / "r.html")],
    )  # fmt: skip
    assert res.exit_code == 64, res.output
    assert "directory does not exist" in res.output
    assert not out.exists()
