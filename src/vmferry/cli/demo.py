"""``vmferry demo``: the built-in example the README's setup command runs."""

from __future__ import annotations

from pathlib import Path

import click

from vmferry.cli.common import handle_errors


@click.command()
@click.argument("workdir", default="./vmferry-demo", type=click.Path(file_okay=False))
@handle_errors
def demo(workdir: str) -> None:
    """Build a Hyper-V disk with checkpoints, flatten and convert it, verify with qemu-img."""
    from vmferry.demo import run_demo

    Path(workdir).mkdir(parents=True, exist_ok=True)
    if not run_demo(Path(workdir), click.echo):
        raise SystemExit(1)
