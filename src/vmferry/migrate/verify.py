"""Verify what was written: re-read each output through vmferry's driver and check it.

Two independent questions: does the output hold exactly the content that was streamed (the
format-independent digest, recomputed from the output's own data runs), and is the file
structurally sound (the driver's ``check``, as ``vmferry check`` runs it)?  For an OVA the
manifest (SHA-256 of every member) is checked too, which proves the packed disks are the
verified ones byte for byte.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vmferry.chain import open_chain
from vmferry.disk.readahead import CACHED_CHUNK
from vmferry.errors import VmferryError
from vmferry.migrate.digest import BlockDigest, block_windows


def digest_output(path: Path, fmt: str, virtual_size: int) -> tuple[str, bool]:
    """(digest of the first ``virtual_size`` bytes, whether anything past them is non-zero).

    Azure's fixed VHD is rounded up to a whole MiB: its tail must read as zeros.  Block-aligned
    windows over the data (:func:`block_windows`) are read and hashed on two threads (reads and
    hashlib release the GIL); this thread only combines the block digests in order.
    """
    step = CACHED_CHUNK  # a window is hashed right after it is read: still in the CPU's cache
    with open_chain(path, fmt) as chain:
        d = BlockDigest(virtual_size)
        runs = [(e.offset, e.end) for e in chain.map() if e.data]
        pieces = block_windows(runs, chain.virtual_size, step)
        # a written output is one layer: read it directly (thread-safe like the old per-run reads)
        read = chain.layers[0].read if len(chain.layers) == 1 else chain.read

        def work(piece: tuple[int, int]) -> tuple[int, bytes, dict[int, bytes], bool]:
            pos, n = piece
            buf = read(pos, n)
            keep = max(0, min(n, virtual_size - pos))
            head = buf[:keep] if keep != n else buf
            return pos, head, d.hash_blocks(pos, head), keep == n or not buf[keep:].strip(b"\0")

        tail_clean = True
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="vmferry-verify") as pool:
            pending: deque[Future[tuple[int, bytes, dict[int, bytes], bool]]] = deque()
            it = iter(pieces)
            for piece in it:
                pending.append(pool.submit(work, piece))
                if len(pending) >= 3:
                    break
            while pending:
                pos, head, hashes, clean = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(work, nxt))
                if head:
                    d.update(pos, head, hashes)
                tail_clean = tail_clean and clean
        return d.hexdigest(), tail_clean


def check_output(path: Path, fmt: str) -> dict[str, Any]:
    from vmferry.ops.inspect import check_image

    try:
        report, _meta = check_image(path, fmt)
    except VmferryError as exc:
        return {"clean": False, "corruptions": [str(exc)], "leaks": [], "notes": []}
    return {
        "clean": report.clean,
        "corruptions": list(report.corruptions),
        "leaks": list(report.leaks),
        "notes": list(report.notes)[:20],
    }


def verify_disk(path: Path, fmt: str, expected: str, virtual_size: int) -> dict[str, Any]:
    digest, tail_clean = digest_output(path, fmt, virtual_size)
    check = check_output(path, fmt)
    return {
        "digest": digest,
        "digest_ok": digest == expected and tail_clean,
        "tail_zero": tail_clean,
        "check": check,
        "ok": digest == expected and tail_clean and check["clean"],
    }


def replan_guest(
    path: Path, fmt: str, target: str, firmware: str, controller: str | None = None
) -> dict[str, Any]:
    """Run the guest rules again on the output (for the boot controller the repair prepared):
    a repaired guest plans no change, no error."""
    from vmferry.guest.guest import open_guest
    from vmferry.guest.linux.fix import plan_guest

    try:
        with open_chain(path, fmt) as chain:
            plan = plan_guest(open_guest(chain), target, firmware=firmware, controller=controller)
    except VmferryError as exc:
        return {"bootable": False, "error": str(exc), "remaining_changes": []}
    return {
        "bootable": plan.bootable,
        "remaining_changes": [f"{c.rule}: {c.path}" for c in plan.changes],
        "errors": [f.message for f in plan.findings if f.severity == "error"],
    }
