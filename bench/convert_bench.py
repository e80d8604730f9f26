#!/usr/bin/env python3
"""vmferry convert against qemu-img convert on the same inputs, in one run.

A disk of --size (default 4 GiB) is half filled with random data (alternating 32 MiB runs of
data and holes; with --data text, compressible text instead) as raw and every other format of
--formats (made by qemu-img); every pair is converted by both tools in --repeat rounds, and
each pair's ratio vmferry ÷ qemu-img (< 1.0: vmferry is faster) is printed twice, like for like:

* synced: vmferry (which makes its output durable before renaming it into place) against
  qemu-img followed by an fsync of its output (``sync FILE``);
* unsynced: ``vmferry convert --no-sync`` against bare qemu-img (whose default cache mode for
  convert, "unsafe", returns with the data in the page cache).

The ratio is the median over rounds of the two tools' times *in the same round*, each run
preceded by a settle pause (--settle; see benchenv.py for why best-of-N alone compares luck on
this VM).  Best wall times and median CPU seconds (user + sys) are printed beside it.  With
--qemu-direct a column adds ``qemu-img convert -t none`` + fsync (qemu-img's own O_DIRECT output
mode) and vmferry's synced time against it: informative only, the targets stay against
qemu-img's default mode.  A second table times an empty 100 GiB dynamic disk, where time must
follow allocated data.  vmferry runs with its bytecode cached, as an installed package does.

Random data does not compress: qemu-img and vmferry store such clusters and grains plain even
in a compressed output, so reading those back is an ordinary copy.  --data text makes reading
a compressed source (qcow2-zlib, vmdk-stream) inflate-bound, and counts those pairs with the
compressed outputs (target: at least 1.5 times faster than qemu-img).

    python3 bench/convert_bench.py --size 4G --repeat 5 --via-raw \\
        --formats raw,vhd,vhdx,qcow2,vdi,vmdk --qemu-direct --markdown
    python3 bench/convert_bench.py --size 64M --repeat 2 --settle 0.5 --via-raw \\
        --formats raw,qcow2                                   # a quick check that it runs
    python3 bench/convert_bench.py --size 4G --via-raw --data text --skip-empty \
        --formats raw,qcow2-zlib,vmdk-stream                  # compressed reads, inflate-bound
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchenv import (
    Contender,
    Machine,
    Pair,
    Sample,
    Table,
    add_method_args,
    best,
    command_line,
    median_cpu,
    method_line,
    run_rounds,
    run_timed,
    vmferry_env,
    vmferry_script,
    warm_up,
)


@dataclass(frozen=True)
class Variant:
    """One output kind, spelled for both tools."""

    ext: str
    qemu_fmt: str
    qemu_args: tuple[str, ...]
    ours_fmt: str
    ours_args: tuple[str, ...] = ()


VARIANTS = {
    "raw": Variant(".raw", "raw", (), "raw"),
    "vhd": Variant(".vhd", "vpc", ("-o", "subformat=dynamic"), "vhd"),
    "vhdx": Variant(".vhdx", "vhdx", ("-o", "subformat=dynamic"), "vhdx"),
    "vmdk": Variant(".vmdk", "vmdk", ("-o", "subformat=monolithicSparse"), "vmdk"),
    "vmdk-stream": Variant(
        ".vmdk",
        "vmdk",
        ("-o", "subformat=streamOptimized"),
        "vmdk",
        ("-o", "subformat=streamOptimized"),
    ),
    "qcow2": Variant(".qcow2", "qcow2", (), "qcow2"),
    "qcow2-zlib": Variant(".qcow2", "qcow2", ("-c",), "qcow2", ("-o", "compress=on")),
    "vdi": Variant(".vdi", "vdi", (), "vdi"),
}
#: outputs whose time is compression-bound: the target there is >= 1.5x faster than qemu-img
COMPRESSED = {"vmdk-stream", "qcow2-zlib"}
RUN = 32 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def text_block(n: int) -> bytes:
    """``n`` bytes that deflate to about 45 % (words of a small alphabet, in random order):
    data on which reading a compressed disk is bound by inflating, like a guest's files."""
    rnd = random.Random(n)
    words = [bytes(rnd.choices(b"etaoinshrdlucmfw", k=rnd.randrange(2, 9))) for _ in range(4096)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choices(words, k=4096)) + b"\n"
    return bytes(out[:n])


def make_raw(path: Path, size: int, data: str) -> None:
    """Half of ``size`` in data runs: fresh random bytes, or (``text``) one compressible block
    written over and over (deflate looks back 32 KiB, so repeating it saves nothing)."""
    block = text_block(8 << 20) if data == "text" else b""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * RUN):
            f.seek(off)
            remaining = min(RUN, size - off)
            while remaining:
                n = min(remaining, 8 << 20)
                f.write(block[:n] if block else os.urandom(n))
                remaining -= n


