"""Hypervisor facts as data: controllers, guest device names, drivers, NICs, formats, limits.

Three parts of vmferry need the same facts: config translation (which controller does the target
boot from?), guest repair (which drivers must the initramfs hold, what will ``/dev/sda`` become?)
and migrate (which disk format does the target import?).  Keeping them as tables in one module
means a corrected fact is corrected everywhere, and a reviewer can check the tables against
``HYPERVISOR-FACTS.md`` and vendor documentation without reading any logic.

Linux module names are given as ``lsmod`` prints them (underscores: ``xen_blkfront``); modprobe
accepts either spelling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from vmferry.errors import ConfigError

GIB = 1024**3
TIB = 1024**4


@dataclass(frozen=True)
class ControllerFacts:
    """What a guest sees on one emulated or paravirtual storage controller."""

    model: str  # our canonical name: piix4, ahci, lsilogic, pvscsi, virtio-blk, storvsc, ...
    kind: str  # ide | sata | scsi | nvme | virtio | xen  (the model's ``Disk.controller``)
    linux_disk: str  # first disk as a libata-era (2.6.19+) Linux kernel names it
    linux_disk_legacy: (
        str | None
    )  # the name under pre-libata kernels (old IDE driver), if different
    linux_drivers: tuple[str, ...]  # modules the initramfs needs, in load order
    windows_driver: str | None  # boot-start service Windows needs (STOP 0x7B without it)
    max_controllers: int
    units_per_bus: int  # devices per controller (per channel for IDE)
    buses_per_controller: int = 1  # IDE: 2 channels per controller
    description: str = ""

    def linux_device(self, index: int, *, legacy: bool = False) -> str:
        """The ``/dev`` name of the ``index``-th disk on this controller (0 → sda/vda/nvme0n1)."""
        base = self.linux_disk_legacy if legacy and self.linux_disk_legacy else self.linux_disk
        if base.startswith("/dev/nvme"):
            return f"/dev/nvme0n{index + 1}"
        stem = base.rstrip("a")
        return f"{stem}{_disk_letters(index)}"


def _disk_letters(index: int) -> str:
    """sd naming: 0 → a, 25 → z, 26 → aa (the kernel's ``sd_format_disk_name``)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return letters


@dataclass(frozen=True)
class NicFacts:
    """A NIC model and what drives it."""

    model: str
    linux_driver: str
    windows_driver: str | None
    description: str = ""


_SD = ("sd_mod",)

CONTROLLERS: Mapping[str, ControllerFacts] = MappingProxyType(
    {
        c.model: c
        for c in (
            ControllerFacts(
                "piix4",
                "ide",
                "/dev/sda",
                "/dev/hda",
                ("ata_piix", "libata", *_SD),
                "intelide",
                1,
                2,
                2,
                "Intel PIIX3/PIIX4 IDE (QEMU pc, Hyper-V Gen1, VirtualBox, Xen HVM)",
            ),
            ControllerFacts(
                "ahci",
                "sata",
                "/dev/sda",
                None,
                ("ahci", "libata", *_SD),
                "storahci",
                4,
                30,
                1,
                "AHCI SATA (QEMU q35, VMware SATA, VirtualBox default)",
            ),
            ControllerFacts(
                "lsilogic",
                "scsi",
                "/dev/sda",
                None,
                ("mptspi", "mptscsih", "mptbase", *_SD),
                "LSI_SCSI",
                4,
                15,
                1,
                "VMware LSI Logic parallel (LSI53C1030)",
            ),
            ControllerFacts(
                "lsisas1068",
                "scsi",
                "/dev/sda",
                None,
                ("mptsas", "mptscsih", "mptbase", *_SD),
                "LSI_SAS",
                4,
                15,
                1,
                "VMware LSI Logic SAS",
            ),
            ControllerFacts(
                "pvscsi",
                "scsi",
                "/dev/sda",
                None,
                ("vmw_pvscsi", *_SD),
                "pvscsi",
                4,
                64,
                1,
                "VMware Paravirtual SCSI",
            ),
            ControllerFacts(
                "buslogic",
                "scsi",
                "/dev/sda",
                None,
                ("BusLogic", *_SD),
                "BusLogic",
                4,
                15,
                1,
                "BusLogic BT-958",
            ),
            ControllerFacts(
                "lsi53c895a",
                "scsi",
                "/dev/sda",
                None,
                ("sym53c8xx", *_SD),
                "symc8xx",
                4,
                7,
                1,
                "LSI 53C895A (QEMU's 'lsi'; not VMware's LSI Logic)",
            ),
            ControllerFacts(
                "megasas",
                "scsi",
                "/dev/sda",
                None,
                ("megaraid_sas", *_SD),
                "megasas",
                4,
                64,
                1,
                "LSI MegaRAID SAS",
            ),
            ControllerFacts(
                "virtio-scsi",
                "scsi",
                "/dev/sda",
                None,
                ("virtio_scsi", "virtio_pci", *_SD),
                "vioscsi",
                4,
                256,
                1,
                "virtio-scsi (KVM)",
            ),
            ControllerFacts(
                "virtio-blk",
                "virtio",
                "/dev/vda",
                None,
                ("virtio_blk", "virtio_pci"),
                "viostor",
                28,
                1,
                1,
                "virtio-blk (KVM): one PCI device per disk",
            ),
            ControllerFacts(
                "nvme",
                "nvme",
                "/dev/nvme0n1",
                None,
                ("nvme", "nvme_core"),
                "stornvme",
                4,
                15,
                1,
                "NVMe",
            ),
            ControllerFacts(
                "storvsc",
                "scsi",
                "/dev/sda",
                None,
                ("hv_storvsc", "hv_vmbus", *_SD),
                "storvsc",
                4,
                64,
                1,
                "Hyper-V synthetic SCSI (VMBus)",
            ),
            ControllerFacts(
                "xen-blkfront",
                "xen",
                "/dev/xvda",
                None,
                ("xen_blkfront",),
                "xenvbd",
                1,
                16,
                1,
                "Xen paravirtual block device",
            ),
        )
    }
)

#: Spellings used by sources for the same controller, mapped to our canonical model.
CONTROLLER_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "piix3": "piix4",
        "ich6": "piix4",
        "ide": "piix4",
        "sata": "ahci",
        "intelahci": "ahci",
        "lsilogicsas": "lsisas1068",
        "lsisas": "lsisas1068",
        "lsilogic-sas": "lsisas1068",
        "vmpvscsi": "pvscsi",
        "paravirtual": "pvscsi",
        "virtualscsi": "pvscsi",
        "lsi": "lsi53c895a",
        "lsi53c810": "lsi53c895a",
        "virtio-scsi-pci": "virtio-scsi",
        "virtio-scsi-single": "virtio-scsi",
        "virtioscsi": "virtio-scsi",
        "virtio": "virtio-blk",
        "hyperv-scsi": "storvsc",
        "xen": "xen-blkfront",
        "xenpv": "xen-blkfront",
    }
)

