"""``read_config``: one entry point that recognises a VM configuration and reads it.

Users hand vmferry whatever file they have, so the dispatcher looks at the extension first and at
the content when the extension is missing or generic (``.xml``, ``.conf``).  One module per
source format keeps each reader small and lets tests target it directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from vmferry.errors import ConfigError
from vmferry.vm.model import VmModel

VMCX_MAGIC = (0x01282014).to_bytes(4, "little")


def _reader(kind: str) -> Callable[[Path], VmModel]:
    # Imported lazily so that one broken reader cannot stop the others from loading.
    if kind == "vmx":
        from vmferry.vm.readers.vmx import read_vmx as fn
    elif kind == "ovf":
        from vmferry.vm.readers.ovf import read_ovf as fn
    elif kind == "ova":
        from vmferry.vm.readers.ovf import read_ova as fn
    elif kind == "libvirt":
        from vmferry.vm.readers.libvirt import read_libvirt as fn
    elif kind == "vbox":
        from vmferry.vm.readers.vbox import read_vbox as fn
    elif kind == "proxmox":
        from vmferry.vm.readers.proxmox import read_proxmox as fn
    elif kind == "hyperv-xml":
        from vmferry.vm.readers.hyperv import read_hyperv_xml as fn
    elif kind == "vmcx":
        from vmferry.vm.readers.hyperv import read_vmcx as fn
    elif kind == "xva":
        from vmferry.vm.readers.xva import read_xva as fn
    else:  # pragma: no cover - guarded by detect_kind
        raise ConfigError(f"no reader for {kind}")
    return fn


_BY_SUFFIX = {
    ".vmx": "vmx",
    ".ovf": "ovf",
    ".ova": "ova",
    ".vbox": "vbox",
    ".vmcx": "vmcx",
    ".vbox-prev": "vbox",
    ".xva": "xva",
}
_XML_ROOTS = {
    "domain": "libvirt",
    "configuration": "hyperv-xml",
    "envelope": "ovf",
    "virtualbox": "vbox",
    "value": "xva",
}
KINDS = ("vmx", "ovf", "ova", "libvirt", "vbox", "proxmox", "hyperv-xml", "vmcx", "xva")


def detect_kind(path: Path) -> str:
    """Which reader handles ``path``: by extension, else by the first bytes."""
    suffix = path.suffix.lower()
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    if suffix == ".vmrs":
        raise ConfigError(
            "a .vmrs holds Hyper-V runtime state, not the VM configuration",
            hint="pass the .vmcx next to it",
            path=str(path),
        )
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", path=str(path)) from exc
    if head.startswith(VMCX_MAGIC):
        return "vmcx"
    text = _sniff_text(head)
    m = re.search(r"<(?:[\w.-]+:)?([A-Za-z_][\w.-]*)[\s>/]", re.sub(r"<[?!][^>]*>", "", text))
    if text.lstrip().startswith("<") and m:
        kind = _XML_ROOTS.get(m.group(1).lower())
        if kind:
            return kind
        raise ConfigError(
            f"XML with root <{m.group(1)}> is not a VM config vmferry knows", path=str(path)
        )
    if re.search(r'^\s*[\w.:]+\s*=\s*"', text, re.MULTILINE):
        return "vmx"
    if suffix == ".conf" or re.search(
        r"^(memory|cores|sockets|name|bootdisk|scsihw|net\d+):\s", text, re.MULTILINE
    ):
        return "proxmox"
    raise ConfigError(
        "cannot tell what kind of VM config this is",
        hint="known: " + ", ".join(KINDS),
        path=str(path),
    )


def _sniff_text(head: bytes) -> str:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) > 1 and head[1:2] == b"\0"):
        try:
            return head.decode("utf-16", "replace")
        except UnicodeError:
            return ""
    return head.decode("utf-8", "replace").lstrip("\ufeff")


def read_config(path: str | Path, kind: str | None = None) -> VmModel:
    """Read any supported VM configuration into a VmModel (``kind`` forces a reader)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("no such config file", path=str(p))
    chosen = kind or detect_kind(p)
    if chosen not in KINDS:
        raise ConfigError(f"unknown config kind {chosen!r}", hint="one of: " + ", ".join(KINDS))
    return _reader(chosen)(p)


__all__ = ["KINDS", "detect_kind", "read_config"]
