"""Hyper-V VM configurations: 2008–2012 R2 XML and 2016+ ``.vmcx``, through one interpreter.

Both formats store the same key tree (``configuration/properties/name``,
``configuration/settings/memory/bank/size``, one ``_<instance-guid>_`` node per device), so the
XML is turned into the same nested dict the VMCX parser yields and a single function maps it to
the model.  Devices are found through ``configuration/manifest``: each ``vdevNNN`` names a device
class GUID and the instance node that holds its settings.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from vmferry.errors import ConfigError
from vmferry.vm.model import Disk, Nic, SerialPort, VmModel, normalize_mac
from vmferry.vm.readers._common import (
    MAX_CPUS,
    MAX_MEMORY_MB,
    format_uuid,
    parse_xml,
    read_limited,
    to_int,
)
from vmferry.vm.readers.vmcx import read_vmcx_tree

IDE_CONTROLLER = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
SYNTHETIC_SCSI = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"
SYNTHETIC_NIC = "2fc216b0-d2e2-4967-9b6d-b8a5c9ca2778"
FIRMWARE_DEVICE = "ac6b8dc1-3257-4a70-b1b2-a9c9215659ad"
COM_PORTS = "8e3a359f-559a-4b6a-98a9-1690a6100ed7"
#: Manifest devices every Hyper-V VM has and no target needs told about.
_QUIET_NAMES = (
    "Microsoft ",
    "Synthetic Mouse",
    "Synthetic Keyboard",
    "Synthetic Video",
    "Synthetic Display",
)


def _xml_to_tree(el: Element, path: Path | str, depth: int = 0) -> Any:
    if depth > 64:
        raise ConfigError("XML nested deeper than any Hyper-V config", path=str(path))
    typ = el.get("type")
    if typ is not None and len(el) == 0:
        text = (el.text or "").strip()
        if typ == "integer":
            try:
                return int(text)
            except ValueError as exc:
                raise ConfigError(
                    f"<{el.tag}> integer {text[:30]!r} is not a number", path=str(path)
                ) from exc
        if typ == "bool":
            return text.lower() == "true"
        if typ == "bytes":
            try:
                return base64.b64decode(text)
            except (binascii.Error, ValueError):
                return text
        return text
    return {child.tag: _xml_to_tree(child, path, depth + 1) for child in el}


def read_hyperv_xml(path: Path) -> VmModel:
    root = parse_xml(read_limited(path), path)
    if root.tag != "configuration":
        raise ConfigError(
            f"root element is <{root.tag}>, not a Hyper-V <configuration>", path=str(path)
        )
    vm = model_from_tree({"configuration": _xml_to_tree(root, path)}, path)
    vm.source_format = "hyperv-xml"
    return vm


def read_vmcx(path: Path) -> VmModel:
    tree = read_vmcx_tree(path)
    if "configuration" not in tree:
        raise ConfigError(
            "this .vmcx holds no VM configuration (a host data.vmcx lists VMs, it is not one)",
            hint="pass the <GUID>.vmcx from the VM's 'Virtual Machines' folder",
            path=str(path),
        )
    vm = model_from_tree(tree, path)
    vm.source_format = "vmcx"
    return vm


def _node(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def model_from_tree(tree: dict[str, Any], path: Path | str) -> VmModel:
    conf = tree.get("configuration")
    if not isinstance(conf, dict):
        raise ConfigError("no 'configuration' node", path=str(path))
    props = conf.get("properties") or {}
    if not isinstance(props, dict) or "name" not in props:
        raise ConfigError(
            "configuration/properties/name missing: not a VM configuration", path=str(path)
        )
    vm = VmModel(name=str(props["name"]))
    vm.uuid = format_uuid(str(props.get("global_id") or ""))
    subtype = props.get("subtype", 0)
    if subtype not in (0, 1):
        vm.unsupported.append(f"properties/subtype={subtype}")
    vm.firmware = "uefi" if subtype == 1 else "bios"
    vm.memory_mb = to_int(
        _node(conf, "settings", "memory", "bank", "size") or 0,
        "memory size",
        path,
        hi=MAX_MEMORY_MB,
    )
    if _node(conf, "settings", "memory", "bank", "dynamic_memory_enabled"):
        vm.unsupported.append("dynamic memory (carried as its startup size)")
    vm.cpus = to_int(
        _node(conf, "settings", "processors", "count") or 1,
        "processor count",
        path,
        lo=1,
        hi=MAX_CPUS,
    )
    if vm.firmware == "uefi":
        vm.secure_boot = bool(_node(conf, f"_{FIRMWARE_DEVICE}_", "secure_boot_enabled"))
    _read_drives(_node(conf, f"_{IDE_CONTROLLER}_"), "ide", "piix4", vm, 0)
    manifest = conf.get("manifest") or {}
    scsi_index = 0
    for key in sorted(k for k in manifest if isinstance(manifest.get(k), dict)):
        dev = manifest[key]
        device = str(dev.get("device", "")).lower()
        instance = str(dev.get("instance", "")).lower()
        name = str(dev.get("name", ""))
        settings = conf.get(f"_{instance}_")
        if device == SYNTHETIC_SCSI:
            _read_drives(settings, "scsi", "storvsc", vm, scsi_index)
            scsi_index += 1
        elif device == SYNTHETIC_NIC or "Ethernet" in name:
            _read_nic(settings, vm, "netvsc" if device == SYNTHETIC_NIC else "dec21140")
        elif device in (IDE_CONTROLLER, FIRMWARE_DEVICE, COM_PORTS) or name.startswith(
            _QUIET_NAMES
        ):
            continue
        else:
            vm.unsupported.append(f"device {name or device}")
    for port in range(2):
        conn = _node(conf, f"_{COM_PORTS}_", f"port{port}", "connection")
        if conn:
            vm.serial_ports.append(SerialPort(index=port, kind="pipe", target=str(conn)))
    snaps = _node(conf, "global_settings", "snapshots", "list", "size")
    if snaps:
        vm.unsupported.append(
            f"{snaps} checkpoint(s): their configs are separate files and are not read"
        )
    vm.disks.sort(key=lambda d: (0 if d.controller == "ide" else 1, d.bus, d.unit))
    return vm


def _read_drives(settings: Any, kind: str, model: str, vm: VmModel, scsi_index: int) -> None:
    if not isinstance(settings, dict):
        return
    for ckey in sorted(k for k in settings if k.startswith("controller") and k[10:].isdigit()):
        controller = settings[ckey]
        if not isinstance(controller, dict):
            continue
        for dkey in sorted(
            (k for k in controller if k.startswith("drive") and k[5:].isdigit()),
            key=lambda k: int(k[5:]),
        ):
            drive = controller[dkey]
            if not isinstance(drive, dict):
                continue
            dtype = str(drive.get("type", "NONE")).upper()
            pathname = str(drive.get("pathname") or "") or None
            bus, unit = (
                (int(ckey[10:]), int(dkey[5:])) if kind == "ide" else (scsi_index, int(dkey[5:]))
            )
            if dtype == "NONE":
                continue
            if dtype in ("VHD", "ISO"):
                disk = Disk(
                    path=pathname,
                    controller=kind,
                    controller_model=model,
                    bus=bus,
                    unit=unit,
                    device="disk" if dtype == "VHD" else "cdrom",
                    format=(
                        pathname.rsplit(".", 1)[-1].lower()
                        if pathname and "." in pathname and dtype == "VHD"
                        else None
                    ),
                )
                (vm.disks if dtype == "VHD" else vm.cdroms).append(disk)
            else:
                vm.unsupported.append(f"{kind} {bus}:{unit} drive type {dtype}")


def _read_nic(settings: Any, vm: VmModel, model: str) -> None:
    if not isinstance(settings, dict):
        vm.unsupported.append("network adapter without settings")
        return
    static = bool(settings.get("MacAddressIsStatic"))
    mac = normalize_mac(str(settings.get("MacAddress") or ""))
    if mac == "00:00:00:00:00:00" and not static:
        mac = None  # dynamic MAC never assigned (VM not started yet)
    vm.nics.append(
        Nic(
            mac=mac,
            model=model,
            network=str(settings.get("SwitchName") or "") or None,
            mac_static=static,
        )
    )
