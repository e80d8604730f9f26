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
qemu-img runs alternate (a shared machine's load then hits both alike) and each row also gives
the CPU seconds (user + system) of its best run, which load inflates far less than wall time.

vmferry runs as an installed tool does: its console script directly (not through a pyenv shim,
whose bash start costs ~0.5 s), with byte-compiled modules (``PYTHONPYCACHEPREFIX`` in the work
directory even when the environment sets ``PYTHONDONTWRITEBYTECODE``; a first untimed run
compiles them), as ``pip install`` leaves them.

Not test dependencies, bench only (Debian packages): ``virt-v2v``, ``nbdkit``, ``libnbd-bin``
(virt-v2v 2.x runs its input and output through nbdkit; it pulls libguestfs and the appliance
kernel in).  Without them the virt-v2v row is skipped (``--no-v2v`` skips it on purpose: it
takes minutes).  Building the guest needs what tests/bootkit needs (root, debootstrap, loop
devices) unless the image is already cached.

    python3 bench/migrate_bench.py [--repeat 2] [--no-v2v] [--keep DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

V2V_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


#: vmferry's own account of its best run (``--json`` timings: disks, verify, config)
PHASES: dict[str, float] = {}
#: CPU seconds (user + system, children included) of the last ``timed`` command
LAST_CPU: list[float] = [0.0]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def vmferry_command() -> list[str]:
    """The console script beside this interpreter (what ``pip install`` made), else PATH's."""
    script = Path(sys.executable).with_name("vmferry")
    if script.is_file():
        return [str(script)]
    found = shutil.which("vmferry")
    if found is None:
        sys.exit("vmferry is not installed (pip install -e .)")
    return [found]


def timed(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> float:
    """Wall seconds of one command; a failure stops the bench with its output."""
    cpu = _children_cpu()
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    elapsed = time.monotonic() - started
    LAST_CPU[0] = _children_cpu() - cpu
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if "--json" in argv and proc.returncode == 0:
        phases = json.loads(proc.stdout).get("timings", {})
        if not PHASES or phases.get("total_s", 0) < PHASES.get("total_s", 0):
            PHASES.clear()
            PHASES.update(phases)
    if proc.returncode != 0:
        sys.exit(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return elapsed


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return "not installed"
    return out.splitlines()[0] if out else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2, help="runs of vmferry and qemu-img (best)")
    ap.add_argument("--no-v2v", action="store_true", help="skip virt-v2v (minutes under TCG)")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    ap.add_argument("--markdown", action="store_true", help="print a BENCHMARKS.md table")
    args = ap.parse_args()

    from tests.bootkit.guest import VMWARE_GUEST, build_image
    from tests.migrate.packaging import package, split_layers

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
        rows: dict[str, float] = {}
        cpu: dict[str, float] = {}
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        vmferry = vmferry_command()
        subprocess.run([*vmferry, "migrate", "--help"], capture_output=True, check=True)

        def once(name: str, argv: list[str], out: Path, sync: Path | None = None) -> None:
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            t = timed(argv)
            used = LAST_CPU[0]
            if sync is not None:
                bare = "qemu-img convert (bare)"
                if t < rows.get(bare, float("inf")):
                    rows[bare], cpu[bare] = t, used
                started = time.monotonic()
                subprocess.run(["sync", str(sync)], check=True)
                t += time.monotonic() - started
            if t < rows.get(name, float("inf")):
                rows[name], cpu[name] = t, used

        out_ours = work / "vmferry-kvm"
        plain = work / "plain.qcow2"
        ours = [*vmferry, "migrate", str(vm.config), "--to", "kvm", "-o", str(out_ours), "--json"]
        for _ in range(args.repeat):  # alternate: the machine's load hits both alike
            once("vmferry migrate", ours, out_ours)
            qemu = ["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(vm.top), str(plain)]
            once("qemu-img convert + sync", qemu, plain, sync=plain)
        v2v_note = ""
        if args.no_v2v:
            v2v_note = "skipped (--no-v2v)"
        elif not (shutil.which("virt-v2v") and shutil.which("nbdkit")):
            v2v_note = "skipped: apt-get install virt-v2v nbdkit libnbd-bin"
        else:
            out_v2v = work / "v2v"
            if out_v2v.exists():
                shutil.rmtree(out_v2v)
            out_v2v.mkdir()
            rows["virt-v2v"] = timed(
                ["virt-v2v", "-i", "vmx", str(vm.config), "-o", "local", "-os", str(out_v2v),
                 "-of", "qcow2"],
                env=V2V_ENV, log=work / "virt-v2v.log",
            )  # fmt: skip
            cpu["virt-v2v"] = LAST_CPU[0]
        report(rows, cpu, data, guest.path, v2v_note, args.markdown)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def report(
    rows: dict[str, float], cpu: dict[str, float], data: int, image: Path, v2v_note: str, md: bool
) -> None:
    ours = rows["vmferry migrate"]
    floor = rows["qemu-img convert + sync"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {tool_version(['qemu-img', '--version'])}, "
        f"{tool_version(['virt-v2v', '--version'])}; load {os.getloadavg()[0]:.1f}"
    )
    print(f"guest: {image.name}, {data / 2**20:.0f} MiB of data in a {image.stat().st_size >> 20}"
          " MiB disk, VMware .vmx + snapshot chain → KVM (qcow2 + libvirt XML)")  # fmt: skip
    if md:
        print("\n| tool | seconds | CPU seconds | vs vmferry |\n|---|---|---|---|")
        for name, t in rows.items():
            print(f"| {name} | {t:.1f} | {cpu.get(name, 0):.1f} | {t / ours:.2f}× |")
    else:
        for name, t in rows.items():
            used = cpu.get(name, 0)
            print(f"{name:28s} {t:8.1f} s  cpu {used:6.1f} s  {t / ours:6.2f}× vmferry's")
    if PHASES:
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in PHASES.items())
        print(f"vmferry's own phases (best run, s): {phases}")
    print(f"\nvmferry ÷ (qemu-img + sync): {ours / floor:.2f} (target ≤ 1.5)")
    qcpu = cpu.get("qemu-img convert + sync") or 0.0
    if qcpu:
        print(f"CPU: vmferry ÷ qemu-img:     {cpu['vmferry migrate'] / qcpu:.2f}")
    print(f"vmferry ÷ bare qemu-img:     {ours / rows['qemu-img convert (bare)']:.2f}")
    if "virt-v2v" in rows:
        print(f"virt-v2v ÷ vmferry:          {rows['virt-v2v'] / ours:.1f} (target ≥ 10)")
    else:
        print(f"virt-v2v: {v2v_note}")


if __name__ == "__main__":
    main()
