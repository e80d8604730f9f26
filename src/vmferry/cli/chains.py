"""Commands for snapshot chains: see them, measure them, merge, re-point and resize them."""

from __future__ import annotations

from pathlib import Path

import click

from vmferry.chain.discover import Forest, Node, discover
from vmferry.chain.du import usage
from vmferry.chain.html import render_du_html
from vmferry.chain.merge import commit, commit_all
from vmferry.chain.surgery import rebase, resize
from vmferry.cli.common import (
    RichProgress,
    emit_json,
    handle_errors,
    human_size,
    json_option,
    parse_options,
    parse_size,
    progress_option,
)
from vmferry.ops.convert import convert


def _line(node: Node) -> str:
    text = (
        f"{node.path.name}  ({node.format}, {human_size(node.virtual_size)} virtual, "
        f"{human_size(node.file_size)} file)"
    )
    if node.used_by:
        text += "  [in use by " + ", ".join(Path(c).name for c in node.used_by) + "]"
    return text


def _print_tree(node: Node, prefix: str = "", last: bool = True, top: bool = True) -> None:
    branch = "" if top else ("└── " if last else "├── ")
    click.echo(prefix + branch + _line(node))
    child_prefix = prefix + ("" if top else ("    " if last else "│   "))
    for i, child in enumerate(node.children):
        _print_tree(child, child_prefix, i == len(node.children) - 1, top=False)


def _forest_json(forest: Forest) -> dict:
    return {
        "images": [n.to_json() for n in forest.nodes],
        "roots": [str(r.path) for r in forest.roots if r.problem is None],
        "orphans": [n.to_json() for n in forest.nodes if n.problem == "orphan"],
        "broken": [n.to_json() for n in forest.nodes if n.problem == "broken"],
        "snapshot_trees": [str(n.path) for n in forest.nodes if len(n.children) > 1],
        "unreadable": [{"path": str(u.path), "error": u.error} for u in forest.unreadable],
        "configs": forest.configs,
    }


@click.command(name="chain")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@json_option
@handle_errors
def chain_cmd(paths: tuple[str, ...], as_json: bool) -> None:
    """Show every chain under PATHS: bases, children, snapshot trees, orphans, broken links."""
    forest = discover(paths)
    if as_json:
        emit_json(_forest_json(forest))
        return
    healthy = [r for r in forest.roots if r.problem is None]
    for root in healthy:
        _print_tree(root)
        click.echo("")
    problems = [n for n in forest.nodes if n.problem]
    for n in problems:
        click.echo(f"{n.problem.upper()}: {n.path}")
        click.echo(f"    {n.reason}")
        click.echo(f"    repair: {n.repair}")
        for child in n.children:
            click.echo(f"    (its child {child.path.name} is cut off with it)")
    for u in forest.unreadable:
        click.echo(f"UNREADABLE: {u.path}: {u.error}")
    if not forest.nodes and not forest.unreadable:
        click.echo("no disk images found")


@click.command(name="du")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--html", "html_out", type=click.Path(dir_okay=False), help="Write an HTML report.")
@json_option
@handle_errors
def du_cmd(paths: tuple[str, ...], html_out: str | None, as_json: bool) -> None:
    """What the snapshots under PATHS cost now, and in the worst case."""
    forest = discover(paths)
    report = usage(forest)
    if html_out:
        Path(html_out).write_text(render_du_html(forest, report, list(paths)))
    if as_json:
        emit_json(report)
        return
    click.echo(f"{'chain':<30}{'files':>6}{'used':>12}{'allocated':>12}{'worst case':>12}")
    for c in report["chains"]:
        click.echo(
            f"{c['name'][:29]:<30}{len(c['files']):>6}{human_size(c['used_bytes']):>12}"
            f"{human_size(c['allocated_bytes']):>12}{human_size(c['worst_case_bytes']):>12}"
        )
        for m in c["memory_files"]:
            click.echo(f"    memory state {Path(m['path']).name}: {human_size(m['used_bytes'])}")
        for away in c["away_from_vm"]:
            click.echo(f"    stored away from the VM folder: {away}")
    t = report["total"]
    click.echo(
        f"{'total':<30}{t['files']:>6}{human_size(t['used_bytes']):>12}"
        f"{human_size(t['allocated_bytes']):>12}{human_size(t['worst_case_bytes']):>12}"
    )


