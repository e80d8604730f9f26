"""``vmferry migrate``: a thin shell around :func:`vmferry.migrate.migrate`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmferry.cli.common import (
    RichProgress,
    emit_json,
    handle_errors,
    json_option,
    progress_option,
)
from vmferry.cli.vm import VMID, check_vmid_target
from vmferry.errors import UsageError
from vmferry.vm import TARGETS

#: exit code when preflight finds blockers (the same code ``fix`` uses for "not bootable")
EXIT_BLOCKED = 9


@click.command(name="migrate")
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--to", "target", required=True, type=click.Choice(sorted(TARGETS)), help="Target hypervisor."
)
@click.option(
    "-o", "outdir", required=True, type=click.Path(file_okay=False), help="Output directory."
)
@click.option("--format", "fmt", help="Disk format (default: the target's; see docs/migrate.md).")
@click.option("--dry-run", is_flag=True, help="Stop after the preflight; write nothing.")
@click.option("--keep-macs", is_flag=True, help="Keep the NICs' MAC addresses (static).")
@click.option("--resume", is_flag=True, help="Finish an interrupted migration in OUTDIR.")
@click.option("--firmware", type=click.Choice(["bios", "uefi"]), help="Override the firmware.")
@click.option("--memory", type=click.IntRange(4, 64 << 20), help="Memory in MiB.")
@click.option("--cpus", type=click.IntRange(1, 4096), help="Number of vCPUs.")
@click.option(
    "--vmid",
    type=VMID,
    help="Proxmox VM id (100-999999999; default 100): names the disks and <VMID>.conf.",
)
@click.option(
    "--allow-dir",
    "allow_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Directory where disks and parents may be opened (repeatable).",
)
@click.option(
    "--report", "report", type=click.Path(dir_okay=False), help="Write an HTML report here."
)
@progress_option
@json_option
@handle_errors
def migrate_cmd(
    source: str,
    target: str,
    outdir: str,
    fmt: str | None,
    dry_run: bool,
    keep_macs: bool,
    resume: bool,
    firmware: str | None,
    memory: int | None,
    cpus: int | None,
    vmid: int | None,
    allow_dirs: tuple[str, ...],
    report: str | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Migrate the VM in SOURCE (a VM config, Hyper-V VM folder, OVA or disk image) to TARGET.

    Exit codes: 0 done (or a clean dry run), 9 preflight blockers (nothing written), others as
    every vmferry command (see the README).
    """
    from vmferry.migrate import migrate
    from vmferry.migrate.result import summary_text

    check_vmid_target(vmid, target)
    writer = _report_writer() if report else None
    if report:
        _check_report_path(report)  # before any disk is written, not after
    result = migrate(
        source,
        target,
        outdir,
        format=fmt,
        dry_run=dry_run,
        keep_macs=keep_macs,
        resume=resume,
        firmware=firmware,
        memory=memory,
        cpus=cpus,
        allowed_dirs=list(allow_dirs) or None,
        progress=RichProgress(False if as_json else progress),
        vmid=vmid,
    )
    doc = result.to_json()
    if writer is not None and report:
        writer(doc, report)
    if as_json:
        emit_json(doc)
    else:
        click.echo(summary_text(doc))
    if result.status == "blocked":
        sys.exit(EXIT_BLOCKED)


def _check_report_path(report: str) -> None:
    path = Path(report)
    if path.is_dir():
        raise UsageError("--report names a directory", path=report, hint="give a file name")
    if not path.parent.resolve().is_dir():
        raise UsageError("--report's directory does not exist", path=str(path.parent))


def _report_writer():  # type: ignore[no-untyped-def]
    """The HTML report writer, imported only when asked for (it is a separate module)."""
    try:
        from vmferry.migrate.report import write_html
    except ImportError:
        raise UsageError(
            "the HTML report is not available in this build (vmferry.migrate.report)",
            hint="use --json and render it yourself",
        ) from None
    return write_html
