"""qcow2 (qemu copy-on-write v2/v3): read, write, create, backing files, check."""

from vmferry.disk.qcow2.driver import Qcow2

__all__ = ["Qcow2"]