@click.command(name="merge")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--all", "merge_all", is_flag=True, help="Merge the whole chain into its base.")
@click.option(
    "-o",
    "output",
    type=click.Path(dir_okay=False),
    help="Write the flattened chain to a new image instead, leaving the chain as it is.",
)
@click.option("-O", "out_fmt", help="Format of -o output (default: from its extension).")
@click.option("--opt", "opts", multiple=True, help="Options for -o output (key=val).")
@click.option(
    "--preserve-siblings",
    is_flag=True,
    help="Let a parent with other children be merged into, giving them its old data.",
)
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False))
@progress_option
@json_option
@handle_errors
def merge_cmd(
    image: str,
    merge_all: bool,
    output: str | None,
    out_fmt: str | None,
    opts: tuple[str, ...],
    preserve_siblings: bool,
    allow_dirs: tuple[str, ...],
    progress: bool | None,
    as_json: bool,
) -> None:
    """Commit IMAGE into its parent and remove it (or --all, or -o NEW)."""
    bar = RichProgress(False if as_json else progress)
    if output:
        result = convert(
            image,
            output,
            dst_format=out_fmt,
            options=parse_options(opts),
            allowed_dirs=allow_dirs,
            progress=bar,
        ).to_json()
    elif merge_all:
        result = commit_all(
            image, preserve_siblings=preserve_siblings, allowed_dirs=allow_dirs, progress=bar
        ).to_json()
    else:
        result = commit(
            image, preserve_siblings=preserve_siblings, allowed_dirs=allow_dirs, progress=bar
        ).to_json()
    if as_json:
        emit_json(result)
        return
    if output:
        click.echo(f"wrote {output}; the chain is unchanged")
        return
    for m in result["merged"]:
        click.echo(f"merged {m}")
    click.echo(f"into {result['into']} ({human_size(result['bytes_copied'])} copied)")
    for r in result["repointed"]:
        click.echo(f"re-pointed {r} at {result['into']}")
    for w in result["warnings"]:
        click.echo(f"warning: {w}", err=True)
    click.echo(
        f"if a VM configuration names the merged file, point it at {Path(result['into']).name}"
    )


@click.command(name="rebase")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-b",
    "parent",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The parent's new location.",
)
@click.option("-F", "parent_fmt", help="The parent's format (default: what the child says).")
@click.option(
    "-u",
    "--unsafe",
    is_flag=True,
    help="Accept a parent whose identity differs (like -IgnoreIdMismatch).",
)
@json_option
@handle_errors
def rebase_cmd(
    image: str, parent: str, parent_fmt: str | None, unsafe: bool, as_json: bool
) -> None:
    """Point IMAGE at its moved or renamed parent."""
    result = rebase(image, parent, parent_format=parent_fmt, unsafe=unsafe)
    if as_json:
        emit_json(result)
        return
    for w in result["warnings"]:
        click.echo(f"WARNING: {w}", err=True)
    click.echo(f"{image} now points at {parent}")


@click.command(name="resize")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.argument("size")
@click.option("--shrink", is_flag=True, help="Allow making the disk smaller (never under data).")
@click.option(
    "--chain",
    "whole_chain",
    is_flag=True,
    help="Grow every member of IMAGE's chain (base and all children) consistently.",
)
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False))
@json_option
@handle_errors
def resize_cmd(
    image: str,
    size: str,
    shrink: bool,
    whole_chain: bool,
    allow_dirs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Set IMAGE's virtual size (SIZE, or +SIZE / -SIZE relative)."""
    from vmferry.chain.open import open_layer

    if size[:1] in "+-":
        layer = open_layer(image, force_share=True)
        current = layer.virtual_size
        layer.close()
        delta = parse_size(size[1:])
        target = current + delta if size[0] == "+" else current - delta
    else:
        target = parse_size(size)
    result = resize(image, target, shrink=shrink, chain=whole_chain, allowed_dirs=allow_dirs)
    if as_json:
        emit_json(result)
        return
    for member in result.get("members", [result]):
        click.echo(
            f"{member['image']}: {human_size(member['old_size'])} -> "
            f"{human_size(member['new_size'])}"
        )
    for path in result.get("repointed", []):
        click.echo(f"re-pinned {path} to its resized parent")


@click.command(name="snapshot")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--branch",
    is_flag=True,
    help="Allow a snapshot of an image that already has children (a snapshot tree).",
)
@json_option
@handle_errors
def snapshot_cmd(image: str, branch: bool, as_json: bool) -> None:
    """Create the next differencing child of IMAGE, named as its hypervisor names them."""
    from vmferry.chain.snapshot import snapshot

    result = snapshot(image, branch=branch)
    if as_json:
        emit_json(result)
        return
    click.echo(result["image"])
    click.echo(
        f"{Path(image).name} is now frozen: point the VM at {Path(result['image']).name}",
        err=True,
    )


@click.command(name="compact")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False))
@progress_option
@json_option
@handle_errors
def compact_cmd(
    image: str, allow_dirs: tuple[str, ...], progress: bool | None, as_json: bool
) -> None:
    """Give back the space of blocks in IMAGE that read as all zeros (Optimize-VHD)."""
    from vmferry.chain.compact import compact

    bar = RichProgress(False if as_json else progress)
    result = compact(image, allowed_dirs=allow_dirs, progress=bar)
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"{image}: {human_size(result['allocated_before'])} -> "
        f"{human_size(result['allocated_after'])} allocated "
        f"({human_size(result['freed_bytes'])} given back)"
    )
