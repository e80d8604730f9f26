"""Package a built Debian guest the way each hypervisor lays a VM out on disk.

Why: ``vmferry migrate`` reads a *VM* (a config naming disks, usually a snapshot chain), not a
bare image.  To test it end to end on a guest that really boots, the cached guests of
:mod:`tests.bootkit.guest` are wrapped in the folders VMware, Hyper-V, VirtualBox and libvirt
leave behind, each with a snapshot so that the active state lives in a differencing layer:

* the **base** layer is the guest with GRUB's core image (disk sectors 1-2047, behind the MBR)
  zeroed: booted alone it stops in the BIOS;
* the **snapshot** layer holds those sectors again (a few real changed blocks).  Only a tool
  that reads the whole chain produces a disk that boots, and the active state reads exactly
  like the guest image (``qemu-img compare`` against it is the oracle).

The VM configs are written from hand-made templates modelled on real files (the samples under
``../shared/corpus``: ESXi .vmx files of libvirt's vmx2xml tests, govmomi's OVFs, the Hyper-V
2012 R2 XML of dissect.target, the VirtualBox 7 .vbox of dissect.hypervisor), never with
vmferry's own writers, which would then be testing themselves.  Disk layers are made with
qemu-img/qemu-io wherever qemu can write the format (VMDK, qcow2, VHDX and VDI bases, VMDK and
qcow2 children); qemu cannot create VHDX or VDI differencing images, so the ``.avhdx`` and the
VirtualBox snapshot ``.vdi`` are created and written through vmferry's disk engine (what is
under test here is the migration, not that writer; qemu can read neither chain back, so the
fixture check compares them with ``vmferry compare`` and qemu-img checks their bases).

Decisions (where real layouts vary):

* VMware: an ESXi-style base (``NAME.vmdk`` descriptor, ``createType="vmfs"``, over
  ``NAME-flat.vmdk``), and the snapshot ``NAME-000001.vmdk`` as a hosted sparse delta
  (``parentFileNameHint``), because qemu cannot write ESXi's vmfsSparse/SEsparse deltas.
  The .vmx names the delta on ``scsi0`` with ``scsi0.virtualDev = "pvscsi"``; a ``.vmsd``
  lists the snapshot.  No ``.vmsn`` (its memory-state format is undocumented; nothing reads it).
* OVA: what an export gives: one flattened streamOptimized VMDK, the OVF first in the tar,
  then the disk, then the ``.mf`` with SHA256 lines (ovftool's order and digest format).
* Hyper-V: a Generation 1 VM of 2012 R2 (XML config, UTF-16 as Hyper-V writes it) whose IDE
  0:0 drive names the checkpoint's ``NAME_<GUID>.avhdx`` by its Windows path
  (``C:\\Hyper-V\\...``), as Hyper-V stores it; the checkpoint's own config sits in
  ``Snapshots/``.
* VirtualBox: ``NAME.vbox`` (settings 1.19) with the base ``NAME.vdi`` and the snapshot's
  ``Snapshots/{uuid}.vdi``; medium UUIDs are read from the VDI headers (VirtualBox refuses a
  .vbox whose UUIDs differ from the files).  The child's header comment is cleared: VirtualBox
  finds parents through the .vbox media registry, not through any note in the file.
* libvirt: a domain XML (absolute paths, as libvirt requires) on a qcow2 overlay
  ``NAME.snap1.qcow2`` over ``NAME.qcow2`` (``virsh snapshot-create --disk-only`` layout).

Everything stays sparse: the raw guest is copied with ``cp --sparse=always`` (reflinked where
the filesystem can), and formats are written by qemu-img, which skips zeros.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: GRUB's embedding area between the MBR and the first partition (sector 1 up to 1 MiB); the
#: guests' partitions start at sector 2048 (tests.bootkit.guest)
CORE_OFFSET = 512
CORE_LENGTH = (1 << 20) - 512
#: the kinds of source VM this module builds, and the hypervisor target each one already is
SOURCE_KINDS = ("vmware", "ova", "hyperv", "virtualbox", "libvirt")
OWN_TARGET = {
    "vmware": "vmware",
    "ova": "ovf",
    "hyperv": "hyperv",
    "virtualbox": "virtualbox",
    "libvirt": "kvm",
}
VM_NAME = "debian12"
MEMORY_MB = 1024
CPUS = 2


@dataclass(frozen=True)
class PackagedVm:
    """One source VM on disk.  ``config`` is what ``vmferry migrate`` is given."""

    kind: str
    name: str
    folder: Path
    config: Path
    #: every disk file of the VM (base first), in the format's own names
    disks: tuple[Path, ...]
    #: the layer the VM runs from (its chain is the guest), and qemu's name for its format
    top: Path
    top_format: str
    #: the boot controller the source config puts the disk on (tests.bootkit.boot's names)
    controller: str
    meta: dict[str, str] = field(default_factory=dict)


def run(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run a fixture step; a failure raises with the command and its output."""
    argv = [str(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc.stdout


# --------------------------------------------------------------------------------------------
# the layers


@dataclass(frozen=True)
class Layers:
    """The guest split into a base (core image zeroed) and the bytes the snapshot restores."""

    guest: Path
    base_raw: Path
    core: Path  # CORE_LENGTH bytes: what the snapshot layer writes at CORE_OFFSET
    size: int


def split_layers(guest_raw: Path, workdir: Path) -> Layers:
    """Copy the guest sparsely, zero GRUB's core image in the copy, keep the real bytes aside."""
    workdir.mkdir(parents=True, exist_ok=True)
    with guest_raw.open("rb") as f:
        f.seek(CORE_OFFSET)
        core_bytes = f.read(CORE_LENGTH)
    if len(core_bytes) != CORE_LENGTH or not core_bytes.strip(b"\0"):
        raise RuntimeError(f"{guest_raw}: no GRUB core image behind the MBR to split off")
    core = workdir / "core.bin"
    core.write_bytes(core_bytes)
    base = workdir / "base.raw"
    run("cp", "--reflink=auto", "--sparse=always", guest_raw, base)
    with base.open("r+b") as f:
        f.seek(CORE_OFFSET)
        f.write(b"\0" * CORE_LENGTH)
    return Layers(guest=guest_raw, base_raw=base, core=core, size=guest_raw.stat().st_size)


def _qemu_io_write(fmt: str, image: Path, layers: Layers) -> None:
    run(
        "qemu-io", "-f", fmt,
        "-c", f"write -s {layers.core} {CORE_OFFSET} {CORE_LENGTH}",
        image,
    )  # fmt: skip


def _vmferry_write(image: Path, layers: Layers, folder: Path) -> None:
    import vmferry

    with vmferry.open(image, writable=True, allowed_dirs=[folder]) as chain:
        chain.write(CORE_OFFSET, layers.core.read_bytes())


def _link_or_copy(src: Path, dst: Path) -> None:
    """A second name for a read-only fixture file (no space), or a sparse copy."""
    try:
        os.link(src, dst)
    except OSError:
        run("cp", "--reflink=auto", "--sparse=always", src, dst)


def _hexid(seed: str, n: int) -> str:
    """Deterministic hex digits (CIDs, MACs): two packagings of one guest look alike."""
    return hashlib.sha256(seed.encode()).hexdigest()[:n]


def _uuid(seed: str) -> uuid.UUID:
    return uuid.UUID(_hexid(seed, 32))


# --------------------------------------------------------------------------------------------
# VMware (ESXi folder)

VMFS_DESCRIPTOR = """\
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID={cid}
parentCID=ffffffff
createType="vmfs"

# Extent description
RW {sectors} VMFS "{name}-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "{cylinders}"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "{long_cid}"
ddb.thinProvisioned = "1"
ddb.uuid = "{ddb_uuid}"
ddb.virtualHWVersion = "19"
"""

VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
nvram = "{name}.nvram"
pciBridge0.present = "TRUE"
svga.present = "TRUE"
pciBridge4.present = "TRUE"
pciBridge4.virtualDev = "pcieRootPort"
pciBridge4.functions = "8"
vmci0.present = "TRUE"
hpet0.present = "TRUE"
floppy0.present = "FALSE"
numvcpus = "{cpus}"
memSize = "{memory}"
powerType.powerOff = "default"
powerType.suspend = "default"
powerType.reset = "default"
tools.upgrade.policy = "manual"
sched.cpu.units = "mhz"
sched.cpu.affinity = "all"
sched.cpu.latencySensitivity = "normal"
vm.createDate = "1732612345678901"
scsi0.virtualDev = "pvscsi"
scsi0.present = "TRUE"
scsi0:0.deviceType = "scsi-hardDisk"
scsi0:0.fileName = "{name}-000001.vmdk"
sched.scsi0:0.shares = "normal"
sched.scsi0:0.throughputCap = "off"
scsi0:0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "vpx"
ethernet0.generatedAddress = "{mac}"
ethernet0.uptCompatibility = "TRUE"
ethernet0.present = "TRUE"
displayName = "{name}"
guestOS = "debian12-64"
toolScripts.afterPowerOn = "TRUE"
toolScripts.afterResume = "TRUE"
toolScripts.beforeSuspend = "TRUE"
toolScripts.beforePowerOff = "TRUE"
uuid.bios = "{bios_uuid}"
vc.uuid = "{vc_uuid}"
sched.cpu.min = "0"
sched.cpu.shares = "normal"
sched.mem.min = "0"
sched.mem.minSize = "0"
sched.mem.shares = "normal"
numa.autosize.cookie = "20012"
numa.autosize.vcpu.maxPerVirtualNode = "2"
cpuid.coresPerSocket.cookie = "1"
sched.swap.derivedName = "/vmfs/volumes/5f2a9c1e-0b7d4e2a/{name}/{name}-5c1f2a3b.vswp"
uuid.location = "{loc_uuid}"
pciBridge0.pciSlotNumber = "17"
pciBridge4.pciSlotNumber = "21"
scsi0.pciSlotNumber = "160"
ethernet0.pciSlotNumber = "192"
scsi0:0.redo = ""
scsi0.sasWWID = "50 05 05 6a 3c 2e 71 30"
vmci0.id = "-1591741393"
monitor.phys_bits_used = "45"
cleanShutdown = "TRUE"
softPowerOff = "TRUE"
tools.syncTime = "FALSE"
checkpoint.vmState = ""
"""

VMSD = """\
.encoding = "UTF-8"
snapshot.lastUID = "1"
snapshot.current = "1"
snapshot0.uid = "1"
snapshot0.filename = "{name}-Snapshot1.vmsn"
snapshot0.displayName = "before upgrade"
snapshot0.description = "taken by the vmferry test fixture"
snapshot0.createTimeHigh = "403411"
snapshot0.createTimeLow = "-1559103658"
snapshot0.numDisks = "1"
snapshot0.disk0.fileName = "{name}.vmdk"
snapshot0.disk0.node = "scsi0:0"
snapshot.numSnapshots = "1"
"""


def _vmx_uuid(u: uuid.UUID) -> str:
    """VMware's ``42 21 ... 5c-3e ...`` spelling of a UUID."""
    b = u.bytes.hex()
    pairs = [b[i : i + 2] for i in range(0, 32, 2)]
    return " ".join(pairs[:8]) + "-" + " ".join(pairs[8:])


def package_vmware(layers: Layers, dest: Path, name: str = VM_NAME) -> PackagedVm:
    folder = dest / name
    folder.mkdir(parents=True)
    flat = folder / f"{name}-flat.vmdk"
    _link_or_copy(layers.base_raw, flat)
    sectors = layers.size // 512
    base = folder / f"{name}.vmdk"
    base.write_text(
        VMFS_DESCRIPTOR.format(
            cid=_hexid(name + "cid", 8),
            long_cid=_hexid(name + "lcid", 32),
            sectors=sectors,
            name=name,
            cylinders=sectors // (255 * 63),
            ddb_uuid=" ".join(_hexid(name + "ddb", 32)[i : i + 2] for i in range(0, 32, 2)),
        )
    )
    delta = folder / f"{name}-000001.vmdk"
    # run in the folder: qemu stores the backing name as given, i.e. relative, like VMware
    run(
        "qemu-img", "create", "-q", "-f", "vmdk", "-F", "vmdk", "-b", base.name,
        "-o", "adapter_type=lsilogic", delta.name, cwd=folder,
    )  # fmt: skip
    _qemu_io_write("vmdk", delta, layers)
    b = bytes.fromhex(_hexid(name + "mac", 6))
    mac = f"00:50:56:{0x80 | (b[0] & 0x3F):02x}:{b[1]:02x}:{b[2]:02x}"  # vCenter's range
    vmx = folder / f"{name}.vmx"
    vmx.write_text(
        VMX.format(
            name=name,
            cpus=CPUS,
            memory=MEMORY_MB,
            mac=mac,
            bios_uuid=_vmx_uuid(_uuid(name + "bios")),
            vc_uuid=_vmx_uuid(_uuid(name + "vc")),
            loc_uuid=_vmx_uuid(_uuid(name + "loc")),
        )
    )
    (folder / f"{name}.vmsd").write_text(VMSD.format(name=name))
    return PackagedVm(
        kind="vmware",
        name=name,
        folder=folder,
        config=vmx,
        disks=(base, flat, delta),
        top=delta,
        top_format="vmdk",
        controller="pvscsi",
        meta={"mac": mac},
    )


# --------------------------------------------------------------------------------------------
# OVA (a VMware export)

OVF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.6.2 (build-22220919), UTC time: 2026-11-20T10:12:31.503Z-->
<Envelope vmw:buildId="build-22220919" xmlns="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" \
xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vmw="http://www.vmware.com/schema/ovf" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{disk}" ovf:id="file1" ovf:size="{disk_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" \
ovf:fileRef="file1" \
ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" \
ovf:populatedSize="{populated}"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian GNU/Linux 12 (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">1</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{memory}MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="160"/>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>Video card</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="videoRamSizeInKB" vmw:value="4096"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VM Network&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="192"/>
        <vmw:Config ovf:required="false" vmw:key="wakeOnLanEnabled" vmw:value="true"/>
        <vmw:Config ovf:required="false" vmw:key="connectable.allowGuestControl" vmw:value="true"/>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="cpuHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="memoryHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
      <vmw:Config ovf:required="false" vmw:key="powerOpInfo.powerOffType" vmw:value="soft"/>
      <vmw:Config ovf:required="false" vmw:key="powerOpInfo.resetType" vmw:value="soft"/>
      <vmw:Config ovf:required="false" vmw:key="powerOpInfo.suspendType" vmw:value="hard"/>
      <vmw:Config ovf:required="false" vmw:key="tools.syncTimeWithHost" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="tools.toolsUpgradePolicy" vmw:value="manual"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def stream_vmdk(guest_raw: Path, out: Path) -> Path:
    """The guest as a streamOptimized VMDK, as an OVA export holds it (qemu-img writes it)."""
    run(
        "qemu-img", "convert", "-f", "raw", "-O", "vmdk",
        "-o", "subformat=streamOptimized,adapter_type=lsilogic", guest_raw, out,
    )  # fmt: skip
    return out


def cached_stream_vmdk(guest_raw: Path) -> Path:
    """:func:`stream_vmdk` of a cached guest image, kept beside it in the test cache.

    Why cached across sessions: qemu-img deflates ~650 MB of guest data into it, over a minute
    on the 2-core test machine, for an input that only changes when the guest is rebuilt.  The
    name carries the image's stem (recipe and key), so a rebuilt guest gets a new file; copies
    for other keys unused for a day are removed (as tests.bootkit.guest does for images).
    """
    from tests.bootkit.guest import STALE_AFTER, _locked, cache_dir

    cdir = cache_dir()
    out = cdir / f"{guest_raw.stem}.stream.vmdk"
    with _locked(cdir / f"{guest_raw.stem}.stream.lock"):
        if not out.exists():
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            try:
                stream_vmdk(guest_raw, tmp)
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
    cutoff = time.time() - STALE_AFTER
    for old in cdir.glob("*.stream.vmdk"):
        if old != out and old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
            old.with_name(old.name.replace(".stream.vmdk", ".stream.lock")).unlink(missing_ok=True)
    return out


def package_ova(
    layers: Layers, dest: Path, name: str = VM_NAME, *, disk_from: Path | None = None
) -> PackagedVm:
    """An OVA export: the chain flattened into one streamOptimized VMDK.  ``disk_from``: that
    VMDK already made (:func:`cached_stream_vmdk`); else qemu-img writes it now."""
    folder = dest / f"{name}-ova"
    folder.mkdir(parents=True)
    disk = folder / f"{name}-disk1.vmdk"
    if disk_from is not None:
        _link_or_copy(disk_from, disk)
    else:
        stream_vmdk(layers.guest, disk)
    populated = int(run("du", "-B1", "--apparent-size", disk).split()[0])
    ovf = folder / f"{name}.ovf"
    ovf.write_text(
        OVF.format(
            name=name,
            disk=disk.name,
            disk_size=disk.stat().st_size,
            capacity=layers.size,
            populated=populated,
            cpus=CPUS,
            memory=MEMORY_MB,
        )
    )
    mf = folder / f"{name}.mf"
    mf.write_text("".join(f"SHA256({p.name})= {_sha256(p)}\n" for p in (ovf, disk)))
    ova = folder / f"{name}.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member in (ovf, disk, mf):  # ovftool's order: descriptor first, manifest last
            tar.add(member, arcname=member.name)
    for member in (ovf, disk, mf):  # the OVA holds them; a hard link stays in the cache
        member.unlink()
    return PackagedVm(
        kind="ova",
        name=name,
        folder=folder,
        config=ova,
        disks=(ova,),
        top=ova,
        top_format="vmdk",
        controller="pvscsi",
        meta={"disk_member": disk.name},
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Hyper-V (2012 R2 folder)

HYPERV_IDE = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
HYPERV_SCSI = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"
HYPERV_NIC = "2fc216b0-d2e2-4967-9b6d-b8a5c9ca2778"
HYPERV_FIRMWARE = "ac6b8dc1-3257-4a70-b1b2-a9c9215659ad"
#: manifest entries every Generation 1 VM has (device class GUID = instance GUID), from the
#: 2012 R2 sample (dissect.target's B90AC31B-....xml)
HYPERV_COMPONENTS = (
    ("58f75a6d-d949-4320-99e1-a2a2576d581c", "Microsoft Synthetic Mouse"),
    ("197f74e3-b84b-46de-8ae6-82f1cd181cdc", "Microsoft Synthetic Keyboard"),
    ("f3cf6965-e8d3-44a9-9b7d-a04245ea7525", "Microsoft Synthetic Video"),
    ("bc12c717-8898-4688-8ee4-2cd14894f8ea", "Microsoft Hyper-V Activation Component"),
    ("6c09bb55-d683-4da0-8931-c9bf705f6480", "Microsoft Guest Interface Component"),
    ("84eaae65-2f2e-45f5-9bb5-0e857dc8eb47", "Microsoft Heartbeat Component"),
    ("2a34b1c2-fd73-4043-8a5b-dd2159bc743f", "Microsoft Key-Value Pair Exchange Component"),
    ("9f8233ac-be49-4c79-8ee3-e7e1985b2077", "Microsoft Shutdown Component"),
    ("2497f4de-e9fa-4204-80e4-4b75c46419c0", "Microsoft Time Synchronization Component"),
    ("5ced1297-4598-4915-a5fc-ad21bb4d02a4", "Microsoft VSS Component"),
)

HYPERV_XML = """\
<?xml version="1.0" encoding="UTF-16" standalone="yes"?>
<configuration>
  <_{ide}_>
    <VDEVVersion type="integer">1280</VDEVVersion>
    <controller0>
      <drive0>
        <iops_limit type="integer">0</iops_limit>
        <iops_reservation type="integer">0</iops_reservation>
        <pathname type="string">{disk_path}</pathname>
        <persistent_reservations_supported type="bool">False</persistent_reservations_supported>
        <type type="string">VHD</type>
        <weight type="integer">100</weight>
      </drive0>
      <drive1>
        <pathname type="string"></pathname>
        <type type="string">NONE</type>
      </drive1>
    </controller0>
    <controller1>
      <drive0>
        <pathname type="string"></pathname>
        <type type="string">ISO</type>
      </drive0>
      <drive1>
        <pathname type="string"></pathname>
        <type type="string">NONE</type>
      </drive1>
    </controller1>
  </_{ide}_>
  <_{firmware}_>
    <VDEVVersion type="integer">512</VDEVVersion>
    <bios_guid type="string">{{{bios_guid}}}</bios_guid>
    <boot>
      <device0 type="string">HardDrive</device0>
      <device1 type="string">Optical</device1>
      <device2 type="string">Network</device2>
      <device3 type="string">Floppy</device3>
    </boot>
    <num_lock type="bool">False</num_lock>
    <pause_after_boot_failure type="bool">False</pause_after_boot_failure>
    <pxe_preferred_protocol type="integer">4</pxe_preferred_protocol>
    <secure_boot_enabled type="bool">False</secure_boot_enabled>
  </_{firmware}_>
  <_{nic_instance}_>
    <ChannelInstanceGuid type="string">{{{channel_guid}}}</ChannelInstanceGuid>
    <ClusterMonitored type="bool">True</ClusterMonitored>
    <FriendlyName type="string">Network Adapter</FriendlyName>
    <IsConnected type="bool">True</IsConnected>
    <MacAddress type="string">{mac}</MacAddress>
    <MacAddressIsStatic type="bool">False</MacAddressIsStatic>
    <PortName type="string"></PortName>
    <SwitchName type="string">External</SwitchName>
    <VDEVVersion type="integer">256</VDEVVersion>
    <VpciInstanceGuid type="string">{{{vpci_guid}}}</VpciInstanceGuid>
  </_{nic_instance}_>
  <_{scsi_instance}_>
    <ChannelInstanceGuid type="string">{{{scsi_channel}}}</ChannelInstanceGuid>
    <VDEVVersion type="integer">256</VDEVVersion>
  </_{scsi_instance}_>
  <global_settings>
    <devices>
      <allow_reduced_fc_redundancy type="bool">False</allow_reduced_fc_redundancy>
      <generation_id type="string">{generation_id}</generation_id>
      <storage_allow_full_scsi_command_set type="bool">False</storage_allow_full_scsi_command_set>
    </devices>
    <disk_merge_pending type="bool">False</disk_merge_pending>
    <power>
      <host_shutdown>
        <action type="integer">1</action>
      </host_shutdown>
      <host_startup>
        <action type="integer">1</action>
      </host_startup>
    </power>
    <snapshots>
      <list>
        <size type="integer">{checkpoints}</size>
      </list>
    </snapshots>
    <unexpected_termination>
      <action type="integer">1</action>
    </unexpected_termination>
    <vhd_path_acled type="bool">True</vhd_path_acled>
  </global_settings>
  <manifest>
    <size type="integer">{manifest_size}</size>
{manifest}
    <version type="integer">260</version>
  </manifest>
  <properties>
    <global_id type="string">{vm_guid}</global_id>
    <highly_available type="bool">False</highly_available>
    <last_powered_off_time type="integer">134082412345678901</last_powered_off_time>
    <last_powered_on_time type="integer">134082401234567890</last_powered_on_time>
    <last_state_change_time type="integer">134082412345678901</last_state_change_time>
    <name type="string">{name}</name>
    <notes type="string"></notes>
    <subtype type="integer">0</subtype>
    <type_id type="string">{type_id}</type_id>
    <version type="integer">1280</version>
  </properties>
  <settings>
    <global>
      <logical_id type="string">{vm_guid}</logical_id>
    </global>
    <memory>
      <bank>
        <dynamic_memory_enabled type="bool">False</dynamic_memory_enabled>
        <limit type="integer">1048576</limit>
        <priority type="integer">5000</priority>
        <reservation type="integer">{memory}</reservation>
        <size type="integer">{memory}</size>
        <target_memory_buffer type="integer">20</target_memory_buffer>
      </bank>
    </memory>
    <processors>
      <count type="integer">{cpus}</count>
      <features>
        <limit type="bool">False</limit>
      </features>
      <limit type="integer">100000</limit>
      <limit_cpuid type="bool">False</limit_cpuid>
      <reservation type="integer">0</reservation>
      <weight type="integer">100</weight>
    </processors>
    <stopped_at_host_shutdown type="bool">False</stopped_at_host_shutdown>
  </settings>
</configuration>
"""


def _hyperv_manifest(nic_instance: str, scsi_instance: str) -> tuple[str, int]:
    entries = [(g, g.upper(), n) for g, n in HYPERV_COMPONENTS]
    entries.append((HYPERV_NIC, nic_instance.upper(), "Synthetic Ethernet Port"))
    entries.append((HYPERV_SCSI, scsi_instance.upper(), "Synthetic SCSI Controller"))
    out = []
    for i, (device, instance, label) in enumerate(entries, 1):
        out.append(
            f"    <vdev{i:03d}>\n"
            f'      <device type="string">{device}</device>\n'
            f'      <flags type="integer">1</flags>\n'
            f'      <instance type="string">{instance}</instance>\n'
            f'      <name type="string">{label}</name>\n'
            f"    </vdev{i:03d}>"
        )
    return "\n".join(out), len(entries)


def _hyperv_config(name: str, vm_guid: str, disk_path: str, *, checkpoint: bool) -> bytes:
    nic_instance = str(_uuid(name + "nic"))
    scsi_instance = str(_uuid(name + "scsi"))
    manifest, size = _hyperv_manifest(nic_instance, scsi_instance)
    mac = "00-15-5D-" + "-".join(_hexid(name + "hvmac", 6)[i : i + 2].upper() for i in (0, 2, 4))
    text = HYPERV_XML.format(
        ide=HYPERV_IDE,
        firmware=HYPERV_FIRMWARE,
        disk_path=disk_path,
        bios_guid=str(_uuid(name + "hvbios")).upper(),
        nic_instance=nic_instance,
        channel_guid=str(_uuid(name + "chan")),
        vpci_guid=str(_uuid(name + "vpci")).upper(),
        mac=mac,
        scsi_instance=scsi_instance,
        scsi_channel=str(_uuid(name + "scsichan")),
        generation_id=_hexid(name + "gen", 32),
        checkpoints=0 if checkpoint else 1,
        manifest=manifest,
        manifest_size=size,
        vm_guid=vm_guid,
        name=name,
        type_id="Snapshots" if checkpoint else "Virtual Machines",
        memory=MEMORY_MB,
        cpus=CPUS,
    )
    # Hyper-V writes its XML configs in UTF-16 (little endian, with a byte-order mark), CRLF
    return text.replace("\n", "\r\n").encode("utf-16")


def package_hyperv(layers: Layers, dest: Path, name: str = VM_NAME) -> PackagedVm:
    import vmferry

    folder = dest / name
    disks_dir = folder / "Virtual Hard Disks"
    vms_dir = folder / "Virtual Machines"
    snaps_dir = folder / "Snapshots"
    for d in (disks_dir, vms_dir, snaps_dir):
        d.mkdir(parents=True)
    base = disks_dir / f"{name}.vhdx"
    run(
        "qemu-img", "convert", "-f", "raw", "-O", "vhdx",
        "-o", "subformat=dynamic,block_size=32M", layers.base_raw, base,
    )  # fmt: skip
    checkpoint_guid = str(_uuid(name + "checkpoint")).upper()
    child = disks_dir / f"{name}_{checkpoint_guid}.avhdx"
    vmferry.create(child, "vhdx", parent=base).close()
    _vmferry_write(child, layers, folder)
    vm_guid = str(_uuid(name + "hvvm")).upper()
    win_dir = f"C:\\Hyper-V\\{name}\\Virtual Hard Disks"
    config = vms_dir / f"{vm_guid}.xml"
    config.write_bytes(_hyperv_config(name, vm_guid, f"{win_dir}\\{child.name}", checkpoint=False))
    (snaps_dir / f"{checkpoint_guid}.xml").write_bytes(
        _hyperv_config(name, checkpoint_guid, f"{win_dir}\\{base.name}", checkpoint=True)
    )
    return PackagedVm(
        kind="hyperv",
        name=name,
        folder=folder,
        config=config,
        disks=(base, child),
        top=child,
        top_format="vhdx",
        controller="ide",
        meta={"vm_guid": vm_guid, "checkpoint_guid": checkpoint_guid},
    )


# --------------------------------------------------------------------------------------------
# VirtualBox

VBOX = """\
<?xml version="1.0"?>
<!--
** DO NOT EDIT THIS FILE.
** If you make changes to this file while any VirtualBox related application
** is running, your changes will be overwritten later, without taking effect.
** Use VBoxManage or the VirtualBox Manager GUI to make changes.
**
** Written by VirtualBox 7.0.20 (r163906)
-->
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{{{machine}}}" name="{name}" OSType="Debian_64" \
currentSnapshot="{{{snapshot}}}" snapshotFolder="Snapshots" lastStateChange="2026-11-20T10:02:11Z">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{{{base}}}" location="{base_location}" format="VDI" type="Normal">
          <HardDisk uuid="{{{child}}}" location="{child_location}" format="VDI"/>
        </HardDisk>
      </HardDisks>
    </MediaRegistry>
    <ExtraData>
      <ExtraDataItem name="GUI/LastCloseAction" value="PowerOff"/>
    </ExtraData>
    <Snapshot uuid="{{{snapshot}}}" name="Snapshot 1" timeStamp="2026-11-20T09:58:40Z">
{snapshot_hardware}
    </Snapshot>
{hardware}
  </Machine>
</VirtualBox>
"""

VBOX_HARDWARE = """\
<Hardware>
  <Memory RAMSize="{memory}"/>
  <Boot>
    <Order position="1" device="HardDisk"/>
    <Order position="2" device="DVD"/>
    <Order position="3" device="None"/>
    <Order position="4" device="None"/>
  </Boot>
  <Display controller="VMSVGA" VRAMSize="16"/>
  <Firmware/>
  <BIOS>
    <IOAPIC enabled="true"/>
    <SmbiosUuidLittleEndian enabled="true"/>
  </BIOS>
  <Network>
    <Adapter slot="0" enabled="true" MACAddress="{mac}" type="82540EM">
      <NAT localhost-reachable="true"/>
    </Adapter>
  </Network>
  <AudioAdapter driver="Pulse" enabledIn="false" enabledOut="false"/>
  <RTC localOrUTC="UTC"/>
  <StorageControllers>
    <StorageController name="SATA" type="AHCI" PortCount="1" useHostIOCache="false" \
Bootable="true" IDE0MasterEmulationPort="0" IDE0SlaveEmulationPort="1" \
IDE1MasterEmulationPort="2" IDE1SlaveEmulationPort="3">
      <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
        <Image uuid="{{{disk}}}"/>
      </AttachedDevice>
    </StorageController>
  </StorageControllers>
  <CPU count="{cpus}">
    <PAE enabled="false"/>
    <LongMode enabled="true"/>
    <X2APIC enabled="true"/>
    <HardwareVirtExLargePages enabled="false"/>
  </CPU>
</Hardware>"""


def vdi_uuids(path: Path) -> tuple[uuid.UUID, uuid.UUID]:
    """(image UUID, parent UUID) from a VDI 1.1 header: VirtualBox's RTUUID, little-endian
    fields, at 0x188 (create) and 0x1a8 (linkage), behind the 0xbeda107f signature at 0x40."""
    with path.open("rb") as f:
        head = f.read(0x200)
    if len(head) < 0x1C8 or head[0x40:0x44] != bytes.fromhex("7f10dabe"):
        raise RuntimeError(f"{path}: not a VDI image")
    return uuid.UUID(bytes_le=head[0x188:0x198]), uuid.UUID(bytes_le=head[0x1A8:0x1B8])


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


def package_virtualbox(layers: Layers, dest: Path, name: str = VM_NAME) -> PackagedVm:
    import vmferry

    folder = dest / name
    (folder / "Snapshots").mkdir(parents=True)
    base = folder / f"{name}.vdi"
    run("qemu-img", "convert", "-f", "raw", "-O", "vdi", layers.base_raw, base)
    base_uuid, _ = vdi_uuids(base)
    # VirtualBox names a snapshot's differencing image after its own UUID, known only once it is
    # created: create under a temporary name, then rename
    tmp = folder / "Snapshots" / "new.vdi"
    vmferry.create(tmp, "vdi", parent=base).close()
    _vmferry_write(tmp, layers, folder)
    child_uuid, linked = vdi_uuids(tmp)
    if linked != base_uuid:
        raise RuntimeError(f"{tmp}: links to {linked}, not to the base {base_uuid}")
    with tmp.open("r+b") as f:  # VirtualBox leaves the comment empty
        f.seek(0x54)
        f.write(b"\0" * 256)
    child = folder / "Snapshots" / f"{{{child_uuid}}}.vdi"
    tmp.rename(child)
    mac = "080027" + _hexid(name + "vbmac", 6).upper()
    hw = {"memory": MEMORY_MB, "mac": mac, "cpus": CPUS}
    vbox = folder / f"{name}.vbox"
    vbox.write_text(
        VBOX.format(
            machine=_uuid(name + "vbox"),
            name=name,
            snapshot=_uuid(name + "vbsnap"),
            base=base_uuid,
            child=child_uuid,
            base_location=base.name,
            child_location=f"Snapshots/{child.name}",
            snapshot_hardware=_indent(VBOX_HARDWARE.format(disk=base_uuid, **hw), 6),
            hardware=_indent(VBOX_HARDWARE.format(disk=child_uuid, **hw), 4),
        )
    )
    return PackagedVm(
        kind="virtualbox",
        name=name,
        folder=folder,
        config=vbox,
        disks=(base, child),
        top=child,
        top_format="vdi",
        controller="sata",
        meta={"base_uuid": str(base_uuid), "child_uuid": str(child_uuid), "mac": mac},
    )


# --------------------------------------------------------------------------------------------
# libvirt

LIBVIRT = """\
<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>{memory_kib}</memory>
  <currentMemory unit='KiB'>{memory_kib}</currentMemory>
  <vcpu placement='static'>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <vmport state='off'/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm>
    <suspend-to-mem enabled='no'/>
    <suspend-to-disk enabled='no'/>
  </pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{top}'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='sata' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='default'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <serial type='pty'>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
</domain>
"""


def package_libvirt(layers: Layers, dest: Path, name: str = VM_NAME) -> PackagedVm:
    folder = dest / name
    folder.mkdir(parents=True)
    base = folder / f"{name}.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", layers.base_raw, base)
    top = folder / f"{name}.snap1.qcow2"
    # a relative backing name, as `virsh snapshot-create --disk-only` leaves in a moved folder
    run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name, top.name,
        cwd=folder,
    )  # fmt: skip
    _qemu_io_write("qcow2", top, layers)
    mac = "52:54:00:" + ":".join(_hexid(name + "lvmac", 6)[i : i + 2] for i in (0, 2, 4))
    xml = folder / f"{name}.xml"
    xml.write_text(
        LIBVIRT.format(
            name=name,
            uuid=_uuid(name + "libvirt"),
            memory_kib=MEMORY_MB * 1024,
            cpus=CPUS,
            top=top.resolve(),
            mac=mac,
        )
    )
    return PackagedVm(
        kind="libvirt",
        name=name,
        folder=folder,
        config=xml,
        disks=(base, top),
        top=top,
        top_format="qcow2",
        controller="virtio-blk",
        meta={"mac": mac},
    )


PACKAGERS = {
    "vmware": package_vmware,
    "ova": package_ova,
    "hyperv": package_hyperv,
    "virtualbox": package_virtualbox,
    "libvirt": package_libvirt,
}


def package(kind: str, layers: Layers, dest: Path, name: str = VM_NAME, **kw: Path) -> PackagedVm:
    """Build the source VM ``kind`` (one of :data:`SOURCE_KINDS`) under ``dest/<kind>/``."""
    where = dest / kind
    where.mkdir(parents=True, exist_ok=True)
    return PACKAGERS[kind](layers, where, name, **kw)  # type: ignore[operator]


def package_all(
    guest_raw: Path, dest: Path, name: str = VM_NAME, *, ova_disk: Path | None = None
) -> dict[str, PackagedVm]:
    """Every source kind of one guest under ``dest`` (``ova_disk``: see :func:`package_ova`)."""
    layers = split_layers(guest_raw, dest / "layers")
    out = {}
    for kind in SOURCE_KINDS:
        kw = {"disk_from": ova_disk} if kind == "ova" and ova_disk is not None else {}
        out[kind] = package(kind, layers, dest, name, **kw)
    return out


def to_json(vm: PackagedVm) -> dict[str, object]:
    return {
        "kind": vm.kind, "name": vm.name, "folder": str(vm.folder), "config": str(vm.config),
        "disks": [str(d) for d in vm.disks], "top": str(vm.top), "top_format": vm.top_format,
        "controller": vm.controller, "meta": dict(vm.meta),
    }  # fmt: skip


def from_json(doc: dict[str, Any]) -> PackagedVm:
    return PackagedVm(
        kind=doc["kind"], name=doc["name"], folder=Path(doc["folder"]),
        config=Path(doc["config"]), disks=tuple(Path(d) for d in doc["disks"]),
        top=Path(doc["top"]), top_format=doc["top_format"], controller=doc["controller"],
        meta=dict(doc["meta"]),
    )  # fmt: skip


def missing_tools() -> list[str]:
    """Programs (with their Debian package) packaging needs and this machine lacks."""
    need = (("qemu-img", "qemu-utils"), ("qemu-io", "qemu-utils"))
    return [f"{p} (apt-get install {pkg})" for p, pkg in need if not shutil.which(p)]
