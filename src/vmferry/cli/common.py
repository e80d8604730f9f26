"""What every command shares: sizes, -o options, JSON or human output, errors, progress."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click

from vmferry.errors import UsageError, VmferryError

P = ParamSpec("P")
R = TypeVar("R")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int:
    """qemu-img's size syntax: bytes, or a number with K/M/G/T/P/E (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r}", hint="use bytes or a suffix: 512M, 10G, 1.5T")
    number, unit = m.group(1), m.group(2).lower()
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if value != int(value):
        raise UsageError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_options(values: tuple[str, ...]) -> dict[str, str]:
    """``-o a=1,b=2 -o c=3`` → {"a": "1", "b": "2", "c": "3"} (qemu-img's -o)."""
    out: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise UsageError(f"option {item!r} needs a value (key=value)")
            out[key.strip()] = val.strip()
    return out


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a VmferryError into one clear line (or a JSON object) and its exit code."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        as_json = bool(kwargs.get("as_json"))
        try:
            return func(*args, **kwargs)
        except VmferryError as exc:
            if as_json:
                emit_json(exc.to_json())
            else:
                click.echo(f"vmferry: error: {exc}", err=True)
                if exc.hint:
                    click.echo(f"vmferry: hint: {exc.hint}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("vmferry: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(141)

    return wrapper


class RichProgress:
    """A rich progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int, description: str) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def progress_option(func: Callable[P, R]) -> Callable[P, R]:
    return click.option(
        "-p/--no-progress",
        "--progress",
        "progress",
        default=None,
        help="Show a progress bar (default: only on an interactive terminal).",
    )(func)


def json_option(func: Callable[P, R]) -> Callable[P, R]:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(
        func
    )


def share_options(func: Callable[P, R]) -> Callable[P, R]:
    func = click.option(
        "-U",
        "--force-share",
        is_flag=True,
        help="Read an image even if a running VM holds it (data may be inconsistent).",
    )(func)
    func = click.option(
        "--allow-dir",
        "allow_dirs",
        multiple=True,
        type=click.Path(file_okay=False),
        help="Directory where parents may be opened (repeatable; default: the image's own "
        "directory tree).",
    )(func)
    return func
