"""The built-in example ``vmferry demo`` runs on a fresh machine.

It builds what the user's source describes: a Hyper-V VM folder whose disk has two
checkpoints (a base VHDX and two .avhdx differencing children), then does what neither
Hyper-V's tools on Linux nor qemu-img can: reads the chain, flattens it, converts it for
XenServer (VHD), KVM (raw) and back to a standalone Hyper-V disk (VHDX), and has qemu-img
(an independent reader) confirm that every output holds exactly what the guest saw.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import vmferry
from vmferry.ops.convert import convert

MIB = 1 << 20
SIZE = 64 * MIB
QEMU_NAME = {
    "raw": "raw",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vdi": "vdi",
}


def _fill(disk: vmferry.Chain, model: bytearray, first_mib: int, count: int, tag: int) -> None:
    """Each MiB holds its own index and the layer's tag, so any misplaced byte shows."""
    for mib in range(first_mib, first_mib + count):
        block = bytes([(mib + tag) & 0xFF]) * MIB
        disk.write(mib * MIB, block)
        model[mib * MIB : (mib + 1) * MIB] = block


def run_demo(workdir: Path, say: Callable[[str], None] = print) -> bool:
    """Build, convert and verify; True when every check passed."""
    vm = workdir / "Hyper-V" / "web01" / "Virtual Hard Disks"
    if workdir.exists():
        shutil.rmtree(workdir / "Hyper-V", ignore_errors=True)
        shutil.rmtree(workdir / "out", ignore_errors=True)
    vm.mkdir(parents=True)
    out = workdir / "out"
    out.mkdir()
    model = bytearray(SIZE)

    say(f"1. A Hyper-V VM disk with two checkpoints in {vm}")
    base, snap1, snap2 = vm / "web01.vhdx", vm / "web01_A1B2.avhdx", vm / "web01_C3D4.avhdx"
    with vmferry.create(base, "vhdx", SIZE) as d:
        _fill(d, model, 0, 24, 0)
    with vmferry.create(snap1, "vhdx", parent=base) as d:
        _fill(d, model, 8, 8, 0x40)
        d.write_zeroes(20 * MIB, 2 * MIB)
        model[20 * MIB : 22 * MIB] = bytes(2 * MIB)
    with vmferry.create(snap2, "vhdx", parent=snap1) as d:
        _fill(d, model, 12, 16, 0x80)
        d.write(5 * MIB + 700, b"written by the guest after checkpoint 2")
        model[5 * MIB + 700 : 5 * MIB + 739] = b"written by the guest after checkpoint 2"

    with vmferry.open(snap2) as chain:
        say("   chain: " + " <- ".join(p.file.path.name for p in reversed(chain.layers)))
        ok = chain.read(0, SIZE) == model
        say(
            f"   vmferry reads the guest's view through all three layers: {'ok' if ok else 'WRONG'}"
        )

    qemu = shutil.which("qemu-img")
    targets = [
        ("XenServer", "vhd", {"subformat": "dynamic"}),
        ("KVM", "raw", {}),
        ("Hyper-V, checkpoints merged", "vhdx", {}),
    ]
    say("2. Flatten the chain and convert it for other hypervisors")
    reference = out / "web01.raw"
    for label, fmt, opts in targets:
        dst = out / f"web01.{fmt}"
        result = convert(snap2, dst, options=opts)
        say(
            f"   {label:<28} {dst.name:<12} {result.bytes_written // MIB:>3} MiB written "
            f"in {result.seconds:.2f} s"
        )
    with vmferry.open(reference) as flat:
        ok = ok and flat.read(0, SIZE) == model
    if qemu is None:
        say("3. qemu-img is not installed: skipping the independent check")
        return ok
    say("3. qemu-img (an independent reader) compares every output with the raw image")
    for _, fmt, _ in targets:
        if fmt == "raw":
            continue
        dst = out / f"web01.{fmt}"
        cmp = subprocess.run(
            [qemu, "compare", "-f", QEMU_NAME[fmt], "-F", "raw", str(dst), str(reference)],
            capture_output=True,
            text=True,
        )
        same = cmp.returncode == 0
        ok = ok and same
        verdict = "identical" if same else cmp.stdout.strip()
        say(f"   qemu-img compare {dst.name} web01.raw: {verdict}")
    chk = subprocess.run(
        [qemu, "check", "-f", "vhdx", str(out / "web01.vhdx")], capture_output=True, text=True
    )
    ok = ok and chk.returncode == 0
    say(f"   qemu-img check web01.vhdx: {'clean' if chk.returncode == 0 else chk.stdout.strip()}")
    say("demo " + ("passed" if ok else "FAILED") + f"; files are in {workdir}")
    return ok
