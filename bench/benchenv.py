"""What both benchmark scripts need to run vmferry the way a user's install runs it.

* The console script itself, not a version manager's shim in front of it (pyenv's shim is a
  shell script that costs more than vmferry's own start-up).
* Cached bytecode.  A package installed with pip has its modules compiled; an editable
  checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (as on the project's machine) compiles every
  module from source at every start, ~50-80 ms that no user pays.  vmferry runs here with
  that variable removed and its bytecode cached under the benchmark's work directory
  (``PYTHONPYCACHEPREFIX``, so the source tree stays clean), after a warm-up run.
* CPU time (user + sys of the child) beside wall time: on a shared machine wall time swings
  with the load, CPU time much less.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def vmferry_script() -> str:
    script = Path(sysconfig.get_path("scripts")) / "vmferry"
    return str(script) if script.exists() else "vmferry"


def vmferry_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def run_timed(
    cmd: list[str], env: dict[str, str] | None = None, *, check: bool = True
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, CPU seconds of the child, the finished process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if check and proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return wall, cpu, proc


def warm_up(env: dict[str, str], work: Path, formats: list[str]) -> None:
    """Fill the bytecode cache: start-up, and a tiny convert into and out of every format."""
    run_timed([vmferry_script(), "--help"], env)
    tiny = work / "warm-up.raw"
    with open(tiny, "wb") as f:
        f.truncate(1 << 20)
        f.write(b"\x01" * 4096)
    for fmt in formats:
        name = fmt.split("-")[0]
        out = work / f"warm-up-out.{name}"
        back = work / "warm-up-back.raw"
        run_timed(
            [vmferry_script(), "convert", "--no-progress", "-O", name, str(tiny), str(out)], env
        )
        run_timed(
            [vmferry_script(), "convert", "--no-progress", "-O", "raw", str(out), str(back)], env
        )
        out.unlink()
        back.unlink()
    tiny.unlink()
