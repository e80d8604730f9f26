"""Entry point of the ``vmferry`` command.

Commands are imported when they run, not at start-up: a `vmferry convert` should not pay for
loading the VM-config readers or the guest filesystems.
"""

from __future__ import annotations

import importlib

import click

from vmferry import __version__

#: command name -> "module:attribute" (in the order `--help` lists them)
COMMANDS = {
    "info": "vmferry.cli.disk:info",
    "check": "vmferry.cli.disk:check",
    "convert": "vmferry.cli.disk:convert_cmd",
    "create": "vmferry.cli.disk:create_cmd",
    "compare": "vmferry.cli.disk:compare_cmd",
    "map": "vmferry.cli.disk:map_cmd",
    "measure": "vmferry.cli.disk:measure_cmd",
    "formats": "vmferry.cli.disk:formats_cmd",
    "chain": "vmferry.cli.chains:chain_cmd",
    "du": "vmferry.cli.chains:du_cmd",
    "merge": "vmferry.cli.chains:merge_cmd",
    "rebase": "vmferry.cli.chains:rebase_cmd",
    "resize": "vmferry.cli.chains:resize_cmd",
    "snapshot": "vmferry.cli.chains:snapshot_cmd",
    "compact": "vmferry.cli.chains:compact_cmd",
    "vm": "vmferry.cli.vm:vm_group",
    "inspect": "vmferry.cli.guest:inspect_cmd",
    "fix": "vmferry.cli.guest:fix_cmd",
    "migrate": "vmferry.cli.migrate:migrate_cmd",
    "demo": "vmferry.cli.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmferry")
def cli() -> None:
    """Move virtual machines between hypervisors so that they boot, and manage the
    differencing-disk (snapshot / checkpoint) chains hypervisors leave behind."""


def main() -> None:
    cli(prog_name="vmferry")


if __name__ == "__main__":
    main()
