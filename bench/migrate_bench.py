#!/usr/bin/env python3
"""A whole VM, VMware → KVM: ``vmferry migrate`` against ``virt-v2v`` and a bare ``qemu-img``.

One run times, on the same VMware-packaged Debian guest (tests/bootkit's VMware guest in the
folder tests/migrate/packaging.py builds: .vmx on pvscsi, ESXi-style flat base + snapshot delta):

* ``vmferry migrate VM.vmx --to kvm -o DIR``: chain flattened to qcow2, guest repaired
  (fstab/GRUB names, virtio drivers added to the initramfs, VMware tools masked), verified,
  libvirt XML written; the output is synced when the command returns;
* ``virt-v2v -i vmx VM.vmx -o local -os DIR -of qcow2``: the reference tool for the same job.
  It boots a libguestfs appliance; KVM is not available here, so it runs under TCG
  (``LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg``);
* ``qemu-img convert -O qcow2`` of the same disk chain, plus ``sync`` of its output: copying the
  bytes and nothing else, the floor for any tool that converts.

Targets (issue 7): vmferry ≥ 10× faster than virt-v2v end to end, and within 1.5× of the plain
qemu-img conversion (qemu-img + fsync, since vmferry's output is durable when it returns; bare
qemu-img is printed beside it).  Every time is a whole process, start-up included.  vmferry and
qemu-img run back to back in each of --repeat rounds (taking turns going first), each run after
a settle pause (--settle: outputs deleted, then a sleep, so freed memory is in the same state
for every run; see benchenv.py); the ratios are medians over rounds of vmferry ÷ qemu-img in
the same round.  Each row also gives the median CPU seconds (user + system), which load
inflates far less than wall time.

vmferry runs as an installed tool does: its console script directly (not through a pyenv shim,
whose bash start costs ~0.5 s), with byte-compiled modules (``PYTHONPYCACHEPREFIX`` in the work
directory even when the environment sets ``PYTHONDONTWRITEBYTECODE``; a first untimed run
compiles them), as ``pip install`` leaves them.

Not test dependencies, bench only (Debian packages): ``virt-v2v``, ``nbdkit``, ``libnbd-bin``
(virt-v2v 2.x runs its input and output through nbdkit; it pulls libguestfs and the appliance
kernel in).  Without them the virt-v2v row is skipped (``--no-v2v`` skips it on purpose: it
takes minutes).  Building the guest needs what tests/bootkit needs (root, debootstrap, loop
devices) unless the image is already cached.

    python3 bench/migrate_bench.py --repeat 3 --markdown
    python3 bench/migrate_bench.py --repeat 5 --no-v2v --markdown   # the ratio to qemu-img only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchenv import (
    Contender,
    Machine,
    Pair,
    Sample,
    Table,
    add_method_args,
    best,
    command_line,
    median_cpu,
    method_line,
    run_rounds,
    run_timed,
    vmferry_env,
    vmferry_script,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

V2V_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
OURS, FLOOR, BARE, V2V = (
    "vmferry migrate",
    "qemu-img convert + sync",
    "qemu-img convert (bare)",
    "virt-v2v",
)

#: vmferry's own account of its fastest run (``--json`` timings: disks, verify, config)
PHASES: dict[str, float] = {}


def timed(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Sample:
    """One command, whole process; a failure stops the bench with its output."""
    wall, cpu, proc = run_timed(argv, env, check=False)
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        sys.exit(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    if "--json" in argv:
        phases = json.loads(proc.stdout).get("timings", {})
        if not PHASES or phases.get("total_s", 0) < PHASES.get("total_s", 0):
            PHASES.clear()
            PHASES.update(phases)
    return Sample(wall, cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_method_args(ap, rounds=3)
    ap.add_argument("--no-v2v", action="store_true", help="skip virt-v2v (minutes under TCG)")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    ap.add_argument("--markdown", action="store_true", help="print a BENCHMARKS.md-ready block")
    args = ap.parse_args()

    from tests.bootkit.guest import VMWARE_GUEST, build_image
    from tests.migrate.packaging import package, split_layers

    machine = Machine.capture(["virt-v2v", "--version"])
    guest = build_image(VMWARE_GUEST)
    work = args.keep or Path(tempfile.mkdtemp(prefix="vmferry-migrate-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "src"
        if src.exists():
            shutil.rmtree(src)
        vm = package("vmware", split_layers(guest.path, src / "layers"), src)
        data = int(
            json.loads(
                subprocess.run(
                    ["qemu-img", "info", "--output=json", "-f", "raw", str(guest.path)],
                    capture_output=True, text=True, check=True,
                ).stdout
            )["actual-size"]
        )  # fmt: skip
        env = vmferry_env(work)
        vmferry = vmferry_script()
        if shutil.which(vmferry) is None:
            sys.exit("vmferry is not installed (pip install -e .)")
        run_timed([vmferry, "migrate", "--help"], env)  # compiles the bytecode, untimed

        out_ours = work / "vmferry-kvm"
        plain = work / "plain.qcow2"
        ours = [vmferry, "migrate", str(vm.config), "--to", "kvm", "-o", str(out_ours), "--json"]
        qemu = ["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(vm.top), str(plain)]
        bare: list[Sample] = []

        def floor() -> Sample:
            """qemu-img, then ``sync`` of its output; the bare time of the same run is kept."""
            run = timed(qemu)
            bare.append(run)
            return Sample(run.wall + timed(["sync", str(plain)]).wall, run.cpu)

        samples = run_rounds(
            args.repeat,
            [
                Contender(OURS, lambda: timed(ours, env), outputs=(out_ours,)),
                Contender(FLOOR, floor, outputs=(plain,)),
            ],
            args.settle,
        )
        samples[BARE] = bare
        v2v_note = ""
        if args.no_v2v:
            v2v_note = "skipped (--no-v2v)"
        elif not (shutil.which("virt-v2v") and shutil.which("nbdkit")):
            v2v_note = "skipped: apt-get install virt-v2v nbdkit libnbd-bin"
        else:
            out_v2v = work / "v2v"
            v2v = ["virt-v2v", "-i", "vmx", str(vm.config), "-o", "local", "-os", str(out_v2v),
                   "-of", "qcow2"]  # fmt: skip
            samples.update(
                run_rounds(
                    1,
                    [
                        Contender(
                            V2V,
                            lambda: timed(v2v, {**os.environ, **V2V_ENV}, work / "virt-v2v.log"),
                            outputs=(out_v2v,),
                            prepare=out_v2v.mkdir,
                        )
                    ],
                    args.settle,
                )
            )
        report(samples, data, guest.path, v2v_note, args, machine)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def report(
    samples: dict[str, list[Sample]],
    data: int,
    image: Path,
    v2v_note: str,
    args: argparse.Namespace,
    machine: Machine,
) -> None:
    ours = best(samples[OURS])
    floor, unsynced = Pair(samples[OURS], samples[FLOOR]), Pair(samples[OURS], samples[BARE])
    guest = (
        f"guest: {image.name}, {data / 2**20:.0f} MiB of data in a {image.stat().st_size >> 20}"
        " MiB disk, VMware .vmx + snapshot chain → KVM (qcow2 + libvirt XML)"
    )
    method = method_line(args.repeat, args.settle) + " (virt-v2v: one run)"
    if not args.markdown:
        print(f"machine: {machine.line(end=True)}\n{guest}\n{method}\n")
    table = Table(["tool", "best s", "CPU s (median)", "vs vmferry (best)"], markdown=args.markdown)
    for name, runs in samples.items():
        t = best(runs)
        table.add(name, f"{t:.1f}", f"{median_cpu(runs):.1f}", f"{t / ours:.2f}×")
    notes = []
    if PHASES:
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in PHASES.items())
        notes.append(f"vmferry's own phases (fastest run, s): {phases}")
    notes.append(f"vmferry ÷ (qemu-img + sync): {floor.ratio_cell()} (target ≤ 1.5)")
    if floor.cpu_anchor:
        notes.append(f"CPU: vmferry ÷ qemu-img: {floor.cpu_ours / floor.cpu_anchor:.2f}")
    notes.append(f"vmferry ÷ bare qemu-img: {unsynced.ratio_cell()}")
    if V2V in samples:
        notes.append(f"virt-v2v ÷ vmferry: {best(samples[V2V]) / ours:.1f} (target ≥ 10)")
    else:
        notes.append(f"virt-v2v: {v2v_note}")
    if args.markdown:
        print(
            "\n\n".join(
                [
                    f"`{command_line()}`",
                    f"Machine: {machine.line(end=True)}.",
                    f"{guest[0].upper()}{guest[1:]}; {method}.",
                    table.markdown(),
                    "\n".join(f"* {note}" for note in notes),
                ]
            )
        )
    else:
        print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
