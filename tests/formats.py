"""Which vmferry formats qemu-img can make and read, and how it names them.

Generic tests iterate over the drivers actually registered, so a new driver is tested by every
operation the day it lands.
"""

from __future__ import annotations

from vmferry.disk import all_formats

FORMATS = all_formats()

#: vmferry name -> (qemu-img name, qemu-img create options for each subformat worth testing)
QEMU: dict[str, tuple[str, list[str]]] = {
    "raw": ("raw", [""]),
    "vhd": ("vpc", ["subformat=dynamic", "subformat=fixed"]),
    "vhdx": ("vhdx", ["subformat=dynamic,block_size=1M", "subformat=fixed,block_size=1M"]),
    # (qemu-io cannot write streamOptimized: the VMDK tests cover it with qemu-img convert)
    "vmdk": ("vmdk", ["subformat=monolithicSparse", "subformat=monolithicFlat"]),
    "qcow2": ("qcow2", ["compat=1.1", "compat=0.10"]),
    "vdi": ("vdi", ["static=off", "static=on"]),
}

#: vmferry create options for each subformat worth testing
OURS: dict[str, list[dict[str, str]]] = {
    "raw": [{}],
    "vhd": [{"subformat": "dynamic"}, {"subformat": "fixed"}],
    "vhdx": [{"subformat": "dynamic", "block_size": "1M"}, {"subformat": "fixed"}],
    "vmdk": [{}],
    "qcow2": [{}],
    "vdi": [{}],
}

EXTENSION = {
    "raw": ".raw",
    "vhd": ".vhd",
    "vhdx": ".vhdx",
    "vmdk": ".vmdk",
    "qcow2": ".qcow2",
    "vdi": ".vdi",
}

REGISTERED = [d.name for d in FORMATS]
WRITABLE = [d.name for d in FORMATS if d.writable_format and d.create_options is not None]
WITH_PARENT = [d.name for d in FORMATS if d.supports_parent]


def qemu_variants() -> list[tuple[str, str, str]]:
    """(vmferry format, qemu format, qemu -o) for every registered format qemu-img can create."""
    return [(name, QEMU[name][0], o) for name in REGISTERED if name in QEMU for o in QEMU[name][1]]


def our_variants() -> list[tuple[str, dict[str, str]]]:
    return [(name, o) for name in WRITABLE for o in OURS.get(name, [{}])]
