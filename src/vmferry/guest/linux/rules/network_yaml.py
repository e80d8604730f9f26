"""A reader for the block-style YAML subset netplan files are written in, with line numbers.

vmferry edits netplan files as text, line by line, so comments, blank lines, key order and
quoting survive exactly; this reader only tells the editor *where* things are.  It knows block
mappings, block sequences (``- item``, also at their parent key's indentation), plain and
quoted one-line scalars, one-line flow collections (kept opaque) and block scalars (``|``,
``>``: kept opaque).  Anything else (anchors, aliases, tags, multi-line plain or quoted
scalars, several documents, tabs in indentation, duplicate keys) raises
:class:`UnsupportedYamlError`: the netplan rule then reports the file instead of guessing.
Every loop advances over a bounded list of lines and nesting is capped at ``MAX_DEPTH``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vmferry.guest.errors import UnsupportedGuestFeatureError

MAX_DEPTH = 32
MAX_LINES = 20000


class UnsupportedYamlError(UnsupportedGuestFeatureError):
    """The YAML uses something outside the subset vmferry edits safely."""


@dataclass
class Scalar:
    text: str  # as written (quotes included), without a trailing comment
    line: int  # 0-based

    @property
    def value(self) -> str:
        """The scalar's string value (quotes removed; YAML types are not resolved)."""
        t = self.text
        if t.startswith("'"):
            return t[1:-1].replace("''", "'")
        if t.startswith('"'):
            return t[1:-1]
        return t


@dataclass
class Opaque:
    """A value vmferry never edits: a flow collection or a block scalar."""

    text: str
    line: int
    end: int  # last line (0-based, inclusive)


@dataclass
class Entry:
    key: str
    line: int
    indent: int
    value: Node


