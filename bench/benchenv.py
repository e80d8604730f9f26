"""What every benchmark script shares: how vmferry is run, and a method a noisy VM cannot fool.

Running vmferry the way a user's install runs it:

* The console script itself, not a version manager's shim in front of it (pyenv's shim is a
  shell script that costs more than vmferry's own start-up).
* Cached bytecode.  A package installed with pip has its modules compiled; an editable
  checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (as on the project's machine) compiles every
  module from source at every start, ~50-80 ms that no user pays.  vmferry runs here with
  that variable removed and its bytecode cached under the benchmark's work directory
  (``PYTHONPYCACHEPREFIX``, so the source tree stays clean), after a warm-up run.
* CPU time (user + sys of the child) beside wall time: on a shared machine wall time swings
  with the load, CPU time much less.

The method (why it is not "best of N"):

* **Settle.**  The project's machine is a Firecracker VM with free-page reporting: page-cache
  memory freed by one run (a deleted output) goes back to the host within ~2 s, and the next
  run that writes gigabytes faults it in from the host again.  The same ``qemu-img convert``
  took 0.9 s or 5.4 s depending only on how long ago the previous output was deleted, so
  before *every* timed command (vmferry or anchor alike) :func:`settle` deletes the previous
  outputs, syncs, and sleeps ``--settle`` seconds (default 4): every run then starts with the
  freed memory in the same state (handed back), whichever tool ran before it.
* **Paired rounds.**  :func:`run_rounds` runs every contender once per round, back to back,
  the order reversed every other round (so each tool goes first as often as the other, and a
  pair stays adjacent either way).  The headline number of a pair is :func:`paired_median`:
  the median over rounds of vmferry's time ÷ its anchor's time *in the same round*, which
  cancels the drift that moves both.  Best-of wall times and median CPU times are printed
  beside it, and so is the number of rounds and the range of the per-round ratios.
* **Machine line.**  :class:`Machine` records what the numbers were measured on (CPU model,
  cores, RAM, kernel, Python, qemu-img) and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: seconds to wait after deleting the previous outputs (free-page reporting returns them in ~2 s)
DEFAULT_SETTLE = 4.0


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


# --- the method: settle, paired rounds, paired median -------------------------------------


def add_method_args(ap: argparse.ArgumentParser, *, rounds: int = 3) -> None:
    """``--repeat`` (rounds) and ``--settle`` (seconds), spelled alike in every script."""
    ap.add_argument(
        "--repeat",
        type=int,
        default=rounds,
        metavar="ROUNDS",
        help=f"rounds; every contender runs once per round (default {rounds})",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE,
        metavar="SECONDS",
        help="sleep after deleting the previous outputs, before every timed command "
        f"(default {DEFAULT_SETTLE:g}; 0 disables)",
    )


def remove(path: Path) -> None:
    """Delete a file or a directory tree; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def settle(
    outputs: Iterable[Path], seconds: float, prepare: Callable[[], None] | None = None
) -> None:
    """Bring the machine to the same state before a timed command (see the module docstring).

    Deletes ``outputs``, runs ``prepare`` (e.g. a fresh copy of inputs a merge modifies),
    flushes every dirty page (``sync``: no writeback left over for the next command to pay),
    then sleeps so the memory the deletion freed has been handed back to the host.
    """
    for path in outputs:
        remove(path)
    if prepare is not None:
        prepare()
    os.sync()
    if seconds > 0:
        time.sleep(seconds)


@dataclass(frozen=True)
class Sample:
    """One timed run: wall seconds (output durable if the contender says so), CPU seconds."""

    wall: float
    cpu: float


@dataclass(frozen=True)
class Contender:
    """One timed command of a round.

    ``run`` times it and nothing else; ``outputs`` are deleted and ``prepare`` run (untimed,
    by :func:`settle`) before every run.
    """

    name: str
    run: Callable[[], Sample]
    outputs: tuple[Path, ...] = ()
    prepare: Callable[[], None] | None = None


