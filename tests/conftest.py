"""Shared fixtures: the third-party corpus and the external oracles.

Oracles (qemu-img, qemu-io, libvhdi) are real tools nobody here wrote.  Locally a missing oracle
skips its tests with the reason; under CI (CI=true) it is a failure, because .ci/run installs
them and a silently skipped oracle would hide a broken setup.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install qemu-utils)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(
    *args: str | os.PathLike[str], check: bool = True, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        input=input.decode() if input else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    require_tool("qemu-img")
    return run("qemu-img", *args, check=check)


def qemu_io(fmt: str, path: str | os.PathLike[str], *commands: str) -> None:
    """Run qemu-io commands (e.g. 'write -P 0xab 0 64k') against an image."""
    require_tool("qemu-io")
    argv: list[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    run(*argv, str(path))


def qemu_img_info(path: str | os.PathLike[str], fmt: str | None = None) -> dict:
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(qemu_img(*args, str(path)).stdout)


@pytest.fixture
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus is not present (a fresh clone): corpus tests skipped")
    return CORPUS


def unpack_corpus_file(src: Path, dest_dir: Path) -> Path:
    """Decompress a .bz2/.gz corpus sample into dest_dir (the corpus itself stays untouched)."""
    if src.suffix == ".bz2":
        out = dest_dir / src.stem
        out.write_bytes(bz2.decompress(src.read_bytes()))
    elif src.suffix == ".gz":
        out = dest_dir / src.stem
        out.write_bytes(gzip.decompress(src.read_bytes()))
    else:
        out = dest_dir / src.name
        shutil.copyfile(src, out)
    return out


@pytest.fixture
def ground_truth(corpus: Path) -> dict:
    return json.loads((corpus / "ground_truth.json").read_text())