NICS: Mapping[str, NicFacts] = MappingProxyType(
    {
        n.model: n
        for n in (
            NicFacts("vmxnet3", "vmxnet3", "vmxnet3ndis6", "VMware paravirtual"),
            NicFacts("e1000", "e1000", "E1G60", "Intel 82545EM/82540EM"),
            NicFacts("e1000e", "e1000e", "e1iexpress", "Intel 82574L"),
            NicFacts("virtio", "virtio_net", "netkvm", "virtio-net (KVM)"),
            NicFacts("netvsc", "hv_netvsc", "netvsc", "Hyper-V synthetic"),
            NicFacts("dec21140", "tulip", "dc21x4", "Hyper-V legacy adapter"),
            NicFacts("rtl8139", "8139cp", "RTL8139", "Realtek RTL8139"),
            NicFacts("pcnet", "pcnet32", "PCnet", "AMD PCnet (VMware vlance, VirtualBox)"),
            NicFacts("xen-netfront", "xen_netfront", "xennet", "Xen paravirtual NIC"),
            NicFacts("ena", "ena", "ena", "AWS Elastic Network Adapter"),
        )
    }
)

NIC_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "vlance": "pcnet",
        "pcnet32": "pcnet",
        "am79c970a": "pcnet",
        "am79c973": "pcnet",
        "pcnetfast": "pcnet",
        "flexible": "pcnet",
        "virtio-net": "virtio",
        "virtio_net": "virtio",
        "e1000-82545em": "e1000",
        "82540em": "e1000",
        "82543gc": "e1000",
        "82545em": "e1000",
        "i82540em": "e1000",
        "i82545em": "e1000",
        "synthetic": "netvsc",
        "legacy": "dec21140",
        "tulip": "dec21140",
        "netfront": "xen-netfront",
        "vmxnet": "vmxnet3",
        "vmxnet2": "vmxnet3",
    }
)