def run_rounds(
    rounds: int, contenders: Sequence[Contender], settle_s: float
) -> dict[str, list[Sample]]:
    """Every contender once per round, settled before each run; samples by name, in round order.

    Round 0 runs them in the order given, round 1 in reverse, and so on: list a pair next to
    each other and it runs back to back with each member first in half the rounds.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, not {rounds}")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must differ: {names}")
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else reversed(contenders):
            settle(c.outputs, settle_s, c.prepare)
            samples[c.name].append(c.run())
    return samples


def paired_ratios(ours: Sequence[float], anchor: Sequence[float]) -> list[float]:
    """Per-round ratios ours[i] / anchor[i]; both series must come from the same rounds."""
    if len(ours) != len(anchor):
        raise ValueError(f"unpaired series: {len(ours)} against {len(anchor)} rounds")
    if not ours:
        raise ValueError("no rounds")
    if any(a <= 0 for a in anchor):
        raise ValueError("an anchor time is not positive: no ratio")
    return [o / a for o, a in zip(ours, anchor, strict=True)]


def paired_median(ours: Sequence[float], anchor: Sequence[float]) -> float:
    """Median over rounds of ours / anchor in the same round (< 1.0: ours is faster).

    A ratio per round, not a ratio of bests: a round's two runs share the machine's state (load,
    page cache, host memory), so the ratio cancels what moves both, and the median drops the
    rounds where something moved only one of them.
    """
    return statistics.median(paired_ratios(ours, anchor))


@dataclass(frozen=True)
class Pair:
    """vmferry against its anchor over the same rounds."""

    ours: list[Sample]
    anchor: list[Sample]

    @property
    def rounds(self) -> int:
        return len(self.ours)

    @property
    def ratio(self) -> float:
        """The headline: median per-round wall-time ratio ours / anchor."""
        return paired_median([s.wall for s in self.ours], [s.wall for s in self.anchor])

    @property
    def spread(self) -> tuple[float, float]:
        """Lowest and highest per-round ratio: how far to trust :attr:`ratio`."""
        ratios = paired_ratios([s.wall for s in self.ours], [s.wall for s in self.anchor])
        return min(ratios), max(ratios)

    @property
    def best_ours(self) -> float:
        return min(s.wall for s in self.ours)

    @property
    def best_anchor(self) -> float:
        return min(s.wall for s in self.anchor)

    @property
    def cpu_ours(self) -> float:
        return statistics.median(s.cpu for s in self.ours)

    @property
    def cpu_anchor(self) -> float:
        return statistics.median(s.cpu for s in self.anchor)

    def ratio_cell(self) -> str:
        """``0.85 (0.80-0.92)``: the median ratio and the per-round range (one round: alone)."""
        low, high = self.spread
        return (
            f"{self.ratio:.2f}" if self.rounds == 1 else f"{self.ratio:.2f} ({low:.2f}-{high:.2f})"
        )


def best(samples: Sequence[Sample]) -> float:
    return min(s.wall for s in samples)


def median_cpu(samples: Sequence[Sample]) -> float:
    return statistics.median(s.cpu for s in samples)


def method_line(rounds: int, settle_s: float) -> str:
    """How to read the numbers that follow (printed by every script)."""
    pause = f"settled {settle_s:g} s before every run" if settle_s > 0 else "no settle pause"
    return (
        f"{rounds} round{'s' if rounds != 1 else ''}, tools alternating first, {pause}; "
        "ratio = median over rounds of vmferry ÷ anchor in the same round (range in brackets), "
        "s = best wall time, cpu = median user + sys"
    )


# --- the machine line ----------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return "not installed"
    return out.splitlines()[0] if out else "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class Machine:
    """What the numbers were measured on, captured when a benchmark starts."""

    cpu: str
    arch: str
    cores: int
    ram: int
    kernel: str
    python: str
    qemu_img: str
    load_start: float
    extra: tuple[str, ...] = field(default=())

    @classmethod
    def capture(cls, *extra_tools: list[str]) -> Machine:
        """Now; ``extra_tools`` are version commands whose first line joins the line."""
        return cls(
            cpu=_cpu_model(),
            arch=platform.machine(),
            cores=os.cpu_count() or 0,
            ram=_ram_bytes(),
            kernel=platform.release(),
            python=platform.python_version(),
            qemu_img=_first_line(["qemu-img", "--version"]),
            load_start=os.getloadavg()[0],
            extra=tuple(_first_line(argv) for argv in extra_tools),
        )

    def line(self, *, end: bool = False) -> str:
        """One line; with ``end`` the load average now is added beside the one at the start."""
        load = f"load average {self.load_start:.2f} at start"
        if end:
            load += f", {os.getloadavg()[0]:.2f} at end"
        tools = ", ".join((self.qemu_img, *self.extra))
        return (
            f"{self.cpu} ({self.arch}), {self.cores} cores, {self.ram / (1 << 30):.1f} GiB RAM, "
            f"Linux {self.kernel}, Python {self.python}, {tools}; {load}"
        )


def command_line() -> str:
    """The command that is running, as a reader would retype it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return shlex.join(["python3", str(script), *sys.argv[1:]])


# --- tables --------------------------------------------------------------------------------


class Table:
    """A markdown table printed row by row as it is measured, and whole at the end.

    Live rows go to stdout, or to stderr with ``markdown`` (stdout then holds only the
    BENCHMARKS.md-ready block the script prints at the end with :meth:`markdown`).
    """

    def __init__(self, headers: Sequence[str], *, markdown: bool = False) -> None:
        self.headers = list(headers)
        self.rows: list[list[str]] = []
        self._live = sys.stderr if markdown else sys.stdout
        print(self._row(self.headers), self._rule(), sep="\n", file=self._live, flush=True)

    def add(self, *cells: str) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"{len(cells)} cells for {len(self.headers)} columns")
        self.rows.append(list(cells))
        print(self._row(cells), file=self._live, flush=True)

    def markdown(self) -> str:
        return "\n".join([self._row(self.headers), self._rule(), *map(self._row, self.rows)])

    @staticmethod
    def _row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def _rule(self) -> str:
        return "|" + "---|" * len(self.headers)