@dataclass
class Mapping:
    indent: int
    entries: list[Entry] = field(default_factory=list)

    def get(self, key: str) -> Node:
        for e in self.entries:
            if e.key == key:
                return e.value
        return None

    def entry(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    def entries_keys(self) -> list[str]:
        return [e.key for e in self.entries]


@dataclass
class Sequence:
    indent: int
    items: list[Node] = field(default_factory=list)


Node = Scalar | Opaque | Mapping | Sequence | None

#: a mapping key (double-quoted, single-quoted or plain) followed by ':' and a space or the end
_KEY = re.compile(
    r"""(?P<key>"(?:[^"\\]|\\.)*"|'(?:[^']|'')*'"""
    r"""|[^\s#'"{}\[\],&*!|>%@`?:-](?:[^:#]|(?<!\s)\#)*?|-[^\s:](?:[^:#]|(?<!\s)\#)*?)"""
    r""":(?:\s+|$)"""
)


_BLOCK_HEADER = re.compile(r"[|>](?:[1-9][+-]?|[+-][1-9]?)?")


def parse(text: str) -> Mapping | None:
    """Parse ``text``; None for an empty document.  The top level must be a mapping."""
    return _Parser(text).document()


def last_line(node: Node, entry_line: int) -> int:
    """The last line (0-based) a value spans; ``entry_line`` is the line its key is on."""
    if isinstance(node, Scalar):
        return node.line
    if isinstance(node, Opaque):
        return node.end
    if isinstance(node, Mapping) and node.entries:
        e = node.entries[-1]
        return last_line(e.value, e.line)
    if isinstance(node, Sequence) and node.items:
        item = node.items[-1]
        if item is None:
            raise UnsupportedYamlError(f"line {entry_line + 1}: an empty sequence item")
        return last_line(item, entry_line)
    return entry_line


class _Parser:
    def __init__(self, text: str) -> None:
        if "\r" in text or "\t" in text:
            raise UnsupportedYamlError("carriage returns or tabs in a YAML file")
        self.lines = text.split("\n")
        if len(self.lines) > MAX_LINES:
            raise UnsupportedYamlError(f"YAML file longer than {MAX_LINES} lines")
        self.pos = 0
        self.virtual: tuple[int, int, str] | None = None  # the content after "- " of an item

    # --- lines -------------------------------------------------------------------------------
    def peek(self) -> tuple[int, int, str] | None:
        """The next significant line: (line number, indentation, content)."""
        if self.virtual is not None:
            return self.virtual
        while self.pos < len(self.lines):
            raw = self.lines[self.pos]
            content = raw.lstrip(" ")
            if content and not content.startswith("#"):
                return self.pos, len(raw) - len(content), content.rstrip(" ")
            self.pos += 1
        return None

    def advance(self) -> None:
        if self.virtual is not None:
            self.virtual = None
        else:
            self.pos += 1

    # --- grammar -----------------------------------------------------------------------------
    def document(self) -> Mapping | None:
        first = self.peek()
        if first is not None and first[2].startswith(("%", "---")):
            if first[2] != "---" or first[1] != 0:
                raise UnsupportedYamlError("YAML directives or a document marker with content")
            self.advance()
        first = self.peek()
        if first is None:
            return None
        if first[1] != 0:
            raise UnsupportedYamlError("the top-level mapping is indented")
        node = self.node(0, 0)
        rest = self.peek()
        if rest is not None:
            raise UnsupportedYamlError(f"line {rest[0] + 1}: content after the top-level mapping")
        if not isinstance(node, Mapping):
            raise UnsupportedYamlError("the top level is not a block mapping")
        return node

    def node(self, min_indent: int, depth: int) -> Node:
        _check_depth(depth)
        nxt = self.peek()
        if nxt is None or nxt[1] < min_indent:
            return None
        lineno, indent, content = nxt
        if content == "-" or content.startswith("- "):
            return self.sequence(indent, depth)
        if _KEY.match(content):
            return self.mapping(indent, depth)
        raise UnsupportedYamlError(f"line {lineno + 1}: a multi-line scalar or unknown syntax")

    def mapping(self, indent: int, depth: int) -> Mapping:
        _check_depth(depth)
        out = Mapping(indent)
        seen: set[str] = set()
        while (nxt := self.peek()) is not None and nxt[1] >= indent:
            lineno, col, content = nxt
            if col > indent:
                raise UnsupportedYamlError(f"line {lineno + 1}: unexpected indentation")
            m = _KEY.match(content)
            if m is None:
                break  # e.g. a "- " item of a sequence that continues an outer mapping
            key = Scalar(m.group("key").rstrip(" "), lineno).value
            if key in seen:
                raise UnsupportedYamlError(f"line {lineno + 1}: duplicate key {key!r}")
            seen.add(key)
            self.advance()
            rest = _strip_comment(content[m.end() :], lineno)
            if rest:
                value: Node = self.scalar(rest, lineno, col)
            else:
                nxt = self.peek()
                if nxt is not None and nxt[1] == col and (nxt[2] == "-" or nxt[2][:2] == "- "):
                    value = self.sequence(col, depth + 1)  # a sequence at its key's indentation
                else:
                    value = self.node(col + 1, depth + 1)
            out.entries.append(Entry(key, lineno, col, value))
        return out

    def sequence(self, indent: int, depth: int) -> Sequence:
        _check_depth(depth)
        out = Sequence(indent)
        while (nxt := self.peek()) is not None and nxt[1] == indent:
            lineno, col, content = nxt
            if not (content == "-" or content.startswith("- ")):
                break
            self.advance()
            body = content[1:].lstrip(" ")
            body_col = col + len(content) - len(body)
            body = _strip_comment(body, lineno) if not _KEY.match(body) else body
            if not body:
                out.items.append(self.node(col + 1, depth + 1))
            elif body == "-" or body.startswith("- "):
                raise UnsupportedYamlError(f"line {lineno + 1}: nested sequence on one line")
            elif _KEY.match(body):
                self.virtual = (lineno, body_col, body)
                out.items.append(self.mapping(body_col, depth + 1))
            else:
                out.items.append(self.scalar(body, lineno, col))
        return out

    def scalar(self, rest: str, lineno: int, key_col: int) -> Scalar | Opaque:
        head = rest[0]
        if head in "&*!":
            raise UnsupportedYamlError(f"line {lineno + 1}: anchors, aliases and tags")
        if head in "|>":
            if not _BLOCK_HEADER.fullmatch(rest):
                raise UnsupportedYamlError(f"line {lineno + 1}: a bad block scalar header")
            end = lineno
            while self.pos < len(self.lines):
                raw = self.lines[self.pos]
                if raw.strip() and len(raw) - len(raw.lstrip(" ")) <= key_col:
                    break
                if raw.strip():
                    end = self.pos
                self.pos += 1
            return Opaque(rest, lineno, end)
        if head in "[{":
            if not _balanced(rest):
                raise UnsupportedYamlError(f"line {lineno + 1}: a flow collection over lines")
            return Opaque(rest, lineno, lineno)
        if head in "]},%@`" or (head in ":?-" and rest[1:2] in ("", " ")):
            raise UnsupportedYamlError(f"line {lineno + 1}: a scalar starting with an indicator")
        if head not in "'\"" and (": " in rest or rest.endswith(":")):
            raise UnsupportedYamlError(f"line {lineno + 1}: ': ' inside a plain scalar")
        if head in "'\"" and not _closed_quote(rest):
            raise UnsupportedYamlError(f"line {lineno + 1}: a quoted scalar over several lines")
        if head == '"' and "\\" in rest:
            raise UnsupportedYamlError(f"line {lineno + 1}: escapes in a double-quoted scalar")
        nxt = self.peek()
        if nxt is not None and nxt[1] > key_col and not _KEY.match(nxt[2]) and nxt[2][0] != "-":
            raise UnsupportedYamlError(f"line {nxt[0] + 1}: a multi-line plain scalar")
        return Scalar(rest, lineno)


def _check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsupportedYamlError(f"YAML nested deeper than {MAX_DEPTH} levels")


def _strip_comment(rest: str, lineno: int) -> str:
    """``rest`` without a trailing ``# comment`` (a '#' after whitespace, outside quotes)."""
    quote = ""
    i = 0
    while i < len(rest):
        ch = rest[i]
        if quote:
            if quote == '"' and ch == "\\":
                i += 1  # an escaped character
            elif ch == quote and quote == "'" and rest[i + 1 : i + 2] == "'":
                i += 1  # '' inside single quotes
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and (i == 0 or rest[i - 1] in " [{,:"):
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] == " "):
            return rest[:i].rstrip(" ")
        i += 1
    return rest.rstrip(" ")


def _closed_quote(text: str) -> bool:
    """True when the quoted scalar ``text`` ends on this line with nothing after it."""
    q = text[0]
    i = 1
    while i < len(text):
        if text[i] == "\\" and q == '"':
            i += 2
            continue
        if text[i] == q:
            if q == "'" and text[i + 1 : i + 2] == "'":
                i += 2
                continue
            return not text[i + 1 :].strip()
        i += 1
    return False


def _balanced(text: str) -> bool:
    """True when the flow collection ``text`` closes every bracket it opens, in order, and
    ends with its outermost closing bracket."""
    stack: list[str] = []
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                return False
            if not stack:
                return not text[i + 1 :].strip()
    return False
