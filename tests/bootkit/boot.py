"""Boot a disk image under qemu (software emulation) on a chosen controller and watch its serial.

Why this shape: a boot test must answer one question, "did the guest reach userspace from this
disk, on this controller?", quickly and without leaving qemu processes behind.  The guests built
by :mod:`tests.bootkit.guest` print a marker line on ttyS0 once multi-user.target is reached;
the serial console goes to a file that is polled, and known early failures (initramfs "ALERT!",
kernel panic, GRUB rescue, no bootable device) end the boot at once instead of at the timeout.
``-snapshot`` keeps every boot from writing to the image, and ``-accel tcg`` is used always:
KVM does not work on the test machines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bootkit.guest import MARKER

QEMU = "qemu-system-x86_64"

#: controller name -> (machine type, -device arguments; {drive} is the drive id)
CONTROLLERS: dict[str, tuple[str, list[str]]] = {
    "ide": ("pc", ["ide-hd,drive={drive},bus=ide.0,bootindex=1"]),
    "sata": ("q35", ["ide-hd,drive={drive},bus=ide.0,bootindex=1"]),  # q35's built-in AHCI
    "virtio-blk": ("pc", ["virtio-blk-pci,drive={drive},bootindex=1"]),
    "virtio-scsi": (
        "pc",
        ["virtio-scsi-pci,id=hba0", "scsi-hd,drive={drive},bus=hba0.0,bootindex=1"],
    ),
    "pvscsi": ("pc", ["pvscsi,id=hba0", "scsi-hd,drive={drive},bus=hba0.0,bootindex=1"]),
    "lsi": ("pc", ["lsi53c895a,id=hba0", "scsi-hd,drive={drive},bus=hba0.0,bootindex=1"]),
    "megasas": ("pc", ["megasas,id=hba0", "scsi-hd,drive={drive},bus=hba0.0,bootindex=1"]),
    "nvme": ("pc", ["nvme,drive={drive},serial=vmferry0,bootindex=1"]),
}
#: qemu block driver names for the formats a boot may be asked for
FORMATS = {"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"}
FORMAT_ALIASES = {"vhd": "vpc"}

#: lines that mean the boot cannot succeed any more
FAILURES = re.compile(
    r"ALERT!|Kernel panic|Gave up waiting for root|[Dd]ropping to a shell|\(initramfs\)"
    r"|grub rescue>|No bootable device|Boot failed: could not read the boot disk"
    r"|You are in emergency mode|Failed to mount /sysroot"
    # dracut: its initqueue gives up waiting for the root device after 2/3 of rd.retry (120 s
    # of the default 180) and says so before it drops to the emergency shell at the end
    r"|dracut-initqueue.*timeout|Could not boot\.|Entering emergency mode"
    # a systemd initrd (dracut's) waits for the root device with no limit unless rd.timeout
    # is given (a VMware-built guest has none): still waiting after 2 minutes, longer than
    # systemd's own 90 s default for devices, the device is not coming
    r"|Job dev-\S+\.device/start running \((?:[2-9]|\d\d+)min"
)
#: the failure output is complete once the initramfs shell prompt (or a panic's end) shows
FAILURE_DONE = re.compile(
    r"\(initramfs\)|end Kernel panic|grub rescue>|emergency mode|Entering emergency mode"
)
#: terminal escapes (colours, cursor moves) in systemd's console output
ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[A-Z])")
#: after the first failure line, how long to keep reading for the rest of the message
FAILURE_GRACE = 15.0


@dataclass
class BootResult:
    """What one boot showed.  ``booted`` is True only when the marker line was printed."""

    image: str
    fmt: str
    controller: str
    booted: bool
    outcome: str  # "marker", "failure", "timeout" or "exited"
    elapsed: float
    log: str
    log_path: str
    failure: str | None = None
    marker_line: str | None = None
    returncode: int | None = None
    command: list[str] = field(default_factory=list)

    def tail(self, lines: int = 40) -> str:
        """The end of the serial log, for assertion messages."""
        return "\n".join(self.log.splitlines()[-lines:])

    def __str__(self) -> str:
        what = self.marker_line or self.failure or self.outcome
        return (
            f"{Path(self.image).name} ({self.fmt}) on {self.controller}: {self.outcome} "
            f"after {self.elapsed:.1f} s: {what}\n--- serial log tail ({self.log_path}) ---\n"
            f"{self.tail()}"
        )


def qemu_command(
    image: str | os.PathLike[str],
    fmt: str,
    controller: str,
    serial_path: str | os.PathLike[str],
    *,
    firmware: str = "bios",
    memory_mib: int = 1024,
    snapshot: bool = True,
) -> list[str]:
    """The qemu command line for one boot (separate so tests and docs can show it)."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {sorted(FORMATS)} or vhd)")
    if controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {controller!r} (one of {sorted(CONTROLLERS)})")
    machine, devices = CONTROLLERS[controller]
    path = os.fspath(image)
    if "," in path:
        raise ValueError(f"qemu -drive cannot take a path with a comma: {path}")
    cmd = [
        QEMU, "-accel", "tcg", "-M", machine, "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-nographic", "-monitor", "none",
        "-serial", f"file:{os.fspath(serial_path)}", "-nic", "none", "-no-reboot",
        *(["-snapshot"] if snapshot else []),
        "-drive", f"file={path},format={fmt},if=none,id=d0,cache=unsafe",
    ]  # fmt: skip
    for dev in devices:
        cmd += ["-device", dev.format(drive="d0")]
    if firmware == "uefi":
        for candidate in ("/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd"):
            if Path(candidate).exists():
                cmd += ["-bios", candidate]
                break
        else:
            raise FileNotFoundError("UEFI boot needs OVMF (apt-get install ovmf)")
    elif firmware != "bios":
        raise ValueError(f"firmware must be bios or uefi, not {firmware!r}")
    return cmd


