"""The htree name hash against e2fsprogs' own (``debugfs -R "dx_hash -h N -s SEED NAME"``)."""

from __future__ import annotations

import random
import subprocess
import uuid

import pytest

from tests.conftest import require_tool
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.fs.ext_hash import FLAGS_UNSIGNED_HASH, effective_version, name_hash

_rnd = random.Random(11)
NAMES = [b"a", b"hello", b"x" * 255, "café-ünïcode".encode(), bytes([0xFF, 0x80, 0x7F, 0x41])]
ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789._-\xc3\xa9\xe2\x82\xac"
NAMES += [
    bytes(_rnd.choice(ALPHABET) for _ in range(n))
    for n in (1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 64, 100)
]
SEEDS = [uuid.UUID(int=0), uuid.UUID("6f1b8a5e-4c3d-4e2f-9a10-b2c3d4e5f607")]


def _debugfs_hash(name: bytes, version: int, seed: uuid.UUID) -> int:
    cmd = [b"debugfs", b"-R", f"dx_hash -h {version} -s {seed} -- ".encode() + name]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout.decode("latin-1")
    return int(out.split(" is ")[1].split()[0], 16)


@pytest.mark.parametrize("version", range(6))  # legacy, half_md4, tea, each signed/unsigned
@pytest.mark.parametrize("seed", SEEDS, ids=["default-seed", "seed"])
def test_hash_matches_e2fsprogs(version: int, seed: uuid.UUID) -> None:
    require_tool("debugfs")
    for name in NAMES:
        assert name_hash(name, version, seed.bytes) == _debugfs_hash(name, version, seed), name


def test_unsigned_flag_selects_the_unsigned_flavour() -> None:
    assert effective_version(1, FLAGS_UNSIGNED_HASH) == 4
    assert effective_version(1, 0) == 1
    assert effective_version(4, 0) == 4


def test_unknown_hash_version_is_refused() -> None:
    with pytest.raises(GuestWriteRefusedError, match="hash version 7"):
        name_hash(b"x", 7, bytes(16))