#: environment of vmferry runs (cached bytecode); set in main
VMFERRY_ENV: dict[str, str] | None = None


def contender(name: str, cmd: list[str], out: Path, durable: bool) -> Contender:
    """``cmd`` writing ``out``; with ``durable`` the time runs until ``out`` is fsync'd.

    vmferry syncs its output before renaming it into place; qemu-img convert returns with the
    data still in the page cache.  The fair anchor for "the copy is safe" is qemu-img followed
    by an fsync of its output (coreutils ``sync FILE``), printed beside qemu-img alone.  The CPU
    time is the tool's own (the fsync's writeback runs in kernel threads, not in ``sync``).
    """
    env = VMFERRY_ENV if cmd[0] == vmferry_script() else None

    def run() -> Sample:
        wall, cpu, _ = run_timed(cmd, env)
        if durable:
            wall += run_timed(["sync", str(out)])[0]
        return Sample(wall, cpu)

    return Contender(name, run, outputs=(out,))


def qemu_cmd(src: Path, sname: str, dst: Path, dname: str, *, direct: bool = False) -> list[str]:
    sv, dv = VARIANTS[sname], VARIANTS[dname]
    return [
        "qemu-img",
        "convert",
        *(["-t", "none"] if direct else []),
        "-f",
        sv.qemu_fmt,
        "-O",
        dv.qemu_fmt,
        *dv.qemu_args,
        str(src),
        str(dst),
    ]


