"""``vmferry vm``: read any hypervisor's VM configuration, write any target's."""

from __future__ import annotations

from typing import Any

import click

from vmferry.cli.common import emit_json, handle_errors, human_size, json_option
from vmferry.errors import UsageError
from vmferry.vm import TARGETS, get_target
from vmferry.vm import convert as convert_vm
from vmferry.vm import show as show_vm


class VmidParam(click.ParamType):
    """``--vmid``: Proxmox's VM id, checked as Proxmox checks it; a bad one is a command-line
    usage error (exit 2, like an out-of-range ``--memory``) with vmferry's message."""

    name = "VMID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from vmferry.vm.writers.proxmox import check_vmid, parse_vmid

        try:
            return check_vmid(value) if isinstance(value, int) else parse_vmid(str(value))
        except UsageError as exc:
            self.fail(f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""), param, ctx)


VMID = VmidParam()


def check_vmid_target(vmid: int | None, target: str) -> None:
    """``--vmid`` with a target that has no VM ids is refused before anything is read."""
    if vmid is not None and get_target(target).writer != "proxmox":
        raise click.BadParameter(
            f"only a Proxmox target has a VMID (--to proxmox), not {target}",
            param_hint="'--vmid'",
        )


@click.group(name="vm")
def vm_group() -> None:
    """VM configurations (.vmx, .ovf/.ova, Hyper-V .xml/.vmcx, .vbox, libvirt, Proxmox, .xva)."""


@vm_group.command(name="show")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@json_option
@handle_errors
def show_cmd(config: str, as_json: bool) -> None:
    """Show the machine CONFIG describes, in vmferry's neutral model."""
    vm = show_vm(config)
    if as_json:
        emit_json(vm.to_json())
        return
    click.echo(f"name:      {vm.name} ({vm.source_format})")
    click.echo(f"firmware:  {vm.firmware}" + (" + secure boot" if vm.secure_boot else ""))
    click.echo(f"cpus:      {vm.cpus}    memory: {vm.memory_mb} MiB")
    if vm.guest_os:
        click.echo(f"guest os:  {vm.guest_os}")
    for d in vm.disks:
        size = f", {human_size(d.size_bytes)}" if d.size_bytes else ""
        click.echo(
            f"disk:      {d.controller}{d.bus}:{d.unit} ({d.controller_model or '-'}) "
            f"{d.path}{size}"
        )
    for c in vm.cdroms:
        click.echo(f"cdrom:     {c.controller}{c.bus}:{c.unit} {c.path or '(empty)'}")
    for n in vm.nics:
        click.echo(f"nic:       {n.model} {n.mac or '(generated MAC)'}")
    for s in vm.snapshots:
        click.echo(f"snapshot:  {s.name} (parent {s.parent or '-'})")
    for u in vm.unsupported:
        click.echo(f"not understood: {u}")


@vm_group.command(name="convert")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--to", "target", required=True, type=click.Choice(sorted(TARGETS)), help="Target hypervisor."
)
@click.option(
    "-o",
    "out",
    type=click.Path(file_okay=False),
    help="Directory to write the target's files to (default: print them).",
)
@click.option("--new-macs", is_flag=True, help="Let the target generate new MAC addresses.")
@click.option("--boot-controller", help="Override the controller the boot disk is put on.")
@click.option("--force", is_flag=True, help="Replace existing files in -o.")
@click.option(
    "--vmid",
    type=VMID,
    help="Proxmox only: name the config <VMID>.conf and the volumes local:<VMID>/vm-<VMID>-disk-N.",
)
@json_option
@handle_errors
def convert_cmd(
    config: str,
    target: str,
    out: str | None,
    new_macs: bool,
    boot_controller: str | None,
    force: bool,
    vmid: int | None,
    as_json: bool,
) -> None:
    """Write CONFIG's machine as TARGET's configuration; list every choice and every loss."""
    check_vmid_target(vmid, target)
    result = convert_vm(
        config,
        target,
        out,
        keep_macs=not new_macs,
        boot_controller=boot_controller,
        overwrite=force,
        vmid=vmid,
    )
    if as_json:
        emit_json(
            {
                "files": result.files if out is None else sorted(result.files),
                "choices": result.choices,
                "not_carried": result.not_carried,
            }
        )
        return
    if out is None:
        for name, text in result.files.items():
            click.echo(f"# --- {name} ---")
            click.echo(text)
    else:
        for name in result.files:
            click.echo(f"wrote {out}/{name}")
    for c in result.choices:
        click.echo(f"choice: {c}", err=True)
    for n in result.not_carried:
        click.echo(f"not carried: {n}", err=True)
