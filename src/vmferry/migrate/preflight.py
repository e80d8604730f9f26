"""Preflight, "will it boot?": judge a :class:`MigrationPlan` before anything is written.

Each check turns a fact into a :class:`Finding` with its evidence and what vmferry will do.  The
guest checks come from the guest repair rules (``vmferry.guest.linux.rules``): a rule's planned
change is a ``will-fix`` (the thing that would break the boot, and its repair), a rule's error
is a ``blocker``.  Host-side checks (firmware, size limits, space, saved state, snapshots,
Windows) are here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vmferry.migrate.findings import Evidence, Finding, sort_findings
from vmferry.migrate.plan import MigrationPlan
from vmferry.migrate.source import MEMORY_STATE_SUFFIXES
from vmferry.vm.targets import CONTROLLERS, FORMAT_MAX_BYTES

GIB = 1 << 30
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_SEVERITY = {"error": "blocker", "warning": "warning", "info": "info"}


def preflight(plan: MigrationPlan, *, skip_disks: frozenset[int] = frozenset()) -> list[Finding]:
    """Every finding, most serious first.  ``skip_disks``: finished (resumed) disks."""
    out: list[Finding] = []
    _firmware(plan, out)
    _source_notes(plan, out)
    _snapshots(plan, out)
    _memory_state(plan, out)
    _size_limits(plan, out)
    _space(plan, out, skip_disks)
    _guest(plan, out)
    _translation(plan, out)
    plan.findings = sort_findings(out)
    return plan.findings


def _firmware(plan: MigrationPlan, out: list[Finding]) -> None:
    fw, prof = plan.firmware, plan.profile
    cfg = [Evidence(str(plan.source.config))] if plan.source.config else []
    if fw not in prof.firmware:
        other = "hyperv" if prof.name == "hyperv-gen2" else None
        out.append(
            Finding(
                "blocker",
                "firmware-unsupported",
                f"{prof.description} cannot boot a {fw.upper()} guest "
                f"({prof.name} boots {'/'.join(sorted(x.upper() for x in prof.firmware))} only)",
                "nothing is written; "
                + (f"migrate to {other} (Generation 1) instead" if other else
                   "convert the guest's boot loader first, or pick another target"),
                tuple(cfg),
            )
        )  # fmt: skip
    session = plan.guest
    if session is not None and plan.source.firmware_given and session.firmware != fw:
        scheme = session.guest.table.scheme
        out.append(
            Finding(
                "warning",
                "firmware-mismatch",
                f"the VM config says {fw.upper()} but the boot disk looks "
                f"{session.firmware.upper()}-bootable ({scheme} partitions"
                + (", EFI system partition, no BIOS boot partition)" if session.firmware ==
                   "uefi" else ", no EFI system partition)"),
                f"the target VM is set to {fw.upper()} as the config says; check it boots",
                tuple(cfg),
                plan.boot_index,
            )
        )  # fmt: skip
    if plan.source.model.secure_boot:
        if prof.secure_boot and fw == "uefi":
            out.append(Finding("info", "secure-boot", "secure boot is on and is carried over",
                               "the guest's boot loader must be signed for the target's keys "
                               "(shim signed by the Microsoft UEFI CA)", tuple(cfg)))  # fmt: skip
        else:
            out.append(Finding("warning", "secure-boot-dropped",
                               f"secure boot is on but {prof.name} does not offer it",
                               "the target VM boots without secure boot", tuple(cfg)))  # fmt: skip


def _source_notes(plan: MigrationPlan, out: list[Finding]) -> None:
    for note in plan.source.notes:
        out.append(Finding("info", "source-default", note, "used for the target config"))
    for choice in plan.choices:
        out.append(Finding("info", "target-choice", choice, "done in the target config"))
    for why in plan.fallbacks:
        out.append(Finding("warning", "boot-controller-fallback", why,
                           "the target config attaches the boot disk there; the initramfs is "
                           "left as it is"))  # fmt: skip


def _snapshots(plan: MigrationPlan, out: list[Finding]) -> None:
    for d in plan.disks:
        if len(d.layers) > 1:
            names = " ← ".join(Path(x["path"]).name for x in reversed(d.layers))
            out.append(
                Finding(
                    "info",
                    "chain-flattened",
                    f"disk {d.index}: a chain of {len(d.layers)} images ({names}) is flattened",
                    "the active state (what the VM boots) is converted; snapshots are not carried",
                    tuple(Evidence(x["path"]) for x in d.layers),
                    d.index,
                )
            )
    snaps = plan.source.model.snapshots
    if snaps:
        listed = ", ".join(repr(s.name) for s in snaps[:10]) + (" ..." if len(snaps) > 10 else "")
        out.append(
            Finding(
                "info",
                "snapshots-dropped",
                f"the VM has {len(snaps)} snapshot(s): {listed}",
                "only the current state is migrated; the snapshots stay with the source",
                (Evidence(str(plan.source.config)),) if plan.source.config else (),
            )
        )


def _memory_state(plan: MigrationPlan, out: list[Finding]) -> None:
    files = plan.source.memory_state
    if not files:
        return
    kinds = sorted({MEMORY_STATE_SUFFIXES.get(p.suffix.lower(), "memory image") for p in files})
    out.append(
        Finding(
            "warning",
            "memory-state-dropped",
            f"saved memory state found ({', '.join(kinds)}): a running or suspended VM's state "
            "cannot move between hypervisors",
            "dropped: the target VM cold-boots from the disks as last written; shut the VM "
            "down cleanly on the source (not suspend) before migrating to avoid losing "
            "unwritten data",
            tuple(Evidence(str(p)) for p in files),
        )
    )


def _size_limits(plan: MigrationPlan, out: list[Finding]) -> None:
    prof, fmt = plan.profile, plan.fmt
    limits = [x for x in (prof.max_disk_bytes, FORMAT_MAX_BYTES.get(fmt.name)) if x]
    if not limits:
        return
    limit = min(limits)
    for d in plan.disks:
        if d.out_size > limit:
            out.append(
                Finding(
                    "blocker",
                    "disk-too-large",
                    f"disk {d.index}: {d.out_size / GIB:.1f} GiB exceeds the {limit // GIB} GiB "
                    f"limit of {prof.name} / {fmt.name}",
                    "nothing is written; "
                    + ("use --format vhdx" if "vhdx" in prof.disk_formats else
                       "shrink the guest's partitions and the disk first, or pick another "
                       "target"),
                    (Evidence(d.src.label),),
                    d.index,
                )
            )  # fmt: skip


def free_space(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that will hold ``path``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def _space(plan: MigrationPlan, out: list[Finding], skip: frozenset[int]) -> None:
    need = sum(d.required for d in plan.disks if d.index not in skip)
    have = free_space(plan.outdir)
    plan.space = {"required": need, "available": have, "path": str(plan.outdir)}
    if need > have:
        out.append(
            Finding(
                "blocker",
                "no-space",
                f"the output needs {need / GIB:.2f} GiB but only {have / GIB:.2f} GiB is free "
                f"at {plan.outdir}",
                "nothing is written; free space or choose another -o directory",
                (Evidence(str(plan.outdir)),),
            )
        )
    else:
        out.append(
            Finding(
                "info",
                "space",
                f"the output needs {need / GIB:.2f} GiB; {have / GIB:.2f} GiB is free",
                "none",
            )
        )


# --- the guest -----------------------------------------------------------------------------------


def _guest(plan: MigrationPlan, out: list[Finding]) -> None:
    session = plan.guest
    boot = plan.boot_disk
    if session is None:
        _no_linux_guest(plan, out)
        return
    rep = session.report
    os_ = rep.get("os") or {}
    out.append(
        Finding(
            "info",
            "guest",
            f"guest: {os_.get('pretty_name') or os_.get('distro') or 'Linux'} on disk "
            f"{session.disk_index}, boot loader {rep['bootloader'].get('type') or 'none found'}, "
            f"{len(rep.get('kernels', []))} kernel(s)",
            "repaired offline for the target; fixes are written only to the output",
            tuple(Evidence(f"guest:{p}") for p in (os_.get("source"),) if p and p[0] == "/"),
            session.disk_index,
        )
    )
    if rep["bootloader"].get("type") is None:
        out.append(Finding("warning", "no-bootloader", "no boot loader configuration found "
                           "(grub, extlinux, systemd-boot)", "none: a separate /boot that "
                           "vmferry could not mount, or a guest that boots otherwise",
                           (), session.disk_index))  # fmt: skip
    for tool in rep.get("guest_tools", []):
        if tool.get("hypervisor") == _hypervisor_of(plan.profile.name):
            continue
        out.append(
            Finding(
                "info",
                "other-hypervisor-tools",
                f"{tool.get('name')} ({tool.get('hypervisor')}) is installed",
                "its services are masked by the tools rule when they have systemd units; "
                "uninstall it after the migration",
                tuple(Evidence(_guest_path(e)) for e in tool.get("evidence", [])),
                session.disk_index,
            )
        )
    fix = session.plan
    if fix is None:
        return
    for f in fix.findings:
        out.append(
            Finding(
                _SEVERITY.get(f.severity, "warning"),
                f"guest-{f.rule}",
                f.message,
                "nothing is written: the guest would not boot" if f.severity == "error"
                else "reported; not changed automatically",
                (Evidence(f"guest:{f.path}"),) if f.path else (),
                session.disk_index,
            )
        )  # fmt: skip
    for c in fix.changes:
        out.append(
            Finding(
                "will-fix",
                f"fix-{c.rule}",
                f"{c.path}: {c.why}" + (f" ({c.summary})" if getattr(c, "summary", "") else ""),
                {
                    "edit": "edited",
                    "create": "created",
                    "symlink": "symlink created",
                    "append": "appended to",
                }.get(c.kind, c.kind)
                + " in the output disk only (source untouched)",
                tuple(_changed_lines(c, session.guest.try_read_text(c.path))),
                session.disk_index,
            )
        )
    if boot is not None and boot.fitted is not None:
        model = boot.fitted.controller_model or ""
        facts = CONTROLLERS.get(model)
        if facts is not None:
            out.append(
                Finding(
                    "info",
                    "boot-controller",
                    f"boot disk on {model} ({facts.description}); the guest sees it as "
                    f"{facts.linux_disk}",
                    f"needs {', '.join(facts.linux_drivers)} in the initramfs",
                    (),
                    boot.index,
                )
            )


def _no_linux_guest(plan: MigrationPlan, out: list[Finding]) -> None:
    probe, model = plan.probe, plan.source.model
    os_hint = (model.guest_os or "").lower()
    windows = list(probe.windows)
    if re.match(r"^(win|windows|microsoft)", os_hint):
        windows.append(f"config guest OS: {model.guest_os}")
    if windows:
        boot = plan.boot_disk
        src_model = (plan.source.disks[plan.boot_index].disk.controller_model or "").lower()
        dst_model = boot.fitted.controller_model if boot and boot.fitted else None
        from vmferry.vm.targets import canonical_controller

        same = dst_model is not None and canonical_controller(src_model) == dst_model
        if same:
            out.append(
                Finding(
                    "warning",
                    "windows-guest",
                    "Windows guest: vmferry repairs Linux guests only; the boot disk keeps its "
                    f"{dst_model} controller, so Windows keeps the driver it boots with",
                    "disks and config are converted unchanged; install the target's drivers "
                    "and tools after the first boot",
                    tuple(Evidence(w) for w in windows),
                    plan.boot_index,
                )
            )
        else:
            facts = CONTROLLERS.get(dst_model or "")
            drv = facts.windows_driver if facts else None
            out.append(
                Finding(
                    "blocker",
                    "windows-guest",
                    f"Windows guest whose boot disk moves from {src_model or 'an unknown'} to "
                    f"{dst_model or 'another'} controller: Windows stops with "
                    "INACCESSIBLE_BOOT_DEVICE (0x7B) unless the boot-start driver "
                    f"{drv or 'for it'} is installed, and vmferry repairs Linux guests only",
                    "nothing is written; install the target's storage driver in the guest "
                    "(e.g. virtio-win, Hyper-V integration) and set it to boot-start, then "
                    "migrate again",
                    tuple(Evidence(w) for w in windows),
                    plan.boot_index,
                )
            )
        return
    out.append(
        Finding(
            "warning",
            "guest-not-inspected",
            "no Linux root filesystem found, so whether the guest boots is not predicted"
            + (": " + "; ".join(probe.errors) if probe.errors else ""),
            "disks are converted unchanged",
            (),
            plan.boot_index,
        )
    )


def _translation(plan: MigrationPlan, out: list[Finding]) -> None:
    tr = plan.translation
    if tr is None:
        return
    for c in tr.choices:
        out.append(Finding("info", "target-choice", c, "done in the target config"))
    for n in tr.not_carried:
        if "snapshot(s)" in n:
            continue  # said by snapshots-dropped, with the names
        sev = "warning" if "no free slot" in n or "exceeds" in n else "info"
        out.append(Finding(sev, "not-carried", n, "not in the target config"))


def _hypervisor_of(target: str) -> str:
    return {"kvm": "kvm", "proxmox": "kvm", "hyperv": "hyperv", "hyperv-gen2": "hyperv",
            "azure": "hyperv", "vmware": "vmware", "ovf": "vmware", "xen": "xen",
            "virtualbox": "virtualbox"}.get(target, target)  # fmt: skip


def _guest_path(evidence: str) -> str:
    return evidence if evidence.startswith("dpkg:") else f"guest:{evidence}"


def _changed_lines(change: Any, original: str | None = None) -> list[Evidence]:
    """The lines of the guest's file that the change replaces (file, line, text as found).

    A change's ``before`` may already hold an earlier rule's edit (two rules editing one file);
    the evidence quotes the file as it is in the source guest, at the same line number.
    """
    path = f"guest:{change.path}"
    if change.kind == "append":
        return [Evidence(path, None, getattr(change, "summary", "") or "bytes appended")]
    if change.kind != "edit":
        return [Evidence(path, None, f"new {change.kind}")]
    found: list[Evidence] = []
    old_line = 0
    for line in change.diff().splitlines():
        m = _HUNK.match(line)
        if m:
            old_line = int(m.group(1))
            continue
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            text = line[1:]
            if original is not None:
                lines = original.splitlines()
                if 0 < old_line <= len(lines):
                    text = lines[old_line - 1]
            found.append(Evidence(path, old_line, text[:400]))
            old_line += 1
        elif line.startswith(" "):
            old_line += 1
        if len(found) >= 20:
            break
    return found or [Evidence(path)]
