"""Image commands, named and lettered as qemu-img's where the concept is the same."""

from __future__ import annotations

import sys

import click

from vmferry.cli.common import (
    RichProgress,
    emit_json,
    handle_errors,
    human_size,
    json_option,
    parse_options,
    parse_size,
    progress_option,
    share_options,
)

# qemu-img check's exit codes: 0 clean, 2 corruptions, 3 leaks only, 63 check not supported
EXIT_CORRUPT, EXIT_LEAKS, EXIT_UNSUPPORTED = 2, 3, 63


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-f", "--format", "fmt", help="Image format (default: probed).")
@click.option("--chain", "--backing-chain", "chain", is_flag=True, help="Show every layer.")
@share_options
@json_option
@handle_errors
def info(
    image: str,
    fmt: str | None,
    chain: bool,
    allow_dirs: tuple[str, ...],
    force_share: bool,
    as_json: bool,
) -> None:
    """Show format, sizes, identity and parent of IMAGE."""
    from vmferry.ops.inspect import image_info

    data = image_info(image, fmt, chain=chain, allowed_dirs=allow_dirs, force_share=force_share)
    if as_json:
        emit_json(data)
        return
    layers = data.get("chain", [data])
    for i, layer in enumerate(layers):
        if i:
            click.echo("")
        _print_layer(layer)
    for w in data.get("warnings", []):
        click.echo(f"warning: {w}", err=True)


