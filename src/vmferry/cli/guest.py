"""``vmferry inspect`` and ``vmferry fix``: the guest inside a disk, offline."""

from __future__ import annotations

import sys

import click

from vmferry.cli.common import emit_json, handle_errors, json_option, parse_options, share_options
from vmferry.vm import TARGETS

#: exit code when the plan says the guest will still not boot on the target
EXIT_NOT_BOOTABLE = 9


@click.command(name="inspect")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-f", "fmt", help="Image format (default: probed).")
@share_options
@json_option
@handle_errors
def inspect_cmd(
    image: str, fmt: str | None, allow_dirs: tuple[str, ...], force_share: bool, as_json: bool
) -> None:
    """Tell what guest is inside IMAGE: OS, filesystems, kernels and drivers, boot loader."""
    from vmferry.guest.linux.inspect import inspect_image

    report = inspect_image(image, fmt, allowed_dirs=allow_dirs, force_share=force_share)
    if as_json:
        emit_json(report)
        return
    os_ = report.get("os") or {}
    click.echo(
        f"os:         {os_.get('pretty_name') or os_.get('distro') or 'unknown'} "
        f"({os_.get('family')}, {os_.get('arch')})"
    )
    pt = report.get("partition_table") or {}
    click.echo(f"partitions: {pt.get('scheme')}")
    for fs in report.get("filesystems", []):
        click.echo(
            f"  {fs.get('partition')}: {fs.get('type')} uuid={fs.get('uuid')} "
            f"label={fs.get('label')}"
        )
    boot = report.get("bootloader") or {}
    click.echo(f"bootloader: {boot.get('type')}")
    for ref in report.get("fstab", []):
        click.echo(
            f"fstab:      {ref.get('device')} ({ref.get('naming')}) on "
            f"{ref.get('mountpoint', ref.get('mount_point', ''))}"
        )
    for k in report.get("kernels", []):
        drivers = ", ".join(sorted(k.get("drivers") or [])[:12])
        click.echo(f"kernel:     {k.get('version')} initramfs={k.get('initramfs')}")
        if drivers:
            click.echo(f"            drivers: {drivers}{' ...' if len(k['drivers']) > 12 else ''}")
    for t in report.get("guest_tools", []):
        click.echo(f"tools:      {t.get('name')} ({t.get('hypervisor')})")
    for w in report.get("warnings", []):
        click.echo(f"warning: {w}", err=True)


@click.command(name="fix")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--target",
    required=True,
    type=click.Choice(sorted(TARGETS)),
    help="Hypervisor the guest must boot on.",
)
@click.option(
    "-o",
    "output",
    type=click.Path(dir_okay=False),
    help="Write the repaired disk to a new image (format from -O or the extension).",
)
@click.option("-O", "out_fmt", help="Output format.")
@click.option("--opt", "opts", multiple=True, help="Output create options key=val.")
@click.option("--in-place", is_flag=True, help="Edit IMAGE itself.")
@click.option("--dry-run", is_flag=True, help="Show the changes, write nothing.")
@click.option(
    "--naming",
    type=click.Choice(["uuid", "label", "target"]),
    default="uuid",
    help="How rewritten device references name filesystems.",
)
@click.option(
    "--controller",
    help="Boot controller the guest will use on TARGET (default: the target's preferred one); "
    "its drivers are added to the initramfs when missing.",
)
@click.option("-f", "fmt", help="Image format (default: probed).")
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False))
@json_option
@handle_errors
def fix_cmd(
    image: str,
    target: str,
    output: str | None,
    out_fmt: str | None,
    opts: tuple[str, ...],
    in_place: bool,
    dry_run: bool,
    naming: str,
    controller: str | None,
    fmt: str | None,
    allow_dirs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Repair the guest in IMAGE so that it boots on TARGET (exit 9: it still would not)."""
    from vmferry.errors import UsageError
    from vmferry.guest.linux.fix import apply_fixes

    if not (output or in_place or dry_run):
        raise UsageError("say where the repaired guest goes: -o OUTPUT, --in-place or --dry-run")
    if output and in_place:
        raise UsageError("-o and --in-place exclude each other")
    result = apply_fixes(
        image,
        target,
        output=output,
        in_place=in_place,
        dry_run=dry_run,
        format=fmt,
        output_format=out_fmt,
        options=parse_options(opts),
        allowed_dirs=list(allow_dirs) or None,
        naming=naming,
        controller=controller,
    )
    with result:
        plan = result.plan
        if as_json:
            emit_json(result.to_json())
        else:
            click.echo(plan.diff(), nl=False)
            for f in plan.findings:
                click.echo(f"{f.severity}: {f.message}", err=True)
            verb = "would change" if dry_run else "changed"
            click.echo(
                f"{verb} {len(plan.files)} file(s) for {target}; "
                f"{'bootable' if plan.bootable else 'NOT bootable as planned'}"
            )
    if not plan.bootable:
        sys.exit(EXIT_NOT_BOOTABLE)
