"""Crash safety: a writer SIGKILLed at a random instant leaves a consistent qcow2.

A child process allocates clusters (new data, overwrites, zeroing) through vmferry on an image
with 4 KiB clusters, each cluster touched at most once, and is killed after a random delay.
Afterwards ``qemu-img check`` must report no corruption (leaks are allowed: an allocation
whose L2 entry was not yet written), and every cluster must read as its old or its new
content, through vmferry and through qemu.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vmferry
from tests.conftest import REPO, qemu_img, require_tool
from vmferry.disk import BlockFile
from vmferry.disk.qcow2 import Qcow2

PLAN = r'''
import random, struct

CS = 4096
CLUSTERS = 2048  # an 8 MiB disk


def pattern(c: int, tag: int) -> bytes:
    return (struct.pack(">IB", c, tag) * (CS // 5 + 1))[:CS]


def old(c: int) -> bytes:
    return pattern(c, 1) if c % 2 == 0 else bytes(CS)  # even clusters start allocated


def plan(seed: int) -> list[tuple[str, int, int]]:
    """Disjoint (kind, first cluster, count) operations in a random order."""
    rnd = random.Random(seed)
    ops, c = [], 0
    while c < CLUSTERS:
        n = min(rnd.choice([1, 1, 1, 2, 3, 8, 17]), CLUSTERS - c)
        kind = rnd.choice(["write", "write", "write", "zero"])
        if kind == "zero" and n < 2:
            kind = "write"
        ops.append((kind, c, n))
        c += n
    rnd.shuffle(ops)
    return ops


def new(c: int, ops_by_cluster: dict) -> bytes:
    return pattern(c, 2) if ops_by_cluster[c] == "write" else bytes(CS)
'''

CHILD = (
    PLAN
    + r"""
import sys
import vmferry

path, seed, flush_each = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
with vmferry.open(path, "qcow2", writable=True) as disk:
    print("ready", flush=True)
    for kind, first, n in plan(seed):
        if kind == "write":
            disk.write(first * CS, b"".join(pattern(c, 2) for c in range(first, first + n)))
        else:
            disk.write_zeroes(first * CS, n * CS)
        if flush_each:  # publish every change: the kill lands inside commits more often
            disk.flush()
print("done", flush=True)
"""
)


def _namespace() -> dict:
    ns: dict = {}
    exec(PLAN, ns)
    return ns


@pytest.mark.parametrize("flush_each", [False, True], ids=["batched", "flush-each"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sigkill_during_allocation(tmp_path: Path, seed: int, flush_each: bool) -> None:
    require_tool("qemu-img")
    ns = _namespace()
    cs, clusters = ns["CS"], ns["CLUSTERS"]
    img = tmp_path / "k.qcow2"
    with vmferry.create(img, "qcow2", cs * clusters, cluster_size=str(cs)) as disk:
        for c in range(0, clusters, 2):
            disk.write(c * cs, ns["old"](c))
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    pythonpath = f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.Popen(
        [sys.executable, str(child), str(img), str(seed), str(int(flush_each))],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(random.Random(seed).uniform(0.05, 0.8))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    result = json.loads(
        qemu_img("check", "--output=json", "-f", "qcow2", str(img), check=False).stdout
    )
    assert result.get("corruptions", 0) == 0 and result.get("check-errors", 0) == 0, result
    layer = Qcow2.open(BlockFile.open(img))
    try:
        assert not layer.check().corruptions
    finally:
        layer.close()

    kinds = {c: kind for kind, first, n in ns["plan"](seed) for c in range(first, first + n)}
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(flat))
    qemu_view = flat.read_bytes()
    changed = 0
    with vmferry.open(img) as disk:
        ours = disk.read(0, cs * clusters)
    assert ours == qemu_view
    for c in range(clusters):
        got = ours[c * cs : (c + 1) * cs]
        old, new = ns["old"](c), ns["new"](c, kinds)
        assert got in (old, new), f"cluster {c} is neither old nor new content"
        changed += got != old
    # the image keeps working after the crash: more writes, and the check stays free of errors
    with vmferry.open(img, writable=True) as disk:
        disk.write(0, b"\x5a" * (3 * cs))
        assert disk.read(0, 3 * cs) == b"\x5a" * (3 * cs)
    result = json.loads(
        qemu_img("check", "--output=json", "-f", "qcow2", str(img), check=False).stdout
    )
    assert result.get("corruptions", 0) == 0, result
    print(f"seed {seed}: {changed} clusters changed before the kill")