def _print_layer(d: dict) -> None:
    spec = d.get("format_specific", {})
    rows = [
        ("image", d["filename"]),
        ("file format", d["format"] + (f" ({spec['subformat']})" if "subformat" in spec else "")),
        ("virtual size", f"{human_size(d['virtual_size'])} ({d['virtual_size']} bytes)"),
        ("file size", f"{human_size(d['file_size'])} ({d['file_size']} bytes)"),
        ("disk size", human_size(d["allocated_bytes"])),
        ("cluster_size", str(d["cluster_size"])),
    ]
    for key, value in d.get("identity", {}).items():
        rows.append((key, str(value)))
    parent = d.get("parent")
    if parent:
        rows.append(("parent", ", ".join(parent["hints"]) or "(no path stored)"))
        for key, value in parent["identity"].items():
            rows.append((f"parent {key}", str(value)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k + ':':<{width + 1}} {v}")
    extra = {k: v for k, v in spec.items() if k != "subformat"}
    if extra:
        click.echo("format specific information:")
        for k, v in extra.items():
            click.echo(f"    {k}: {v}")


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-f", "--format", "fmt", help="Image format (default: probed).")
@share_options
@json_option
@handle_errors
def check(
    image: str, fmt: str | None, allow_dirs: tuple[str, ...], force_share: bool, as_json: bool
) -> None:
    """Check the structure of IMAGE (exit 0 clean, 2 corrupt, 3 leaks only, 63 unsupported)."""
    from vmferry.ops.inspect import check_image

    report, meta = check_image(image, fmt, allowed_dirs=allow_dirs, force_share=force_share)
    code = EXIT_CORRUPT if report.corruptions else EXIT_LEAKS if report.leaks else 0
    if as_json:
        emit_json(
            {
                **meta,
                "corruptions": report.corruptions,
                "leaks": report.leaks,
                "leaked_bytes": report.leaked_bytes,
                "notes": report.notes,
                "clean": report.clean,
            }
        )
    else:
        for c in report.corruptions:
            click.echo(f"ERROR {c}")
        for leak in report.leaks:
            click.echo(f"Leaked: {leak}")
        for n in report.notes:
            click.echo(f"note: {n}")
        if report.clean:
            click.echo("No errors were found on the image.")
        else:
            click.echo(f"{len(report.corruptions)} errors were found on the image.")
            if report.leaks:
                click.echo(f"{len(report.leaks)} leaked areas ({report.leaked_bytes} bytes).")
    sys.exit(code)


@click.command(name="convert")
@click.option("-f", "src_fmt", help="Source format (default: probed).")
@click.option("-O", "dst_fmt", help="Output format (default: from DST's extension).")
@click.option(
    "-o", "opts", multiple=True, help="Output options key=val[,key=val] (see `vmferry formats`)."
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option(
    "-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors (no progress)."
)
@click.option(
    "--no-sync",
    is_flag=True,
    help="Do not wait for DST to reach the disk before renaming it into place "
    "(qemu-img convert's default); safe if the process is killed, not on power loss.",
)
@share_options
@progress_option
@json_option
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@handle_errors
def convert_cmd(
    src: str,
    dst: str,
    src_fmt: str | None,
    dst_fmt: str | None,
    opts: tuple[str, ...],
    overwrite: bool,
    quiet: bool,
    no_sync: bool,
    allow_dirs: tuple[str, ...],
    force_share: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Convert SRC (flattening its chain) into a new image DST."""
    from vmferry.ops.convert import convert

    result = convert(
        src,
        dst,
        src_format=src_fmt,
        dst_format=dst_fmt,
        options=parse_options(opts),
        allowed_dirs=allow_dirs,
        force_share=force_share,
        overwrite=overwrite,
        progress=RichProgress(False if as_json or quiet else progress),
        sync=not no_sync,
    )
    if as_json:
        emit_json(result.to_json())
        return
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if quiet:
        return
    rate = result.data_bytes_read / result.seconds if result.seconds else 0
    click.echo(
        f"{result.destination}: {result.destination_format}, "
        f"{human_size(result.virtual_size)} virtual, {human_size(result.bytes_written)} "
        f"written in {result.seconds:.2f} s ({human_size(int(rate))}/s)"
    )


@click.command(name="create")
@click.option("-f", "fmt", required=True, help="Format of the new image.")
@click.option(
    "-b", "parent", type=click.Path(dir_okay=False), help="Parent: make a differencing child."
)
@click.option("-F", "parent_fmt", help="Parent's format (default: the child's own).")
@click.option("-o", "opts", multiple=True, help="Options key=val[,key=val].")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@json_option
@click.argument("dst", type=click.Path(dir_okay=False))
@click.argument("size", required=False)
@handle_errors
def create_cmd(
    dst: str,
    size: str | None,
    fmt: str,
    parent: str | None,
    parent_fmt: str | None,
    opts: tuple[str, ...],
    overwrite: bool,
    as_json: bool,
) -> None:
    """Create DST of SIZE (10G, 512M, bytes), or a child of -b PARENT."""
    nbytes = parse_size(size) if size is not None else None
    from vmferry.ops.create import create

    chain = create(
        dst,
        fmt,
        nbytes,
        parent,
        parent_format=parent_fmt,
        options=parse_options(opts),
        overwrite=overwrite,
    )
    with chain:
        summary = {
            "filename": str(chain.path),
            "format": chain.format,
            "virtual_size": chain.virtual_size,
            "parent": str(parent) if parent else None,
        }
    if as_json:
        emit_json(summary)
    else:
        extra = f", parent {parent}" if parent else ""
        click.echo(f"Created {dst}: {fmt}, {human_size(chain.virtual_size)}{extra}")


@click.command(name="compare")
@click.option("-f", "a_fmt", help="Format of A.")
@click.option("-F", "b_fmt", help="Format of B.")
@click.option("-s", "--strict", is_flag=True, help="Images of different sizes differ.")
@share_options
@progress_option
@json_option
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@handle_errors
def compare_cmd(
    a: str,
    b: str,
    a_fmt: str | None,
    b_fmt: str | None,
    strict: bool,
    allow_dirs: tuple[str, ...],
    force_share: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Compare what A and B show a guest (exit 0 identical, 1 different)."""
    from vmferry.ops.compare import compare

    result = compare(
        a,
        b,
        a_format=a_fmt,
        b_format=b_fmt,
        strict=strict,
        allowed_dirs=allow_dirs,
        force_share=force_share,
        progress=RichProgress(False if as_json else progress),
    )
    if as_json:
        emit_json(result.to_json())
    elif result.identical:
        click.echo("Images are identical.")
    else:
        click.echo(f"Content mismatch at offset {result.mismatch_offset}! ({result.reason})")
    sys.exit(0 if result.identical else 1)


@click.command(name="map")
@click.option("-f", "fmt", help="Image format (default: probed).")
@share_options
@json_option
@click.argument("image", type=click.Path(dir_okay=False))
@handle_errors
def map_cmd(
    image: str, fmt: str | None, allow_dirs: tuple[str, ...], force_share: bool, as_json: bool
) -> None:
    """Show which layer holds each run of IMAGE's data (qemu-img map)."""
    from vmferry.ops.inspect import map_image

    records = map_image(image, fmt, allowed_dirs=allow_dirs, force_share=force_share)
    if as_json:
        emit_json(records)
        return
    click.echo(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for r in records:
        if r["data"]:
            mapped = hex(r["offset"]) if "offset" in r else "-"
            click.echo(
                f"{hex(r['start']):<20}{hex(r['length']):<20}{mapped:<20}{r.get('file', '')}"
            )


@click.command(name="measure")
@click.option("-O", "out_fmt", required=True, help="Output format to measure for.")
@click.option("-f", "src_fmt", help="Source format (default: probed).")
@click.option("-o", "opts", multiple=True, help="Output options key=val.")
@click.option("--size", "size", help="Measure an empty image of this size instead of SRC.")
@share_options
@json_option
@click.argument("src", required=False, type=click.Path(dir_okay=False))
@handle_errors
def measure_cmd(
    src: str | None,
    out_fmt: str,
    src_fmt: str | None,
    opts: tuple[str, ...],
    size: str | None,
    allow_dirs: tuple[str, ...],
    force_share: bool,
    as_json: bool,
) -> None:
    """How many bytes converting SRC to -O FORMAT needs."""
    from vmferry.ops.measure import measure

    result = measure(
        src,
        out_fmt,
        size=parse_size(size) if size else None,
        src_format=src_fmt,
        options=parse_options(opts),
        allowed_dirs=allow_dirs,
        force_share=force_share,
    )
    if as_json:
        emit_json(result)
    else:
        click.echo(f"required size: {result['required']}")
        click.echo(f"fully allocated size: {result['fully-allocated']}")


@click.command(name="formats")
@json_option
@handle_errors
def formats_cmd(as_json: bool) -> None:
    """List the disk formats vmferry reads and writes, with their -o options."""
    from vmferry.disk import all_formats

    rows = [
        {
            "name": d.name,
            "aliases": list(d.aliases),
            "extensions": list(d.extensions),
            "writable": d.writable_format,
            "parents": d.supports_parent,
            "options": dict(d.create_options),
        }
        for d in all_formats()
    ]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        names = ", ".join([r["name"], *r["aliases"]])
        mode = "read/write" if r["writable"] else "read only"
        chain = ", differencing" if r["parents"] else ""
        click.echo(f"{names}  ({' '.join(r['extensions'])}; {mode}{chain})")
        for key, text in r["options"].items():
            click.echo(f"    -o {key}=  {text}")
