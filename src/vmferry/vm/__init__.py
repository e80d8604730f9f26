"""VM configurations: a neutral model, readers for every hypervisor, writers for every target.

The CLI needs only :func:`show` and :func:`convert`; other issues (guest repair, migrate) use
:mod:`vmferry.vm.targets` for hypervisor facts and :func:`convert_config` on a model they hold.
"""

from __future__ import annotations

from vmferry.vm.api import convert, show
from vmferry.vm.convert import Conversion, convert_config
from vmferry.vm.model import Disk, Nic, SerialPort, Snapshot, VmModel
from vmferry.vm.readers import read_config
from vmferry.vm.targets import TARGETS, get_target

__all__ = [
    "TARGETS",
    "Conversion",
    "Disk",
    "Nic",
    "SerialPort",
    "Snapshot",
    "VmModel",
    "convert",
    "convert_config",
    "get_target",
    "read_config",
    "show",
]
