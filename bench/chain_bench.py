#!/usr/bin/env python3
"""Snapshot-chain tools against qemu-img on the same inputs, in one run (issue 4).

(a) Merge: a child holding --child-size (default 1 GiB) of changed data over a --size
    (default 4 GiB) base that is half full, for qcow2 and VMDK.  ``vmferry merge CHILD``
    against ``qemu-img commit CHILD`` followed by an fsync of the base (vmferry's merge returns
    only once the base is on disk; bare ``qemu-img commit`` is printed beside it), in --repeat
    rounds, every run on a fresh copy of the same inputs and after a settle pause (--settle,
    see benchenv.py).  The ratio is the median over rounds of vmferry ÷ qemu-img commit + fsync
    in the same round.  The inputs are made by qemu-img/qemu-io, so neither tool merges files
    it wrote itself.  A vmferry run with a child a quarter that size shows whether time follows
    the child's allocated data (it should: target <= 1.0x and linear).
(b) Discovery: ``vmferry chain --json`` and ``vmferry du --json`` on a folder of --images
    small images (chains of --chain-len, formats mixed), best of --repeat (target < 2 s).

vmferry runs with its bytecode cached, as an installed package does (see benchenv.py).

    python3 bench/chain_bench.py --size 4G --child-size 1G --repeat 5 --markdown  # the issue's
    python3 bench/chain_bench.py --size 64M --child-size 16M --repeat 2 --settle 0.5 \\
        --images 50                                           # a quick check that it runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
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
)

QEMU_NAME = {"qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vhd": "vpc", "vdi": "vdi"}
EXT = {"qcow2": ".qcow2", "vmdk": ".vmdk", "vhdx": ".vhdx", "vhd": ".vhd", "vdi": ".vdi"}
RUN = 32 << 20  # data is written in runs of this size, one run in every two (half full)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


#: environment of vmferry runs (cached bytecode, see benchenv.py); set in main
VMFERRY_ENV: dict[str, str] | None = None


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = VMFERRY_ENV if cmd[0] == vmferry_script() else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc


def _vmferry() -> list[str]:
    return [vmferry_script()]


def qemu_io_writes(fmt: str, path: Path, spans: list[tuple[int, int]], pattern: int) -> None:
    """Write a byte pattern over ``spans`` with qemu-io (one process, many commands)."""
    cmd = ["qemu-io", "-f", QEMU_NAME[fmt]]
    for off, length in spans:
        pos = off
        while pos < off + length:
            n = min(RUN, off + length - pos)
            cmd += ["-c", f"write -q -P {pattern} {pos} {n}"]
            pos += n
    cmd.append(str(path))
    run(cmd)


def make_merge_inputs(work: Path, fmt: str, size: int, child_bytes: int, tag: str) -> Path:
    """base (half full, random data) + a child with ``child_bytes`` changed, made by qemu."""
    raw = work / "base-src.raw"
    if not raw.exists():
        with open(raw, "wb") as f:
            f.truncate(size)
            for off in range(0, size, 2 * RUN):
                f.seek(off)
                f.write(os.urandom(min(RUN, size - off)))
    ext = EXT[fmt]
    base, child = work / f"{tag}-base{ext}", work / f"{tag}-child{ext}"
    q = QEMU_NAME[fmt]
    run(["qemu-img", "convert", "-f", "raw", "-O", q, str(raw), str(base)])
    run(["qemu-img", "create", "-q", "-f", q, "-b", base.name, "-F", q, str(child)])
    # the child's data half overlaps the base's: runs every 2 RUN, shifted by RUN / 2
    spans, left, off = [], child_bytes, RUN // 2
    while left > 0 and off < size:
        n = min(RUN, left, size - off)
        spans.append((off, n))
        left -= n
        off += 2 * RUN
    if left > 0:
        sys.exit(f"--child-size is larger than half of --size; nothing written for {left} bytes")
    qemu_io_writes(fmt, child, spans, 0xA5)
    return child


def fresh_copy(child: Path, dest: Path) -> Path:
    """A copy of base + child in ``dest`` (same names: the child names its base relatively)."""
    remove_tree(dest)
    dest.mkdir()
    base = child.with_name(child.name.replace("-child", "-base"))
    for p in (base, child):
        run(["cp", "--sparse=always", str(p), str(dest / p.name)])
    return dest / child.name


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def merge_contender(name: str, tool: str, child: Path, fmt: str, durable: bool) -> Contender:
    """A merge of a fresh copy of ``child`` (made untimed, before the settle pause) into its
    base; with ``durable`` the time runs until the base is fsync'd."""
    copy_dir = child.parent / "run"
    copy = copy_dir / child.name
    base = copy.with_name(copy.name.replace("-child", "-base"))
    if tool == "qemu-img":
        cmd = ["qemu-img", "commit", "-q", "-f", QEMU_NAME[fmt], str(copy)]
    else:
        cmd = [*_vmferry(), "merge", "--no-progress", str(copy)]
    env = VMFERRY_ENV if tool == "vmferry" else None

    def timed() -> Sample:
        wall, cpu, _ = run_timed(cmd, env)
        if durable:
            wall += run_timed(["sync", str(base)])[0]
        return Sample(wall, cpu)

    return Contender(name, timed, outputs=(copy_dir,), prepare=lambda: fresh_copy(child, copy_dir))


