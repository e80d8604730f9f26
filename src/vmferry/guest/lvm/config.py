"""The text format LVM2 writes its volume-group metadata in (libdm's config syntax).

A file is a list of ``key = value`` assignments and ``name { ... }`` sections; a value is a
quoted string, an integer, a float or a ``[ ... ]`` list of those; ``#`` starts a comment.
The metadata comes from a guest disk, so the parser is strict and bounded: the text size is
capped before anything is parsed, nesting depth is capped, a key given twice in one section is
refused (LVM never writes that, and picking one would be a guess), and every malformed token
raises :class:`LvmMetadataError` with its line number.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from vmferry.guest.errors import GuestLimitError
from vmferry.guest.lvm.errors import LvmMetadataError

#: Metadata text larger than this is refused (LVM's own default area is 1 MiB).
MAX_TEXT = 16 << 20
#: LVM metadata nests 4 deep (VG > logical_volumes > LV > segment); leave room, stay bounded.
MAX_DEPTH = 16

Scalar = str | int | float
Value = Scalar | list[Scalar]

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![A-Za-z0-9_.+-]))
  | (?P<word>[A-Za-z0-9_.+/:@-]+)
  | (?P<punct>[{}\[\]=,])
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass
class Section:
    """One ``name { ... }`` block: assignments and subsections in file order."""

    name: str
    values: dict[str, Value] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)
    line: int = 1

    def get(self, key: str, default: Value | None = None) -> Value | None:
        return self.values.get(key, default)

    def text(self, key: str, default: str | None = None) -> str:
        v = self.values.get(key, default)
        if not isinstance(v, str):
            raise LvmMetadataError(f"{self.name}: {key} must be a string (line {self.line})")
        return v

    def integer(self, key: str, default: int | None = None) -> int:
        v = self.values.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise LvmMetadataError(f"{self.name}: {key} must be an integer (line {self.line})")
        return v

    def array(self, key: str, default: list[Scalar] | None = None) -> list[Scalar]:
        v = self.values.get(key, default)
        if not isinstance(v, list):
            raise LvmMetadataError(f"{self.name}: {key} must be a list (line {self.line})")
        return v

    def strings(self, key: str) -> list[str]:
        """A list of strings such as ``status = ["READ", "WRITE"]`` (missing: empty)."""
        items = self.array(key, [])
        if not all(isinstance(i, str) for i in items):
            raise LvmMetadataError(f"{self.name}: {key} must list strings (line {self.line})")
        return [str(i) for i in items]

    def section(self, key: str) -> Section:
        s = self.sections.get(key)
        if s is None:
            raise LvmMetadataError(f"{self.name}: section {key!r} is missing")
        return s


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    pos, line, end = 0, 1, len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise LvmMetadataError(f"LVM metadata: unexpected {text[pos]!r} on line {line}")
        kind = m.lastgroup or ""
        value = m.group()
        if kind not in ("ws", "comment"):
            yield kind, value, line
        line += value.count("\n")
        pos = m.end()


def _unquote(raw: str, line: int) -> str:
    body = raw[1:-1]
    if "\\" not in body:
        return body
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body):
                raise LvmMetadataError(f"LVM metadata: dangling backslash on line {line}")
            out.append(body[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _number(raw: str, line: int) -> int | float:
    try:
        if raw.lstrip("+-")[:2] in ("0x", "0X"):
            return int(raw, 16)
        if any(c in raw for c in ".eE"):
            return float(raw)
        return int(raw, 10)
    except ValueError:
        raise LvmMetadataError(f"LVM metadata: bad number {raw!r} on line {line}") from None


def parse_config(text: str) -> Section:
    """Parse one metadata text into its root section (named ``""``)."""
    if len(text) > MAX_TEXT:
        raise GuestLimitError(f"LVM metadata text of {len(text)} bytes is over {MAX_TEXT}")
    text = text.split("\0", 1)[0]  # LVM ends the text with a NUL
    toks = list(_tokens(text))
    root = Section("", line=1)
    stack = [root]
    i = 0
    while i < len(toks):
        kind, value, line = toks[i]
        if kind == "punct" and value == "}":
            if len(stack) == 1:
                raise LvmMetadataError(f"LVM metadata: unbalanced '}}' on line {line}")
            stack.pop()
            i += 1
            continue
        if kind not in ("word", "number", "string"):
            raise LvmMetadataError(f"LVM metadata: expected a name, got {value!r} on line {line}")
        key = _unquote(value, line) if kind == "string" else value
        if i + 1 >= len(toks):
            raise LvmMetadataError(f"LVM metadata: {key!r} ends the text on line {line}")
        _, nxt, _ = toks[i + 1]
        here = stack[-1]
        if key in here.values or key in here.sections:
            raise LvmMetadataError(f"LVM metadata: {key!r} given twice (line {line})")
        if nxt == "{":
            if len(stack) > MAX_DEPTH:
                raise GuestLimitError(f"LVM metadata nests deeper than {MAX_DEPTH} (line {line})")
            sub = Section(key, line=line)
            here.sections[key] = sub
            stack.append(sub)
            i += 2
            continue
        if nxt != "=":
            raise LvmMetadataError(
                f"LVM metadata: expected '=' or '{{' after {key!r} (line {line})"
            )
        value_at = i + 2
        here.values[key], i = _value(toks, value_at, line)
    if len(stack) != 1:
        raise LvmMetadataError(f"LVM metadata: section {stack[-1].name!r} is never closed")
    return root


def _value(toks: list[tuple[str, str, int]], i: int, line: int) -> tuple[Value, int]:
    if i >= len(toks):
        raise LvmMetadataError(f"LVM metadata: missing value on line {line}")
    kind, value, line = toks[i]
    if kind == "punct" and value == "[":
        items: list[Scalar] = []
        i += 1
        while True:
            if i >= len(toks):
                raise LvmMetadataError(f"LVM metadata: list never closed (line {line})")
            kind, value, line = toks[i]
            if value == "]" and kind == "punct":
                return items, i + 1
            if items:
                if value != ",":
                    raise LvmMetadataError(f"LVM metadata: expected ',' in a list on line {line}")
                i += 1
                if i >= len(toks):
                    raise LvmMetadataError(f"LVM metadata: list never closed (line {line})")
                kind, value, line = toks[i]
            items.append(_scalar(kind, value, line))
            i += 1
    return _scalar(kind, value, line), i + 1


def _scalar(kind: str, value: str, line: int) -> Scalar:
    if kind == "string":
        return _unquote(value, line)
    if kind == "number":
        return _number(value, line)
    raise LvmMetadataError(f"LVM metadata: expected a value, got {value!r} on line {line}")
