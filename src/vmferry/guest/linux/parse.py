"""Parsers for the small text files inspection reads and the fix rules rewrite.

Each parser keeps line numbers and the exact span of every value, so a rule can replace one
token and leave every other byte of the file (comments, spacing, odd quoting) as it was.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class FstabEntry:
    line: int  # 0-based line number
    spec: str
    mountpoint: str
    type: str
    options: str
    freq: str
    passno: str
    spec_span: tuple[int, int]  # character span of the spec within its line


def unescape_fstab(field: str) -> str:
    r"""fstab encodes spaces and friends as octal escapes (``\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_fstab(text: str) -> list[FstabEntry]:
    """fstab/crypttab-shaped lines: whitespace-separated fields, ``#`` comments."""
    out: list[FstabEntry] = []
    for n, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [(m.group(0), m.span()) for m in re.finditer(r"\S+", line)]
        if fields[0][0].startswith("#"):
            continue
        vals = [unescape_fstab(f) for f, _ in fields] + [""] * 6
        out.append(
            FstabEntry(n, vals[0], vals[1], vals[2], vals[3], vals[4], vals[5], fields[0][1])
        )
    return out


@dataclass(frozen=True)
class CrypttabEntry:
    line: int
    name: str
    device: str
    keyfile: str
    options: str
    device_span: tuple[int, int]


def parse_crypttab(text: str) -> list[CrypttabEntry]:
    out: list[CrypttabEntry] = []
    for n, line in enumerate(text.splitlines()):
        if not line.strip() or line.strip().startswith("#"):
            continue
        fields = [(m.group(0), m.span()) for m in re.finditer(r"\S+", line)]
        if len(fields) < 2:
            continue
        vals = [f for f, _ in fields] + ["", ""]
        out.append(CrypttabEntry(n, vals[0], vals[1], vals[2], vals[3], fields[1][1]))
    return out


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines with shell quoting (os-release, lsb-release, /etc/default/grub)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[7:].strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        try:
            parts = shlex.split(value, comments=True)
        except ValueError:
            parts = [value.strip().strip("\"'")]
        out[key] = " ".join(parts)
    return out


@dataclass(frozen=True)
class KernelArg:
    key: str
    value: str | None
    span: tuple[int, int]  # span of the value (or of the key when there is no value)


def parse_cmdline(text: str, base: int = 0) -> list[KernelArg]:
    """Kernel command-line words ``key=value``; ``base`` offsets the spans into a larger line."""
    out: list[KernelArg] = []
    for m in re.finditer(r"[^\s\"']+(?:=(?:\"[^\"]*\"|'[^']*'|[^\s]*))?", text):
        word = m.group(0)
        key, eq, value = word.partition("=")
        if eq:
            start = m.start() + len(key) + 1
            out.append(KernelArg(key, value, (base + start, base + m.end())))
        else:
            out.append(KernelArg(key, None, (base + m.start(), base + m.end())))
    return out


BOOT_LINE = re.compile(
    r"^(?P<indent>\s*)(?P<cmd>kernel|linux|linux16|linuxefi|options|append|APPEND|kernelopts=)"
    r"(?P<rest>.*)$"
)
