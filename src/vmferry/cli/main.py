"""Entry point of the ``vmferry`` command."""

from __future__ import annotations

import click

from vmferry import __version__
from vmferry.cli import chains, disk, guest, vm
from vmferry.cli.common import handle_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmferry")
def cli() -> None:
    """Move virtual machines between hypervisors so that they boot, and manage the
    differencing-disk (snapshot / checkpoint) chains hypervisors leave behind."""


for command in (
    disk.info,
    disk.check,
    disk.convert_cmd,
    disk.create_cmd,
    disk.compare_cmd,
    disk.map_cmd,
    disk.measure_cmd,
    disk.formats_cmd,
    chains.chain_cmd,
    chains.du_cmd,
    chains.merge_cmd,
    chains.rebase_cmd,
    chains.resize_cmd,
    vm.vm_group,
    guest.inspect_cmd,
    guest.fix_cmd,
):
    cli.add_command(command)


@cli.command()
@click.argument("workdir", default="./vmferry-demo", type=click.Path(file_okay=False))
@handle_errors
def demo(workdir: str) -> None:
    """Build a Hyper-V disk with checkpoints, flatten and convert it, verify with qemu-img."""
    from pathlib import Path

    from vmferry.demo import run_demo

    Path(workdir).mkdir(parents=True, exist_ok=True)
    if not run_demo(Path(workdir), click.echo):
        raise SystemExit(1)


def main() -> None:
    cli(prog_name="vmferry")


if __name__ == "__main__":
    main()