def make_folder(folder: Path, images: int, chain_len: int, formats: list[str]) -> None:
    """``images`` small images as chains of ``chain_len``, formats taking turns per chain."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import vmferry

    folder.mkdir(parents=True)
    for c in range(images // chain_len):
        fmt = formats[c % len(formats)]
        sub = folder / f"vm{c:03d}"
        sub.mkdir()
        paths = [sub / f"disk{c:03d}-{i:02d}{EXT[fmt]}" for i in range(chain_len)]
        for i, p in enumerate(paths):
            disk = vmferry.create(p, fmt, 16 << 20 if i == 0 else None, paths[i - 1] if i else None)
            with disk:
                disk.write((i * 1 << 20) % (16 << 20), bytes([i + 1]) * 4096)


def best_cli(cmd: list[str], repeat: int) -> float:
    return min(run_timed(cmd, VMFERRY_ENV)[0] for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="4G", help="virtual size of the merge base")
    ap.add_argument("--child-size", default="1G", help="changed data in the merged child")
    add_method_args(ap, rounds=3)
    ap.add_argument("--formats", default="qcow2,vmdk", help="formats of the merge table")
    ap.add_argument("--images", type=int, default=1000, help="images in the discovery folder")
    ap.add_argument("--chain-len", type=int, default=10)
    ap.add_argument("--folder-formats", default="qcow2,vhdx,vmdk,vhd,vdi")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--skip-folder", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print a BENCHMARKS.md-ready block")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    size, child_bytes = parse_size(args.size), parse_size(args.child_size)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run scripts/install-deps first")
    machine = Machine.capture()
    work = Path(args.dir or tempfile.mkdtemp(prefix="vmferry-chain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    global VMFERRY_ENV
    VMFERRY_ENV = vmferry_env(work)
    run([*_vmferry(), "--help"])  # fills the bytecode cache before anything is timed
    live = sys.stderr if args.markdown else sys.stdout
    print(f"machine: {machine.line()}", file=live, flush=True)
    blocks = [f"`{command_line()}`"]
    if not args.skip_merge:
        what = (
            f"merge: {child_bytes >> 20} MiB changed in the child, base {size >> 20} MiB "
            f"virtual and half full"
        )
        method = method_line(args.repeat, args.settle)
        print(f"\n{what}\n{method}\n", file=live, flush=True)
        table = Table(
            [
                "format",
                "qemu-img commit s",
                "+ fsync s",
                "vmferry merge s",
                "ratio",
                "qemu-img cpu s",
                "vmferry cpu s",
                "vmferry, child / 4 s",
                "s per GiB: full / quarter",
            ],
            markdown=args.markdown,
        )
        worst = 0.0
        for fmt in args.formats.split(","):
            full = make_merge_inputs(work, fmt, size, child_bytes, f"{fmt}-full")
            quarter = make_merge_inputs(work, fmt, size, child_bytes // 4, f"{fmt}-quarter")
            # the headline pair (commit + fsync, merge) adjacent: back to back in every round
            runs = run_rounds(
                args.repeat,
                [
                    merge_contender("commit", "qemu-img", full, fmt, False),
                    merge_contender("commit + fsync", "qemu-img", full, fmt, True),
                    merge_contender("merge", "vmferry", full, fmt, False),
                    merge_contender("merge quarter", "vmferry", quarter, fmt, False),
                ],
                args.settle,
            )
            remove_tree(work / "run")
            for p in work.glob(f"{fmt}-*"):
                p.unlink()
            pair = Pair(runs["merge"], runs["commit + fsync"])
            worst = max(worst, pair.ratio)
            v4 = best(runs["merge quarter"])
            gib = child_bytes / (1 << 30)
            table.add(
                fmt,
                f"{best(runs['commit']):.2f}",
                f"{pair.best_anchor:.2f}",
                f"{pair.best_ours:.2f}",
                pair.ratio_cell(),
                f"{median_cpu(runs['commit + fsync']):.2f}",
                f"{pair.cpu_ours:.2f}",
                f"{v4:.2f}",
                f"{pair.best_ours / gib:.2f} / {v4 / (gib / 4):.2f}",
            )
        summary = f"worst ratio against qemu-img commit + fsync: {worst:.2f} (target <= 1.0)"
        print(f"\n{summary}", file=live, flush=True)
        blocks += [f"{what[0].upper()}{what[1:]}; {method}.", table.markdown(), f"* {summary}"]
    if not args.skip_folder:
        folder = work / "folder"
        remove_tree(folder)
        start = time.perf_counter()
        make_folder(folder, args.images, args.chain_len, args.folder_formats.split(","))
        made = time.perf_counter() - start
        count = sum(1 for _ in folder.rglob("*") if _.is_file())
        what = (
            f"folder: {count} images in chains of {args.chain_len} "
            f"({args.folder_formats}), made in {made:.1f} s; best of {args.repeat}"
        )
        print(f"\n{what}\n", file=live, flush=True)
        table = Table(["command", "s", "target"], markdown=args.markdown)
        for sub in ("chain", "du"):
            t = best_cli([*_vmferry(), sub, "--json", str(folder)], args.repeat)
            table.add(f"vmferry {sub} --json", f"{t:.2f}", "< 2 s")
        blocks += [f"{what[0].upper()}{what[1:]}.", table.markdown()]
    if args.markdown:
        blocks.insert(1, f"Machine: {machine.line(end=True)}.")
        print("\n\n".join(blocks))
    else:
        print(f"\nmachine at end: {machine.line(end=True)}")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
