"""Facts a ``.vmx`` reader can take from the ``.vmdk`` descriptors it names: size, type, parent.

Only text descriptors (and the descriptor embedded in a monolithic sparse file) are read, only
for disks named relative to the ``.vmx`` directory and staying inside it: a config must not make
vmferry open arbitrary host files.  Anything odd is ignored — the disk engine owns VMDK parsing;
this is a hint for ``vm show``.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from vmferry.vm.model import Disk

_MAX_DESCRIPTOR = 64 * 1024
_EXTENT = re.compile(r"^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+\w+", re.MULTILINE)


def _inside(base: Path, name: str) -> Path | None:
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "[" in name:
        return None
    candidate = (base / name).resolve()
    try:
        candidate.relative_to(base.resolve())
    except ValueError:
        return None
    return candidate if candidate.is_file() else None


def _descriptor_text(path: Path) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(_MAX_DESCRIPTOR)
    if head.startswith(b"KDMV") and len(head) >= 44:
        # sparse header: descriptorOffset (u64 sectors) at 28, descriptorSize (u64 sectors) at 36
        off, size = struct.unpack_from("<QQ", head, 28)
        if not 0 < size <= _MAX_DESCRIPTOR // 512 or off > 1 << 20:
            return None
        with path.open("rb") as fh:
            fh.seek(off * 512)
            head = fh.read(size * 512)
    text = head.split(b"\0", 1)[0].decode("utf-8", "replace")
    return text if "createType" in text else None


def enrich_from_descriptor(disk: Disk, vmx_dir: Path) -> None:
    """Fill ``size_bytes``, ``format`` and ``parent`` from the disk's descriptor, when readable."""
    path = _inside(vmx_dir, disk.path or "")
    if path is None:
        return
    try:
        text = _descriptor_text(path)
    except OSError:
        return
    if text is None:
        return
    sectors = sum(int(m.group(2)) for m in _EXTENT.finditer(text))
    if 0 < sectors < 1 << 54:
        disk.size_bytes = sectors * 512
    ctype = re.search(r'createType\s*=\s*"([^"]+)"', text)
    if ctype:
        disk.format = f"vmdk-{ctype.group(1)}"
    parent = re.search(r'parentFileNameHint\s*=\s*"([^"]+)"', text)
    if parent:
        disk.parent = parent.group(1)