@dataclass(frozen=True)
class TargetProfile:
    """What one target hypervisor offers a guest and imports."""

    name: str
    description: str
    firmware: frozenset[str]
    secure_boot: bool
    controllers: tuple[str, ...]  # controller models the target can present
    boot_controllers: Mapping[
        str, tuple[str, ...]
    ]  # firmware → models it boots from, preferred first
    data_controller: str | None  # where non-boot disks go when they must move (None: same as boot)
    nics: tuple[str, ...]  # NIC models, preferred first
    disk_formats: tuple[str, ...]  # formats it imports, default first
    max_disk_bytes: int | None
    serial_ports: bool = True
    #: which config writer produces its import file (a key of ``vm.writers.WRITERS``): the one
    #: fact ``render_target_config`` dispatches on, so no code compares target names for it
    writer: str = ""
    #: the OVF ``VirtualSystemType`` the ``ovf`` writer declares (XenServer reads ``xen-*``)
    ovf_system_type: str = "vmx-14"
    #: memory is rounded up to a multiple of this many MiB (Hyper-V and Azure: 2)
    memory_step_mb: int = 1
    cdrom_controllers: tuple[str, ...] = ()  # where CD-ROMs may hang, preferred first
    #: model → (buses, units) where the target config numbers devices itself and so caps them
    #: (Proxmox: scsi0-30 on one controller, sata0-5, ide0-3, virtio0-15).
    slot_limits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: source boot controllers a repaired Linux guest keeps on this target (its own native or
    #: paravirtual ones: pvscsi on VMware); any other moves to the preferred boot controller.
    native_boot: tuple[str, ...] = ()

    @property
    def default_disk_format(self) -> str:
        return self.disk_formats[0]

    @property
    def default_nic(self) -> str:
        return self.nics[0]

    def cdrom_models(self) -> tuple[str, ...]:
        """Controllers a CD-ROM may use: explicit list, else every non-paravirtual-block one."""
        if self.cdrom_controllers:
            return self.cdrom_controllers
        return tuple(m for m in self.controllers if m not in ("virtio-blk", "xen-blkfront", "nvme"))

    def boots_from(self, firmware: str, controller_model: str) -> bool:
        return controller_model in self.boot_controllers.get(firmware, ())

    def preferred_boot_controller(self, firmware: str) -> str:
        """The controller a new boot disk should hang on for ``firmware``."""
        try:
            return self.boot_controllers[firmware][0]
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"target {self.name} cannot boot {firmware} guests") from exc


