"""Plan and apply the fix rules to a Linux guest for a target hypervisor.

Every write goes to a copy-on-write :class:`Overlay` first, all files of the plan, and only
when all of them were written does anything leave the overlay: into a new image (``output``),
back into the source (``in_place``), or nowhere (the caller gets the overlay to stream).  Before
the first write every file's filesystem is checked writable, so a filesystem vmferry cannot
write is reported, never half-edited.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import UsageError
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.guest import Guest, open_guest
from vmferry.guest.linux.rules import RULES, Change, Finding, PlanContext
from vmferry.guest.overlay import Overlay, ReadableDisk
from vmferry.vm.targets import get_target

ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
NAMINGS = ("uuid", "label", "target")


@dataclass
class FixPlan:
    target: str
    firmware: str
    changes: list[Change]
    findings: list[Finding]

    @property
    def bootable(self) -> bool:
        """False when some finding says the guest will not boot on the target as planned."""
        return not any(f.severity == "error" for f in self.findings)

    @property
    def files(self) -> list[str]:
        return sorted({c.path for c in self.changes})

    def diff(self) -> str:
        return "".join(c.diff() for c in self.changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "firmware": self.firmware,
            "bootable": self.bootable,
            "changes": [c.to_json() for c in self.changes],
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass
class FixResult:
    """What ``apply_fixes`` did.  With neither output nor in_place, ``overlay`` holds the edits
    over the still-open source ``disk``: stream it, then ``close()``."""

    plan: FixPlan
    written: list[str] = field(default_factory=list)
    output: str | None = None
    in_place: bool = False
    overlay: Overlay | None = None
    disk: Any = None

    def close(self) -> None:
        if self.overlay is not None:
            self.overlay.close()
        if self.disk is not None:
            self.disk.close()
            self.disk = None

    def __enter__(self) -> FixResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "written": self.written, "output": self.output,
                "in_place": self.in_place}  # fmt: skip


def detect_firmware(guest: Guest) -> str:
    """uefi for a GPT disk with an EFI system partition and no BIOS boot partition."""
    types = {p.type.upper() for p in guest.table.partitions}
    if guest.table.scheme == "gpt" and ESP_GUID in types and BIOS_BOOT_GUID not in types:
        return "uefi"
    return "bios"


def plan_guest(
    guest: Guest,
    target: str,
    *,
    firmware: str | None = None,
    rules: Iterable[str] | None = None,
    naming: str = "uuid",
    controller: str | None = None,
) -> FixPlan:
    """Run the rules (all, or the named ones) against ``guest``; nothing is written.

    ``naming``: how rewritten device references name their filesystem: ``uuid`` (default),
    ``label`` (LABEL= where the filesystem has a label, else UUID=) or ``target`` (the device
    name the target's preferred boot controller gives it, e.g. /dev/vda1 on kvm).
    ``controller``: the boot disk controller the VM will get, one of the target's
    ``boot_controllers`` (default: its preferred one); its drivers go into the initramfs.
    """
    if naming not in NAMINGS:
        raise UsageError(f"unknown naming {naming!r}", hint="one of: " + ", ".join(NAMINGS))
    profile = get_target(target)
    fw = firmware or detect_firmware(guest)
    ctx = PlanContext(guest, profile, fw, naming, controller=controller)
    if fw not in profile.firmware:
        ctx.find("target", "error", f"{profile.name} cannot boot {fw} guests")
        return FixPlan(profile.name, fw, [], ctx.findings)
    allowed = profile.boot_controllers.get(fw, ())
    if controller is not None and controller not in allowed:
        raise UsageError(
            f"{profile.name} does not boot {fw} guests from {controller!r}",
            hint="one of: " + ", ".join(allowed),
        )
    names = list(rules) if rules is not None else list(RULES)
    for name in names:
        if name not in RULES:
            raise UsageError(f"unknown fix rule {name!r}", hint="one of: " + ", ".join(RULES))
        RULES[name](ctx)
    return FixPlan(profile.name, fw, ctx.changes, ctx.findings)


def plan_fixes(
    image: str | os.PathLike[str] | ReadableDisk,
    target: str,
    *,
    format: str | None = None,
    firmware: str | None = None,
    naming: str = "uuid",
    controller: str | None = None,
    **open_kw: Any,
) -> tuple[list[Change], list[Finding]]:
    """The changes the rules would make to ``image`` for ``target``, and what they cannot fix."""
    kw: dict[str, Any] = {"firmware": firmware, "naming": naming, "controller": controller}
    if isinstance(image, (str, os.PathLike)):
        import vmferry

        with vmferry.open(image, format, **open_kw) as disk:
            plan = plan_guest(open_guest(disk), target, **kw)
    else:
        plan = plan_guest(open_guest(image), target, **kw)
    return plan.changes, plan.findings


def write_plan(guest: Guest, plan: FixPlan) -> list[str]:
    """Write every planned file through ``guest`` (opened on an overlay); all or nothing.

    Every target is checked first (filesystem writable, file regular, or for new entries the
    directory able to take them), so a refusal comes before the first byte is written.
    """
    final: dict[str, Change] = {}
    for c in plan.changes:
        if c.path in final and final[c.path].kind != "edit":
            c = Change(c.rule, c.path, "", c.after, c.why, final[c.path].kind, final[c.path].mode)
        final[c.path] = c
    steps = []
    for path in sorted(final):
        change = final[path]
        gfs, inner = guest.locate(path)
        fs = gfs.fs
        check = getattr(fs, "check_writable", None)
        if fs is None or check is None:
            raise GuestWriteRefusedError(
                f"{path}: vmferry cannot write the {gfs.type or 'unknown'} filesystem it is on",
                hint="nothing was written",
            )
        check()
        if change.kind in ("edit", "append"):
            st = fs.stat(inner)
            if st.kind != "file":
                raise GuestWriteRefusedError(
                    f"{path}: not a regular file", hint="nothing was written"
                )
            if change.kind == "append":
                _check_appendable(gfs.type, fs, path, st.size, change)
        else:
            fs.check_creatable(inner)  # type: ignore[attr-defined]
        _check_content_fits(fs, inner, change)
        steps.append((change, fs, inner))
    for change, fs, inner in steps:
        data = change.after.encode("utf-8", "surrogateescape")
        if change.kind == "append":
            fs.append_file(inner, change.data)  # type: ignore[attr-defined]
        elif change.kind == "edit":
            fs.write_file(inner, data)  # type: ignore[attr-defined]
        elif change.kind == "create":
            fs.create_file(inner, data, mode=change.mode)  # type: ignore[attr-defined]
        else:
            fs.symlink(inner, change.after)  # type: ignore[attr-defined]
    return [c.path for c, _, _ in steps]


#: per change kind, the optional method a filesystem offers to refuse content that will not
#: fit (no space, allocation it cannot do) before anything is written
_CONTENT_CHECKS = {
    "edit": "check_write_file",
    "append": "check_append_file",
    "create": "check_create_file",
}


def _check_content_fits(fs: Any, inner: str, change: Change) -> None:
    check = getattr(fs, _CONTENT_CHECKS.get(change.kind, ""), None)
    if check is None:
        return
    if change.kind == "append":
        check(inner, change.data)
    else:
        check(inner, change.after.encode("utf-8", "surrogateescape"))


def _check_appendable(fs_type: str | None, fs: Any, path: str, size: int, change: Change) -> None:
    """An append needs the filesystem's ``append_file`` and the size the plan was made for."""
    if getattr(fs, "append_file", None) is None:
        raise GuestWriteRefusedError(
            f"{path}: vmferry cannot append to files on the {fs_type or 'unknown'} filesystem",
            hint="nothing was written",
        )
    if size != change.old_size:
        raise GuestWriteRefusedError(
            f"{path}: is {size} bytes, the plan was made for {change.old_size}",
            hint="nothing was written; plan again",
        )


def apply_fixes(
    image: str | os.PathLike[str],
    target: str,
    output: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    dry_run: bool = False,
    *,
    format: str | None = None,
    output_format: str | None = None,
    options: Mapping[str, str] | None = None,
    overwrite: bool = False,
    firmware: str | None = None,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    naming: str = "uuid",
    controller: str | None = None,
) -> FixResult:
    """Plan and (unless ``dry_run``) apply the fixes; see the module docstring for where to."""
    import vmferry

    if output is not None and in_place:
        raise UsageError("--in-place and an output image exclude each other")
    writable = in_place and not dry_run
    disk = vmferry.open(image, format, writable=writable, allowed_dirs=allowed_dirs)
    try:
        overlay = Overlay(disk)
        guest = open_guest(overlay)
        plan = plan_guest(guest, target, firmware=firmware, naming=naming, controller=controller)
        result = FixResult(plan, in_place=in_place)
        if dry_run or not plan.changes:
            if output is not None and not dry_run:
                _write_output(disk, overlay, output, output_format, options, overwrite)
                result.output = str(output)
            return result
        result.written = write_plan(guest, plan)
        if in_place:
            overlay.commit(disk)
            disk.flush()
        elif output is not None:
            _write_output(disk, overlay, output, output_format, options, overwrite)
            result.output = str(output)
        else:
            result.overlay, result.disk = overlay, disk
            disk = None  # the caller closes it through result.close()
        return result
    finally:
        if disk is not None:
            disk.close()


def _write_output(
    disk: Any,
    overlay: Overlay,
    output: str | os.PathLike[str],
    output_format: str | None,
    options: Mapping[str, str] | None,
    overwrite: bool,
) -> None:
    """Write the source chain with the overlay's edits into ``output``, in one pass: each
    edited block is written once, which an append-only output (streamOptimized VMDK) needs."""
    from vmferry.ops.convert import output_driver
    from vmferry.ops.stream import read_plan, stream_to_image

    stream_to_image(
        read_plan(disk, overlay),
        disk.virtual_size,
        output,
        output_driver(output, output_format),
        options,
        overwrite=overwrite,
    )