def boot(
    image_path: str | os.PathLike[str],
    fmt: str,
    controller: str,
    *,
    timeout: float = 480,
    firmware: str = "bios",
    log_path: str | os.PathLike[str] | None = None,
    marker: str = MARKER,
    snapshot: bool = True,
    wait_exit: float = 0,
) -> BootResult:
    """Boot ``image_path`` (qemu format ``fmt``) on ``controller`` until marker, failure or
    ``timeout`` seconds; qemu is always killed before this returns.

    ``log_path``: where the serial console is written (default: next to the image, named after
    the controller), kept so a failed test can be diagnosed from the file.  ``snapshot=False``
    lets the guest write to the image (the test builder's own first boot; tests never do);
    ``wait_exit``: after the marker, up to that many seconds for the guest to power off by
    itself, so what it wrote is on disk in full before qemu is killed.
    """
    if shutil.which(QEMU) is None:
        raise FileNotFoundError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    image = Path(image_path)
    if not image.exists():
        raise FileNotFoundError(image)
    if log_path is None:
        log_path = image.with_name(f"{image.name}.{controller}.serial.log")
    log_file = Path(log_path)
    log_file.write_bytes(b"")
    cmd = qemu_command(image, fmt, controller, log_file, firmware=firmware, snapshot=snapshot)
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: killed as a whole below
    )
    outcome, failure, marker_line = "timeout", None, None
    failure_deadline: float | None = None
    try:
        while True:
            time.sleep(0.25)
            text = log_file.read_bytes().decode("utf-8", "replace")
            now = time.monotonic()
            # a whole line only: the file may end in the middle of the marker's line
            m = re.search(rf"^.*{re.escape(marker)}.*\n", text, re.MULTILINE)
            if m and failure is None:
                outcome, marker_line = "marker", m.group(0).strip()
                exit_deadline = now + wait_exit
                while proc.poll() is None and time.monotonic() < exit_deadline:
                    time.sleep(0.25)
                break
            f = FAILURES.search(text)
            if f and failure is None:
                # systemd redraws its status line with \r: a line ends at either
                line_start = max(text.rfind("\n", 0, f.start()), text.rfind("\r", 0, f.start())) + 1
                ends = [i for i in (text.find("\n", f.end()), text.find("\r", f.end())) if i >= 0]
                failure = ANSI.sub("", text[line_start : min(ends) if ends else None]).strip()
                outcome = "failure"
                failure_deadline = now + FAILURE_GRACE
            if failure is not None and (
                FAILURE_DONE.search(text) or (failure_deadline and now > failure_deadline)
            ):
                break
            if proc.poll() is not None:
                if failure is None:
                    outcome = "exited"
                break
            if now - started > timeout:
                break
    finally:
        elapsed = time.monotonic() - started
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            proc.kill()
            _, err = proc.communicate()
    text = log_file.read_bytes().decode("utf-8", "replace")
    if outcome == "exited" and err:
        text += "\n--- qemu stderr ---\n" + err.decode("utf-8", "replace")
    return BootResult(
        image=str(image),
        fmt=fmt,
        controller=controller,
        booted=outcome == "marker",
        outcome=outcome,
        elapsed=round(elapsed, 1),
        log=text,
        log_path=str(log_file),
        failure=failure,
        marker_line=marker_line,
        returncode=proc.returncode,
        command=cmd,
    )