def _boot(bios: tuple[str, ...], uefi: tuple[str, ...]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({k: v for k, v in (("bios", bios), ("uefi", uefi)) if v})


_PROXMOX_SLOTS = MappingProxyType(
    {
        "virtio-scsi": (1, 31),
        "pvscsi": (1, 31),
        "lsi53c895a": (1, 31),
        "megasas": (1, 31),
        "ahci": (1, 6),
        "piix4": (2, 2),
        "virtio-blk": (1, 16),
    }
)

_KVM_CTRL = ("virtio-blk", "virtio-scsi", "ahci", "piix4", "pvscsi", "lsi53c895a", "megasas")
_VMW_CTRL = ("lsisas1068", "pvscsi", "lsilogic", "buslogic", "ahci", "nvme", "piix4")

TARGETS: Mapping[str, TargetProfile] = MappingProxyType(
    {
        t.name: t
        for t in (
            TargetProfile(
                "kvm",
                "KVM/QEMU via libvirt",
                frozenset({"bios", "uefi"}),
                True,
                _KVM_CTRL,
                _boot(_KVM_CTRL, _KVM_CTRL),
                None,
                ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"),
                ("qcow2", "raw"),
                None,
                writer="libvirt",
                native_boot=("virtio-blk", "virtio-scsi"),
            ),
            TargetProfile(
                "proxmox",
                "Proxmox VE qemu-server",
                frozenset({"bios", "uefi"}),
                True,
                _KVM_CTRL,
                _boot(_KVM_CTRL, _KVM_CTRL),
                None,
                ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"),
                ("qcow2", "raw", "vmdk"),
                None,
                writer="proxmox",
                slot_limits=_PROXMOX_SLOTS,
                native_boot=("virtio-blk", "virtio-scsi"),
            ),
            TargetProfile(
                "hyperv",
                "Hyper-V Generation 1",
                frozenset({"bios"}),
                False,
                ("piix4", "storvsc"),
                _boot(("piix4",), ()),
                "storvsc",
                ("netvsc", "dec21140"),
                ("vhdx", "vhd"),
                64 * TIB,
                writer="hyperv",
                memory_step_mb=2,
                cdrom_controllers=("piix4",),
                notes=(
                    "boot disk must be IDE 0:0; data disks go to synthetic SCSI",
                    "VHD (not VHDX) is limited to 2040 GiB",
                ),
            ),
            TargetProfile(
                "hyperv-gen2",
                "Hyper-V Generation 2",
                frozenset({"uefi"}),
                True,
                ("storvsc",),
                _boot((), ("storvsc",)),
                None,
                ("netvsc",),
                ("vhdx",),
                64 * TIB,
                writer="hyperv",
                memory_step_mb=2,
                cdrom_controllers=("storvsc",),
                notes=("UEFI only; synthetic SCSI only; no IDE, no legacy NIC",),
            ),
            TargetProfile(
                "vmware",
                "VMware ESXi / Workstation",
                frozenset({"bios", "uefi"}),
                True,
                _VMW_CTRL,
                _boot(_VMW_CTRL, _VMW_CTRL),
                None,
                ("e1000e", "vmxnet3", "e1000", "pcnet"),
                ("vmdk-streamOptimized", "vmdk"),
                62 * TIB,
                writer="vmx",
                native_boot=("pvscsi", "lsisas1068", "lsilogic", "buslogic", "nvme"),
            ),
            TargetProfile(
                "xen",
                "XenServer / XCP-ng (OVF import)",
                frozenset({"bios", "uefi"}),
                True,
                ("xen-blkfront", "piix4"),
                _boot(("xen-blkfront", "piix4"), ("xen-blkfront",)),
                None,
                ("xen-netfront", "e1000", "rtl8139"),
                ("vhd",),
                2040 * GIB,
                writer="ovf",
                ovf_system_type="xen-3.0-unknown",
                cdrom_controllers=("piix4",),
                notes=(
                    "HVM guests boot on emulated IDE until PV drivers load, then see /dev/xvda",
                ),
            ),
            TargetProfile(
                "virtualbox",
                "Oracle VirtualBox",
                frozenset({"bios", "uefi"}),
                True,
                ("ahci", "piix4", "lsilogic", "buslogic", "lsisas1068", "nvme", "virtio-scsi"),
                _boot(
                    ("ahci", "piix4", "lsilogic", "buslogic", "lsisas1068", "nvme", "virtio-scsi"),
                    ("ahci", "piix4", "lsilogic", "buslogic", "lsisas1068", "nvme", "virtio-scsi"),
                ),
                None,
                ("e1000", "virtio", "pcnet"),
                ("vdi", "vmdk", "vhd"),
                2 * TIB,
                writer="vbox",
            ),
            TargetProfile(
                "azure",
                "Microsoft Azure (Hyper-V based)",
                frozenset({"bios", "uefi"}),
                True,
                ("storvsc",),
                _boot(("storvsc",), ("storvsc",)),
                None,
                ("netvsc",),
                ("vhd-fixed",),
                2040 * GIB,
                serial_ports=False,
                writer="azure",  # an az CLI script: Azure imports no VM config
                memory_step_mb=2,  # Hyper-V underneath
                notes=("fixed VHD whose virtual size is a whole number of MiB",),
            ),
            TargetProfile(
                "ovf",
                "Generic OVF 1.x (VMware import)",
                frozenset({"bios", "uefi"}),
                True,
                ("lsilogic", "lsisas1068", "pvscsi", "buslogic", "ahci", "piix4"),
                _boot(
                    ("lsilogic", "lsisas1068", "pvscsi", "buslogic", "ahci", "piix4"),
                    ("lsisas1068", "pvscsi", "lsilogic", "ahci"),
                ),
                None,
                ("e1000", "vmxnet3", "e1000e", "pcnet"),
                ("vmdk-streamOptimized",),
                62 * TIB,
                writer="ovf",
                native_boot=("pvscsi", "lsisas1068", "lsilogic", "buslogic"),
            ),
        )
    }
)

#: Maximum virtual size of a disk format, where the format itself imposes one.
FORMAT_MAX_BYTES: Mapping[str, int] = MappingProxyType(
    {
        "vhd": 2040 * GIB,
        "vhd-fixed": 2040 * GIB,
        "vhdx": 64 * TIB,
        "vmdk": 62 * TIB,
        "vmdk-streamOptimized": 62 * TIB,
        "vdi": 2 * TIB,
    }
)


def get_target(name: str) -> TargetProfile:
    """The profile called ``name``; a ConfigError naming the valid targets otherwise."""
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown target {name!r}", hint="one of: " + ", ".join(sorted(TARGETS))
        ) from None


