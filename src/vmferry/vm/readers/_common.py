"""Helpers every reader shares: bounded file reads, safe XML, range-checked numbers.

Configs come from machines we are migrating *away* from, sometimes from a backup of unknown
origin, so a reader must treat them as hostile: no entity expansion or network access in XML, no
unbounded reads, and every number checked against a sane range before it sizes anything.  Each
helper turns a low-level failure into a ConfigError naming the file, so no ValueError or
ParseError ever reaches the user as a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from vmferry.errors import ConfigError

#: No VM configuration we know of is anywhere near this; a bigger file is not a config.
MAX_CONFIG_BYTES = 32 * 1024 * 1024
MAX_CPUS = 4096
MAX_MEMORY_MB = 64 * 1024 * 1024  # 64 TiB
MAX_DISK_BYTES = 2**63 - 1


def read_limited(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The whole file, refusing anything larger than ``limit`` before reading it."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", path=str(path)) from exc
    if len(data) > limit:
        raise ConfigError(
            f"config is larger than {limit} bytes; refusing to parse it", path=str(path)
        )
    return data


def parse_xml(data: bytes, path: Path | str) -> Element:
    """Parse XML with entity expansion, external entities and DTD fetching disabled."""
    try:
        return SafeET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise ConfigError(
            f"XML uses a forbidden construct ({type(exc).__name__}); refusing it",
            hint="entities and external references are never expanded",
            path=str(path),
        ) from exc
    except (ParseError, ValueError, UnicodeError) as exc:
        raise ConfigError(f"not well-formed XML: {exc}", path=str(path)) from exc


def local(tag: str) -> str:
    """Element or attribute name without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def attr(elem: Element, name: str, default: str | None = None) -> str | None:
    """Attribute by local name whatever its namespace (OVF writers disagree on prefixes)."""
    if name in elem.attrib:
        return elem.attrib[name]
    for key, value in elem.attrib.items():
        if local(key) == name:
            return value
    return default


def children(elem: Element, name: str) -> list[Element]:
    return [c for c in elem if local(c.tag) == name]


def child(elem: Element, name: str) -> Element | None:
    for c in elem:
        if local(c.tag) == name:
            return c
    return None


def child_text(elem: Element, name: str) -> str | None:
    c = child(elem, name)
    return None if c is None or c.text is None else c.text.strip()


def to_int(
    value: Any, what: str, path: Path | str, *, lo: int = 0, hi: int = MAX_DISK_BYTES
) -> int:
    """An integer within [lo, hi], or a ConfigError saying which setting is wrong."""
    try:
        number = int(str(value).strip(), 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        try:
            number = int(str(value).strip())
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{what}: {str(value)[:40]!r} is not a number", path=str(path)
            ) from exc
    if not lo <= number <= hi:
        raise ConfigError(f"{what}: {number} is outside {lo}..{hi}", path=str(path))
    return number


def to_bool(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


_UUID_HEX = re.compile(r"[0-9a-fA-F]")


def format_uuid(value: str | None) -> str | None:
    """8-4-4-4-12 lower-case UUID from any spelling (``56 4d 6c ...-...``, braces), else None."""
    if not value:
        return None
    digits = "".join(_UUID_HEX.findall(value)).lower()
    if len(digits) != 32:
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def strip_namespaces(root: Element) -> Element:
    """Drop ``{namespace}`` from every tag so that ``find`` paths stay readable.

    Only for formats with a single namespace (VirtualBox, libvirt); OVF needs its prefixes' local
    names only, which ``local``/``attr`` handle.
    """
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = local(el.tag)
    return root
