"""XenServer / XCP-ng XVA export metadata (``ova.xml``, the first member of an ``.xva`` tar).

``ova.xml`` is an XML-RPC value: a struct whose ``objects`` array holds every exported object
(``VM``, ``VBD``, ``VDI``, ``VIF``, ``network``) with a ``class``, an ``id`` and a ``snapshot``
struct of xapi fields; references between objects are those ids.  There is no corpus sample
(the manifest lists XVA as a known gap), so this reader follows xapi's field names and is tested
with synthetic files only.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from vmferry.errors import ConfigError
from vmferry.vm.model import Disk, Nic, VmModel, normalize_mac
from vmferry.vm.readers._common import (
    MAX_CONFIG_BYTES,
    MAX_CPUS,
    MAX_MEMORY_MB,
    format_uuid,
    parse_xml,
    read_limited,
    to_bool,
    to_int,
)


def _value(el: Element, depth: int = 0) -> Any:
    """XML-RPC ``<value>`` → Python (struct → dict, array → list, scalars → str)."""
    if depth > 64:
        raise ConfigError("ova.xml nested deeper than any export")
    inner = next(iter(el), None)
    if inner is None:
        return el.text or ""
    if inner.tag == "struct":
        out = {}
        for member in inner.findall("member"):
            name, val = member.findtext("name"), member.find("value")
            if name is not None and val is not None:
                out[name] = _value(val, depth + 1)
        return out
    if inner.tag == "array":
        data = inner.find("data")
        return [_value(v, depth + 1) for v in (data.findall("value") if data is not None else [])]
    return inner.text or ""


def read_xva(path: Path) -> VmModel:
    if tarfile.is_tarfile(path):
        try:
            with tarfile.open(path, mode="r:*") as tar:
                member = next((m for m in tar if m.isfile() and m.name == "ova.xml"), None)
                if member is None or member.size > MAX_CONFIG_BYTES:
                    raise ConfigError("the XVA has no (sane) ova.xml member", path=str(path))
                fh = tar.extractfile(member)
                data = fh.read(MAX_CONFIG_BYTES + 1) if fh else b""
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ConfigError(f"not a readable XVA (tar): {exc}", path=str(path)) from exc
    else:
        data = read_limited(path)
    root = parse_xml(data, path)
    if root.tag != "value":
        raise ConfigError(f"root element is <{root.tag}>, not an XVA <value>", path=str(path))
    return model_from_xva(_value(root), path)


def model_from_xva(top: Any, path: Path | str) -> VmModel:
    if not isinstance(top, dict) or not isinstance(top.get("objects"), list):
        raise ConfigError("ova.xml has no 'objects' array", path=str(path))
    objects: dict[str, tuple[str, dict]] = {}
    for obj in top["objects"]:
        if isinstance(obj, dict) and isinstance(obj.get("snapshot"), dict):
            objects[str(obj.get("id"))] = (str(obj.get("class")), obj["snapshot"])
    vms = [
        snap
        for cls, snap in objects.values()
        if cls == "VM" and not to_bool(snap.get("is_a_snapshot", ""))
    ]
    if not vms:
        raise ConfigError("ova.xml describes no VM", path=str(path))
    snap = vms[0]
    vm = VmModel(name=str(snap.get("name_label") or Path(str(path)).stem), source_format="xva")
    vm.uuid = format_uuid(str(snap.get("uuid", "")))
    mem = to_int(
        snap.get("memory_static_max", "0") or "0",
        "memory_static_max",
        path,
        hi=MAX_MEMORY_MB * 1024**2,
    )
    vm.memory_mb = mem // 1024**2
    vm.cpus = to_int(snap.get("VCPUs_max", "1") or "1", "VCPUs_max", path, lo=1, hi=MAX_CPUS)
    boot = snap.get("HVM_boot_params") if isinstance(snap.get("HVM_boot_params"), dict) else {}
    platform = snap.get("platform") if isinstance(snap.get("platform"), dict) else {}
    vm.firmware = "uefi" if boot.get("firmware") == "uefi" else "bios"
    vm.secure_boot = to_bool(platform.get("secureboot", "false"))
    other = snap.get("other_config") if isinstance(snap.get("other_config"), dict) else {}
    vm.guest_os = other.get("install-distro") or other.get("base_template_name")
    if snap.get("PV_bootloader"):
        vm.unsupported.append(
            f"PV guest (PV_bootloader={snap.get('PV_bootloader')}): boots without firmware"
        )
    for ref in snap.get("VBDs") or []:
        cls, vbd = objects.get(str(ref), ("", {}))
        if cls != "VBD":
            continue
        unit = to_int(vbd.get("userdevice", "0") or "0", "VBD userdevice", path, hi=255)
        vdi_cls, vdi = objects.get(str(vbd.get("VDI")), ("", {}))
        is_cd = str(vbd.get("type", "Disk")).upper() == "CD"
        disk = Disk(
            path=str(vbd.get("VDI")) if vdi_cls == "VDI" else None,
            controller="xen",
            controller_model="xen-blkfront",
            bus=0,
            unit=unit,
            device="cdrom" if is_cd else "disk",
            format="vhd" if not is_cd else None,
            boot_order=1 if to_bool(vbd.get("bootable", "false")) else None,
        )
        if vdi_cls == "VDI" and vdi.get("virtual_size"):
            disk.size_bytes = to_int(vdi["virtual_size"], "VDI virtual_size", path)
        (vm.cdroms if is_cd else vm.disks).append(disk)
    vm.disks.sort(key=lambda d: d.unit)
    for ref in snap.get("VIFs") or []:
        cls, vif = objects.get(str(ref), ("", {}))
        if cls != "VIF":
            continue
        net_cls, net = objects.get(str(vif.get("network")), ("", {}))
        vm.nics.append(
            Nic(
                mac=normalize_mac(str(vif.get("MAC", ""))),
                model="xen-netfront",
                network=str(net.get("name_label")) if net_cls == "network" else None,
                mac_static=True,
            )
        )
    return vm
