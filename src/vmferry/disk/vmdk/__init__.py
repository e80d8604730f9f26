"""VMDK: VMware's disk format in all its createTypes (see docs/formats/vmdk.md)."""

from vmferry.disk.vmdk.driver import PARENT_MODIFIED, Vmdk
from vmferry.disk.vmdk.stream import create_stream_optimized, write_stream_optimized

__all__ = ["PARENT_MODIFIED", "Vmdk", "create_stream_optimized", "write_stream_optimized"]