def canonical_controller(model: str | None) -> str | None:
    """Our name for a source's controller model spelling, or None when unknown."""
    if not model:
        return None
    key = model.strip().lower()
    if key in CONTROLLERS:
        return key
    return CONTROLLER_ALIASES.get(key)


def canonical_nic(model: str | None) -> str | None:
    """Our name for a source's NIC model spelling, or None when unknown."""
    if not model:
        return None
    key = model.strip().lower()
    if key in NICS:
        return key
    return NIC_ALIASES.get(key)


def get_controller(model: str) -> ControllerFacts:
    """Facts for a controller model (aliases accepted); ConfigError when unknown."""
    canon = canonical_controller(model)
    if canon is None:
        raise ConfigError(f"unknown controller model {model!r}")
    return CONTROLLERS[canon]


def default_model_for_kind(kind: str) -> str:
    """The controller model a source means when it names only the kind (``ide``, ``sata``, ...)."""
    return {
        "ide": "piix4",
        "sata": "ahci",
        "scsi": "lsilogic",
        "nvme": "nvme",
        "virtio": "virtio-blk",
        "xen": "xen-blkfront",
    }[kind]


def linux_drivers_for(target: str, firmware: str = "bios") -> tuple[str, ...]:
    """Every module a Linux initramfs needs to boot on ``target`` whatever controller is picked."""
    prof = get_target(target)
    seen: dict[str, None] = {}
    for model in prof.boot_controllers.get(firmware, ()):
        for mod in CONTROLLERS[model].linux_drivers:
            seen.setdefault(mod, None)
    return tuple(seen)
