"""Interrupted migrations: SIGKILL mid-disk leaves nothing that looks complete; --resume finishes.

The migration runs as a real subprocess (``python -m vmferry migrate``) and is killed with
SIGKILL, which no cleanup handler sees.  ``VMFERRY_TEST_SLOW_CHUNK`` (inert unless set) makes it
sleep after each 8 MiB chunk so the kill lands mid-disk on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import qemu_img
from tests.migrate.conftest import MIB, libvirt_xml, raw_disk, tree_digest
from vmferry.migrate import migrate
from vmferry.migrate.state import STATE_NAME


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry", "migrate", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def two_disk_vm(guest: Path) -> Path:
    src = guest.parent / "src"
    src.mkdir()
    boot = guest.rename(src / "guest.raw")
    data = raw_disk(src / "data.raw", 64 * MIB, [(0, 40 * MIB)])
    xml = src / "two.xml"
    xml.write_text(libvirt_xml("two", [(boot, "raw", "sata"), (data, "raw", "sata")]))
    return xml


def wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the migration to get there")


def state_of(out: Path) -> dict:
    try:
        return json.loads((out / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}


def test_sigkill_mid_disk_then_resume(guest: Path, tmp_path: Path) -> None:
    xml = two_disk_vm(guest)
    src_before = tree_digest(xml.parent)
    out = tmp_path / "out"
    env = dict(os.environ, VMFERRY_TEST_SLOW_CHUNK="0.4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmferry", "migrate", str(xml), "--to", "kvm", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for(lambda: (state_of(out).get("disks") or {}).get("1", {}).get("status") == "running")
        wait_for(lambda: any(p.name.startswith(".data.qcow2.vmferry-") for p in out.iterdir()))
        time.sleep(0.5)  # well inside the second disk: 5 chunks of 0.4 s
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in out.iterdir())
    # nothing looks complete: no config, no second disk under its name; the first disk is done
    assert "two.xml" not in names and "data.qcow2" not in names
    assert "guest.qcow2" in names
    assert any(n.startswith(".data.qcow2.vmferry-") for n in names)
    state = state_of(out)
    assert state["status"] == "running" and state["disks"]["0"]["status"] == "done"
    assert tree_digest(xml.parent) == src_before  # the source is unchanged
    first = (out / "guest.qcow2").stat()

    again = run_cli(str(xml), "--to", "kvm", "-o", str(out))
    assert again.returncode == 64 and "--resume" in again.stderr

    done = run_cli(str(xml), "--to", "kvm", "-o", str(out), "--resume", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "completed"
    assert doc["resume"]["resumed"] is True and doc["resume"]["disks_skipped"] == [0]
    assert [d["status"] for d in doc["disks"]] == ["resumed", "done"]
    assert any(n.startswith(".data.qcow2.vmferry-") for n in doc["resume"]["removed_leftovers"])
    now = (out / "guest.qcow2").stat()
    assert (now.st_ino, now.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not redone
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [STATE_NAME, "guest.qcow2", "data.qcow2", "two.xml"]
    )
    data = xml.parent / "data.raw"
    assert qemu_img("compare", "-f", "raw", str(data), str(out / "data.qcow2")).returncode == 0
    assert tree_digest(xml.parent) == src_before


def test_resume_refuses_a_changed_source(guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    migrate(guest, "kvm", out)
    (out / "guest.xml").unlink()  # as if killed before the config was written
    state = state_of(out)
    state["status"] = "running"
    (out / STATE_NAME).write_text(json.dumps(state))
    with open(guest, "r+b") as f:  # the source VM ran again in between
        f.seek(60 * MIB)
        f.write(b"changed")
    from vmferry.errors import UsageError

    with pytest.raises(UsageError, match="source changed"):
        migrate(guest, "kvm", out, resume=True)


def test_resume_of_a_finished_migration_redoes_nothing(guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    migrate(guest, "kvm", out)
    stamp = (out / "guest.qcow2").stat().st_mtime_ns
    result = migrate(guest, "kvm", out, resume=True)
    assert result.status == "completed"
    assert (out / "guest.qcow2").stat().st_mtime_ns == stamp
    assert result.config_path == out / "guest.xml"


def test_resume_refuses_another_target(guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    migrate(guest, "kvm", out)
    from vmferry.errors import UsageError

    with pytest.raises(UsageError, match="kvm"):
        migrate(guest, "virtualbox", out, resume=True)