def vmferry_cmd(src: Path, sname: str, dst: Path, dname: str, *, sync: bool = True) -> list[str]:
    sv, dv = VARIANTS[sname], VARIANTS[dname]
    return [
        vmferry_script(),
        "convert",
        "--no-progress",
        *([] if sync else ["--no-sync"]),
        "-f",
        sv.ours_fmt,
        "-O",
        dv.ours_fmt,
        *dv.ours_args,
        str(src),
        str(dst),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="4G")
    add_method_args(ap, rounds=3)
    ap.add_argument("--formats", default="raw,vhd,vhdx", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument(
        "--via-raw",
        action="store_true",
        help="only raw -> X and X -> raw (instead of every pair)",
    )
    ap.add_argument(
        "--qemu-direct",
        action="store_true",
        help="add qemu-img convert -t none (O_DIRECT output) + fsync, informative",
    )
    ap.add_argument(
        "--data",
        choices=("random", "text"),
        default="random",
        help="what the data runs hold: random bytes (default), or compressible text, on "
        "which reading a compressed source is inflate-bound (and counted as such)",
    )
    ap.add_argument("--skip-empty", action="store_true", help="no empty 100 GiB table")
    ap.add_argument("--markdown", action="store_true", help="print a BENCHMARKS.md-ready block")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    size = parse_size(args.size)
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in VARIANTS]
    if unknown:
        sys.exit(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for tool in ("qemu-img", vmferry_script()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run scripts/install-deps first")
    machine = Machine.capture()
    work = Path(args.dir or tempfile.mkdtemp(prefix="vmferry-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    global VMFERRY_ENV
    VMFERRY_ENV = vmferry_env(work)
    warm_up(VMFERRY_ENV, work, formats)
    live = sys.stderr if args.markdown else sys.stdout
    method = method_line(args.repeat, args.settle)
    kind = "random" if args.data == "random" else "compressible text"
    what = f"input: {size >> 20} MiB virtual, half {kind} data in {RUN >> 20} MiB runs"
    print(f"machine: {machine.line()}\n{what}\n{method}\n", file=live, flush=True)

    sources: dict[str, Path] = {}
    raw = work / "src.raw"
    make_raw(raw, size, args.data)
    sources["raw"] = raw
    for fmt in formats:
        if fmt != "raw":
            p = work / f"src-{fmt}{VARIANTS[fmt].ext}"
            subprocess.run(qemu_cmd(raw, "raw", p, fmt), check=True)
            sources[fmt] = p

    headers = [
        "source",
        "target",
        "qemu-img + fsync s",
        "vmferry s (synced)",
        "ratio synced",
        "qemu-img s",
        "vmferry --no-sync s",
        "ratio unsynced",
        "qemu-img cpu s",
        "vmferry --no-sync cpu s",
        "cpu ratio",
    ]
    if args.qemu_direct:
        headers += ["qemu-img -t none + fsync s", "vmferry ÷ -t none"]
    table = Table(headers, markdown=args.markdown)
    worst = worst_unsynced = worst_compressed = 0.0
    pairs = [(a, b) for a in formats for b in formats if not (a == b == "raw")]
    if args.via_raw:
        pairs = [(a, b) for a, b in pairs if "raw" in (a, b)]
    for sfmt, dfmt in pairs:
        src, out = sources[sfmt], work / f"out{VARIANTS[dfmt].ext}"
        # the synced pair and the unsynced pair each adjacent, vmferry synced between its two
        # anchors: reversing the order every other round keeps all of them back to back
        contenders = [
            contender("qemu-img + fsync", qemu_cmd(src, sfmt, out, dfmt), out, True),
            contender("vmferry", vmferry_cmd(src, sfmt, out, dfmt), out, False),
            *(
                [
                    contender(
                        "qemu-img -t none + fsync",
                        qemu_cmd(src, sfmt, out, dfmt, direct=True),
                        out,
                        True,
                    )
                ]
                if args.qemu_direct
                else []
            ),
            contender("qemu-img", qemu_cmd(src, sfmt, out, dfmt), out, False),
            contender(
                "vmferry --no-sync", vmferry_cmd(src, sfmt, out, dfmt, sync=False), out, False
            ),
        ]
        runs = run_rounds(args.repeat, contenders, args.settle)
        synced = Pair(runs["vmferry"], runs["qemu-img + fsync"])
        unsynced = Pair(runs["vmferry --no-sync"], runs["qemu-img"])
        if dfmt in COMPRESSED or (sfmt in COMPRESSED and args.data == "text"):
            worst_compressed = max(worst_compressed, synced.ratio, unsynced.ratio)
        else:
            worst = max(worst, synced.ratio)
            worst_unsynced = max(worst_unsynced, unsynced.ratio)
        cells = [
            sfmt,
            dfmt,
            f"{synced.best_anchor:.2f}",
            f"{synced.best_ours:.2f}",
            synced.ratio_cell(),
            f"{unsynced.best_anchor:.2f}",
            f"{unsynced.best_ours:.2f}",
            unsynced.ratio_cell(),
            f"{unsynced.cpu_anchor:.2f}",
            f"{unsynced.cpu_ours:.2f}",
            f"{unsynced.cpu_ours / unsynced.cpu_anchor:.2f}" if unsynced.cpu_anchor else "-",
        ]
        if args.qemu_direct:
            direct = Pair(runs["vmferry"], runs["qemu-img -t none + fsync"])
            cells += [f"{direct.best_anchor:.2f}", direct.ratio_cell()]
        table.add(*cells)
        out.unlink(missing_ok=True)
    summary = (
        [
            f"worst ratio, both synced: {worst:.2f} (target <= 1.0)",
            f"worst ratio, neither synced: {worst_unsynced:.2f} (target <= 1.0)",
        ]
        if worst
        else []
    )
    if worst_compressed:
        summary.append(f"worst compression-bound ratio: {worst_compressed:.2f} (target <= 0.67)")
    print("\n" + "\n".join(summary) + "\n", file=live, flush=True)

    empty_table = None
    empty_formats = [f for f in formats if f != "raw" and f not in COMPRESSED]
    if empty_formats and not args.skip_empty:
        empty_table = Table(
            [
                "empty 100 GiB dynamic",
                "target",
                "qemu-img s",
                "vmferry s",
                "ratio",
                "qemu-img cpu s",
                "vmferry cpu s",
            ],
            markdown=args.markdown,
        )
        for fmt in empty_formats:
            empty = work / f"empty{VARIANTS[fmt].ext}"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", VARIANTS[fmt].qemu_fmt, str(empty), "100G"],
                check=True,
            )
            for dfmt in ("raw", fmt) if args.via_raw else formats:
                out = work / f"out{VARIANTS[dfmt].ext}"
                runs = run_rounds(
                    args.repeat,
                    [
                        contender("qemu-img", qemu_cmd(empty, fmt, out, dfmt), out, False),
                        contender("vmferry", vmferry_cmd(empty, fmt, out, dfmt), out, False),
                    ],
                    args.settle,
                )
                pair = Pair(runs["vmferry"], runs["qemu-img"])
                empty_table.add(
                    fmt,
                    dfmt,
                    f"{best(runs['qemu-img']):.2f}",
                    f"{best(runs['vmferry']):.2f}",
                    pair.ratio_cell(),
                    f"{median_cpu(runs['qemu-img']):.2f}",
                    f"{median_cpu(runs['vmferry']):.2f}",
                )
                out.unlink(missing_ok=True)
            empty.unlink()
    if args.markdown:
        blocks = [
            f"`{command_line()}`",
            f"Machine: {machine.line(end=True)}.",
            f"Input: {what.removeprefix('input: ')}; {method}.",
            table.markdown(),
            "\n".join(f"* {line}" for line in summary),
        ]
        if empty_table is not None:
            blocks.append("Empty 100 GiB dynamic disk (time must follow allocated data):")
            blocks.append(empty_table.markdown())
        print("\n\n".join(blocks))
    else:
        print(f"\nmachine at end: {machine.line(end=True)}")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
