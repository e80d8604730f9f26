"""End to end: ``vmferry migrate`` on a real Debian guest packaged as every hypervisor's VM.

The guest is tests.bootkit's VMware guest (``/dev/sda1`` names, a pvscsi-only initramfs,
open-vm-tools, the vmware xorg driver): the hardest of the guest-repair issue's guests.
:mod:`tests.migrate.packaging` wraps it as a VMware folder (.vmx, VMDK base + snapshot delta),
an OVA, a Hyper-V 2012 R2 folder (VHDX + AVHDX + XML), a VirtualBox VM (.vbox, VDI + snapshot
VDI) and a libvirt VM (domain XML, qcow2 overlay); each is migrated to every other target.

Oracles, none of them ours: ``virt-xml-validate`` (libvirt's schema), ``qemu-img info/check/
compare`` on every output disk (qemu's drivers), ``bash -n`` on the VirtualBox script, a real
boot under qemu TCG, and the source files' bytes (unchanged).  vmferry's own readers re-read the
configs it wrote (the brief asks for that too; it checks writer and reader agree).

Budget (~10 minutes on the 2-core test machine) decides the shape:

* every (source, target) pair is migrated once per session, under a file lock in a directory
  the pytest-xdist workers share, so tests reuse outputs instead of converting again;
* an output is booted once per distinct (guest content, controller): every output of one
  target and boot controller must read the same as the first such output (``qemu-img
  compare``), so booting one of them shows how all of them boot on that controller.
  SOURCE_DATE_EPOCH is set while migrating (see :func:`reproducible`) so that two migrations
  of one guest to one target can be compared byte for byte;
* streamOptimized OVA outputs cost over a minute each (deflate): the ``vmware`` target is
  written as an OVA from one source and as .vmx + monolithicSparse VMDK from the others; the
  ``ovf`` target (OVA only) is made from the VMware source, and from every source when
  ``VMFERRY_E2E_FULL=1``.

Cost on the 2-core machine: ~6 minutes with ``-n 2`` when it is otherwise idle (packaging
~10 s once the OVA's disk is cached, ~32 migrations of 8-15 s, two OVA outputs of ~40-90 s,
seven boots of ~45 s), 13-15 minutes while other sessions load it.  Disk: sources ~3 GB, every
output ~650 MB; a target's tests run together (tests/migrate/conftest.py) and its outputs are
deleted when the last of them ends (``_release_outputs``).  Kept to the end of the run, the
outputs took ~20 GB, and filled a CI machine's disk together with the other tests' files.

Controllers qemu cannot present to the guest the way the target does are not booted, with the
reason: VMware's LSI Logic parallel/SAS (qemu's lsi53c895a is another chip; its mptsas1068
shows no disk to Linux), Hyper-V's VMBus SCSI (Azure) and Xen's PV block device.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.bootkit import require, require_tools
from tests.bootkit.guest import VMWARE_GUEST, BuiltGuest, build_image, cached_image
from tests.bootkit.guest import missing_build_tools as missing_guest_tools
from tests.migrate import packaging
from tests.migrate.packaging import OWN_TARGET, SOURCE_KINDS, PackagedVm

#: every target but Generation 2 Hyper-V, which must refuse this BIOS guest (tested apart)
TARGETS = ("kvm", "proxmox", "hyperv", "vmware", "xen", "virtualbox", "azure", "ovf")
#: the source whose output of a target every other source's output is compared with
REFERENCE = {t: ("hyperv" if t == "vmware" else "vmware") for t in TARGETS}
FULL = os.environ.get("VMFERRY_E2E_FULL", "") not in ("", "0")
#: fitted controller model -> the qemu controller (tests.bootkit.boot) that presents it
QEMU_CONTROLLER = {
    "virtio-blk": "virtio-blk",
    "virtio-scsi": "virtio-scsi",
    "piix4": "ide",
    "ahci": "sata",
    "pvscsi": "pvscsi",
    "lsi53c895a": "lsi",
    "megasas": "megasas",
    "nvme": "nvme",
}
NOT_IN_QEMU = {
    "lsilogic": "VMware's LSI Logic (53c1030, Linux mptspi) has no qemu model",
    "lsisas1068": "qemu's mptsas1068 shows no disk to the Debian kernel (HYPERVISOR-FACTS.md)",
    "buslogic": "qemu has no BusLogic model",
    "storvsc": "qemu has no Hyper-V VMBus: the synthetic SCSI the guest now drives is absent",
    "xen-blkfront": "qemu outside Xen has no Xen PV block device",
}
#: qemu's block driver for each output disk format (as migrate names it)
QEMU_FORMAT = {"qcow2": "qcow2", "raw": "raw", "vhdx": "vhdx", "vhd": "vpc", "vmdk": "vmdk",
               "vdi": "vdi"}  # fmt: skip
#: seconds a boot may take: ~45 s alone, over 100 s while other tests load the 2 cores (a
#: failing boot ends early, on the first failure line)
BOOT_TIMEOUT = 360
#: the moment every migration here believes it is (2026-01-01T00:00:00Z)
FROZEN_TIME = 1767225600.0


def pairs(full: bool = FULL) -> list[tuple[str, str, str | None]]:
    """(source, target, format) of the session: every source to every target but its own."""
    out = []
    for kind in SOURCE_KINDS:
        for target in TARGETS:
            if OWN_TARGET[kind] == target:
                continue
            fmt = None
            if target == "vmware" and kind != REFERENCE["vmware"]:
                fmt = "vmdk"  # .vmx + monolithicSparse; the OVA is made from the reference
            if target == "ovf" and kind != REFERENCE["ovf"] and not full:
                continue
            out.append((kind, target, fmt))
    return out


# --------------------------------------------------------------------------------------------
# session state shared by the xdist workers


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def reproducible() -> Iterator[None]:
    """Pin the time vmferry writes into the guest (ext4 inode and superblock times).

    vmferry honours ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) and derives new
    inodes' generation numbers from the filesystem UUID, so two migrations of one guest to one
    target are byte-equal and ``qemu-img compare`` shows they carry the same guest.
    """
    with mock.patch.dict(os.environ, {"SOURCE_DATE_EPOCH": str(int(FROZEN_TIME))}):
        yield


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One directory for the whole run: with pytest-xdist, the workers' common parent.

    The sources and ~30 migrated disks take ~20 GB, so the last worker to finish deletes them
    (pytest would keep three runs of them).  ``VMFERRY_E2E_DIR`` names a directory to keep
    between runs instead (while working on these tests: sources and outputs are reused as
    long as the guest image is the same build).
    """
    if os.environ.get("VMFERRY_E2E_DIR"):
        path = Path(os.environ["VMFERRY_E2E_DIR"])
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "e2e-migrate"
    users = path / "users"
    users.mkdir(parents=True, exist_ok=True)
    me = users / (os.environ.get("PYTEST_XDIST_WORKER") or "main")
    me.touch()
    yield path
    with locked(path / "sources.lock"):
        me.unlink(missing_ok=True)
        if not any(users.iterdir()):
            (path / "sources.json").unlink(missing_ok=True)
            for big in ("sources", "out", "ended"):
                shutil.rmtree(path / big, ignore_errors=True)


@pytest.fixture(scope="session")
def guest() -> BuiltGuest:
    require_tools(
        ("qemu-img", "qemu-utils"), ("qemu-io", "qemu-utils"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    )  # fmt: skip
    if cached_image(VMWARE_GUEST) is None:
        missing = missing_guest_tools()
        require(not missing, "cannot build the Debian test guest: missing " + ", ".join(missing))
    return build_image(VMWARE_GUEST)


def _stat_signature(folder: Path) -> dict[str, list[int]]:
    """Size and mtime of every file below ``folder``: what "the source is untouched" means."""
    return {
        str(p): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def sources(shared_dir: Path, guest: BuiltGuest) -> dict[str, PackagedVm]:
    """Every source VM, built once per run (the OVA's disk once per guest build)."""
    state = shared_dir / "sources.json"
    with locked(shared_dir / "sources.lock"):
        if state.exists() and json.loads(state.read_text())["guest"] != str(guest.path):
            state.unlink()  # another build of the guest: every source and output is stale
            shutil.rmtree(shared_dir / "out", ignore_errors=True)
        if not state.exists():
            dest = shared_dir / "sources"
            if dest.exists():
                shutil.rmtree(dest)  # a worker died half way: start over
            vms = packaging.package_all(
                guest.path, dest, ova_disk=packaging.cached_stream_vmdk(guest.path)
            )
            doc = {
                "vms": {k: packaging.to_json(v) for k, v in vms.items()},
                "signature": {k: _stat_signature(v.folder) for k, v in vms.items()},
                "guest": str(guest.path),
            }
            state.write_text(json.dumps(doc))
        doc = json.loads(state.read_text())
    return {k: packaging.from_json(v) for k, v in doc["vms"].items()}


@dataclass
class Migrated:
    """One finished migration: its result document and output directory."""

    source: str
    target: str
    doc: dict[str, Any]
    outdir: Path

    @property
    def disk(self) -> dict[str, Any]:
        return self.doc["disks"][0]

    @property
    def controller_model(self) -> str:
        return self.doc["after"]["disks"][0]["controller_model"]

    @property
    def qemu_format(self) -> str:
        return QEMU_FORMAT[self.disk["output"]["format"].split("-")[0]]


def _key(kind: str, target: str, fmt: str | None) -> str:
    return f"{kind}-{target}-{fmt or 'default'}"


def _migrate(shared: Path, vms: dict[str, PackagedVm], kind: str, target: str,
             fmt: str | None) -> Migrated:  # fmt: skip
    from vmferry.errors import VmferryError
    from vmferry.migrate import migrate

    key = _key(kind, target, fmt)
    out = shared / "out" / key
    done = shared / "out" / f"{key}.json"
    with locked(shared / f"{key}.lock"):
        released = done.exists() and not out.exists()  # a test outside the count needs it
        if released and json.loads(done.read_text())["status"] == "completed":
            done.unlink()
        if not done.exists():
            if out.exists():
                shutil.rmtree(out)
            started = time.monotonic()
            try:
                with reproducible():
                    result = migrate(vms[kind].config, target, out, format=fmt)
                doc = result.to_json()
            except VmferryError as exc:  # one failed pair must not hide the others' results
                doc = {"status": "raised", "error": {"type": type(exc).__name__,
                                                     "message": str(exc)}}  # fmt: skip
            doc["test_seconds"] = round(time.monotonic() - started, 1)
            done.write_text(json.dumps(doc))
        doc = json.loads(done.read_text())
    return Migrated(kind, target, doc, out)


@pytest.fixture(autouse=True)
def _release_outputs(request: pytest.FixtureRequest, shared_dir: Path) -> Iterator[None]:
    """Delete a target's migrated disks once every test of this run that reads them has ended
    (counted and grouped at collection: tests/migrate/conftest.py).  A later reader would
    migrate again (``_migrate``), so a miscount costs time, never a wrong result."""
    yield
    from tests.migrate.conftest import E2E_READERS, _target_of

    target = _target_of(request.node)
    readers = request.config.stash.get(E2E_READERS, {}).get(target or "", 0)
    if not target or not readers:
        return
    with locked(shared_dir / "release.lock"):
        ended = shared_dir / "ended" / target
        ended.parent.mkdir(exist_ok=True)
        with open(ended, "a") as f:
            f.write(request.node.nodeid + "\n")
        if len(set(ended.read_text().splitlines())) < readers:
            return
        for kind, t, fmt in pairs(full=True):
            if t == target:
                with locked(shared_dir / f"{_key(kind, t, fmt)}.lock"):
                    shutil.rmtree(shared_dir / "out" / _key(kind, t, fmt), ignore_errors=True)


@pytest.fixture(scope="session")
def migrated(shared_dir: Path, sources: dict[str, PackagedVm]):
    """``migrated(source, target)`` -> :class:`Migrated`, converting on first use only."""
    formats = {(k, t): f for k, t, f in pairs(full=True)}

    def get(kind: str, target: str) -> Migrated:
        return _migrate(shared_dir, sources, kind, target, formats[(kind, target)])

    return get


def output_disk(m: Migrated, work: Path) -> Path:
    """The output disk as a file qemu can open (an OVA's VMDK is extracted into ``work``)."""
    path = Path(m.disk["output"]["path"])
    if not m.disk["output"].get("in_ova"):
        return path
    ova = next(p for p in map(Path, m.doc["outputs"]) if p.suffix == ".ova")
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(ova) as tar:
        member = tar.getmember(m.disk["output"]["name"])
        tar.extract(member, work, filter="data")
    return work / member.name


# --------------------------------------------------------------------------------------------
# the sources themselves


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_source_is_a_snapshot_chain_that_reads_as_the_guest(
    kind: str, sources: dict[str, PackagedVm], guest: BuiltGuest, tmp_path: Path
) -> None:
    """The fixture is what it claims: the active layer reads as the guest, the base alone
    does not (its GRUB core is zeroed), so only a whole-chain read gives a bootable disk."""
    from tests.conftest import qemu_img

    vm = sources[kind]
    if kind == "ova":
        disk = tmp_path / "disk1.vmdk"
        with tarfile.open(vm.config) as tar:
            names = tar.getnames()
            assert names[0].endswith(".ovf") and names[-1].endswith(".mf"), names
            disk.write_bytes(tar.extractfile(vm.meta["disk_member"]).read())  # type: ignore[union-attr]
        assert qemu_img("info", "--output=json", disk).stdout.count("streamOptimized")
        qemu_img("compare", "-f", "raw", "-F", "vmdk", guest.path, disk)
        return
    base = vm.disks[0]
    if vm.top_format in ("vmdk", "qcow2"):
        info = json.loads(qemu_img("info", "--backing-chain", "--output=json", vm.top).stdout)
        assert len(info) == 2, info  # qemu itself sees base + snapshot
        qemu_img("compare", "-f", "raw", "-F", vm.top_format, guest.path, vm.top)
    else:
        # qemu cannot follow VHDX or VDI differencing images: vmferry reads the chain here and
        # qemu the base (a VDI/VHDX base alone is within qemu's reach)
        proc = subprocess.run(
            ["vmferry", "compare", "--allow-dir", vm.folder, guest.path, vm.top],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    differs = qemu_img("compare", "-f", "raw", "-F", vm.top_format, guest.path, base, check=False)
    assert differs.returncode == 1, differs.stdout + differs.stderr
    assert f"offset {packaging.CORE_OFFSET}" in differs.stdout, differs.stdout


def test_libvirt_source_is_schema_valid(sources: dict[str, PackagedVm]) -> None:
    validate_libvirt(sources["libvirt"].config)


# --------------------------------------------------------------------------------------------
# migrate to every target, and check each result for its target


def validate_libvirt(xml: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    require(tool is not None, "virt-xml-validate is missing (apt-get install libvirt-clients)")
    proc = subprocess.run([tool, str(xml), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _check_disk(path: Path, fmt: str, size: int) -> None:
    from tests.conftest import qemu_img

    info = json.loads(qemu_img("info", "-f", fmt, "--output=json", path).stdout)
    assert info["virtual-size"] >= size, info
    assert info.get("backing-filename") is None, info  # the chain was flattened
    if fmt in ("qcow2", "vmdk", "vhdx", "vdi"):  # the formats qemu-img check knows
        check = qemu_img("check", "-f", fmt, path, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def _validate_config(m: Migrated, disk: Path) -> None:
    """The target config is valid for its target, and names the disk that was written."""
    from vmferry.vm import read_config

    config = Path(m.doc["config_path"])
    assert config.is_file(), m.doc["outputs"]
    text = config.read_text(errors="replace") if config.suffix != ".ova" else ""
    written = m.doc["after"]["disks"][0]
    if config.suffix == ".xml":  # libvirt
        validate_libvirt(config)
        assert f"file='{disk}'" in text.replace('"', "'"), text
    if config.suffix in (".ps1",):  # Hyper-V / Azure: PowerShell; the disk it attaches exists
        assert f"'{disk.name}'" in text, text
        if "-Generation 1" in text:  # a Generation 1 VM boots from IDE only
            (attach,) = [ln for ln in text.splitlines() if f"'{disk.name}'" in ln]
            assert "-ControllerType IDE" in attach, attach
    if config.name.endswith(".azure.sh"):  # Azure: az CLI commands; bash parses them
        subprocess.run(["bash", "-n", str(config)], check=True)
        assert f"--type page --name {disk.name} " in text, text
        assert "--attach-os-disk" in text, text
    elif config.suffix == ".sh":  # VirtualBox: VBoxManage commands; bash parses them
        subprocess.run(["bash", "-n", str(config)], check=True)
        assert f"--medium {disk.name}" in text, text
    if config.suffix in (".xml", ".conf", ".vmx", ".ovf", ".ova"):  # vmferry re-reads them
        model = read_config(config)
        (boot,) = [d for d in model.disks if d.device == "disk"]
        stored = Path((boot.path or "").rsplit(":", 1)[-1]).name  # Proxmox: storage:volume
        assert stored == disk.name or m.disk["output"].get("in_ova"), (boot.path, disk)
        assert boot.controller_model == written["controller_model"], (boot, written)
        assert model.firmware == "bios"
        assert model.memory_mb == packaging.MEMORY_MB and model.cpus == packaging.CPUS
    if config.suffix == ".conf":  # Proxmox: one SCSI model per VM, boot from the disk
        assert "boot: order=" in text, text


@pytest.mark.parametrize(("kind", "target", "fmt"), pairs())
def test_migrate(
    kind: str, target: str, fmt: str | None, migrated, sources, guest: BuiltGuest,
    shared_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    m = migrated(kind, target)
    doc = m.doc
    print(f"{kind} -> {target}: {doc['status']} in {doc.get('test_seconds')} s")
    problems = [f for f in doc.get("findings", []) if f["severity"] in ("blocker", "warning")]
    assert doc["status"] == "completed", json.dumps([doc["error"], *problems], indent=1)
    print(f"boot disk on {m.controller_model}; timings {doc['timings']}")
    assert not [f for f in doc["findings"] if f["severity"] == "blocker"]
    assert Path(doc["config_path"]).name in {Path(p).name for p in doc["outputs"]}
    for p in doc["outputs"]:
        assert Path(p).is_file(), p
    assert m.disk["verify"]["ok"], m.disk["verify"]
    assert m.disk["guest_after"]["bootable"], m.disk["guest_after"]
    assert m.disk["guest_after"]["remaining_changes"] == []
    disk = output_disk(m, tmp_path / "ova")
    _check_disk(disk, m.qemu_format, guest.path.stat().st_size)
    _validate_config(m, disk)
    signature = json.loads((shared_dir / "sources.json").read_text())["signature"][kind]
    assert _stat_signature(sources[kind].folder) == signature, "the source was modified"


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_hyperv_gen2_refuses_the_bios_guest(
    kind: str, sources: dict[str, PackagedVm], tmp_path: Path
) -> None:
    """Generation 2 boots UEFI only: a blocker, explained, and nothing written (exit 9)."""
    out = tmp_path / "gen2"
    proc = subprocess.run(
        ["vmferry", "migrate", str(sources[kind].config), "--to", "hyperv-gen2",
         "-o", str(out), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 9, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "blocked"
    blockers = [f for f in doc["findings"] if f["severity"] == "blocker"]
    assert blockers and any("BIOS" in f["message"] or "bios" in f["message"] for f in blockers)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# --------------------------------------------------------------------------------------------
# the same target gives the same guest, whatever the source


@pytest.mark.parametrize("target", TARGETS)
def test_every_source_gives_the_same_guest(target: str, migrated, tmp_path: Path) -> None:
    """Each output of ``target`` reads exactly like the first output of that target whose boot
    disk is on the same controller (the reference source's first): the repair depends on the
    guest and the controller only.  (A controller can differ by source: a pvscsi VMware guest
    stays on pvscsi on vmware, an IDE one moves to LSI SAS.)"""
    from tests.conftest import qemu_img

    ref = migrated(REFERENCE[target], target)
    assert ref.doc["status"] == "completed", ref.doc["error"]
    firsts: dict[str, tuple[Migrated, Path]] = {
        ref.controller_model: (ref, output_disk(ref, tmp_path / "ref"))
    }
    others = [k for k, t, _ in pairs() if t == target and k != REFERENCE[target]]
    failed = []
    for kind in others:
        m = migrated(kind, target)
        if m.doc["status"] != "completed":
            failed.append(f"{kind}: {m.doc['status']} {m.doc['error']}")
            continue
        disk = output_disk(m, tmp_path / kind)
        if m.controller_model not in firsts:
            firsts[m.controller_model] = (m, disk)
            continue
        first, first_disk = firsts[m.controller_model]
        proc = qemu_img(
            "compare", "-f", first.qemu_format, "-F", m.qemu_format, first_disk, disk, check=False
        )
        if proc.returncode != 0:
            failed.append(f"{kind} vs {first.source}: {proc.stdout.strip()} {proc.stderr.strip()}")
    assert not failed, failed


# --------------------------------------------------------------------------------------------
# boot


@pytest.mark.boot
@pytest.mark.parametrize("target", TARGETS)
def test_boots_on_the_controller_its_config_names(
    target: str, migrated, shared_dir: Path, tmp_path: Path
) -> None:
    """One boot per controller the outputs of ``target`` use (their content is one guest)."""
    from tests.boot.test_boot_baseline import assert_booted
    from tests.bootkit.boot import boot

    groups: dict[str, Migrated] = {}
    for kind, t, _ in pairs():
        if t == target:
            m = migrated(kind, target)
            if m.doc["status"] == "completed":
                groups.setdefault(m.controller_model, m)
    assert groups, f"no completed migration to {target}"
    skipped = []
    for model, m in sorted(groups.items()):
        controller = QEMU_CONTROLLER.get(model)
        if controller is None:
            skipped.append(f"{model} ({m.source}): {NOT_IN_QEMU.get(model, 'unknown')}")
            continue
        disk = output_disk(m, tmp_path / m.source)
        log = shared_dir / "boots" / f"{m.source}-{target}-{controller}.log"
        log.parent.mkdir(exist_ok=True)
        result = boot(disk, m.qemu_format, controller, timeout=BOOT_TIMEOUT, log_path=log)
        print(f"{m.source} -> {target} on {controller}: {result.outcome} in {result.elapsed} s")
        assert_booted(result, controller)
    if skipped:
        print("not booted: " + "; ".join(skipped))
        if len(skipped) == len(groups):
            pytest.skip("no controller of these outputs exists in qemu: " + "; ".join(skipped))


@pytest.mark.parametrize(("kind", "target", "fmt"), pairs())
def test_repair_is_for_the_controller_the_config_names(
    kind: str, target: str, fmt: str | None, migrated
) -> None:
    """The drivers the repair adds are for the controller the target config attaches the boot
    disk to; otherwise the repair is wasted and the disk boots only where the old driver
    happens to fit the kept controller."""
    m = migrated(kind, target)
    if m.doc["status"] != "completed":
        pytest.skip(f"no migration to look at (test_migrate[{kind}-{target}] fails)")
    on = re.compile(r"root disk on ([\w-]+)")
    fixes = [
        hit.group(1)
        for f in m.doc["findings"]
        if f["code"] == "fix-initramfs" and (hit := on.search(f["message"]))
    ]
    assert fixes in ([], [m.controller_model]), (m.controller_model, fixes)


# --------------------------------------------------------------------------------------------
# preflight: predicts the failure before the repair, and success after it


def test_preflight_explains_why_the_unrepaired_guest_fails_on_kvm(
    sources: dict[str, PackagedVm], guest: BuiltGuest, tmp_path: Path
) -> None:
    """The unrepaired guest fails on virtio-blk with "ALERT! /dev/sda1 does not exist"
    (tests/boot baseline b): the dry run must name both causes, with the guest's own lines."""
    from vmferry.migrate import migrate

    result = migrate(sources["hyperv"].config, "kvm", tmp_path / "out", dry_run=True)
    assert result.status == "planned" and not (tmp_path / "out").exists()
    doc = result.to_json()
    assert doc["after"]["disks"][0]["controller_model"] == "virtio-blk"
    by_code: dict[str, list[dict[str, Any]]] = {}
    for f in doc["findings"]:
        by_code.setdefault(f["code"], []).append(f)
    initramfs = [f for f in by_code.get("fix-initramfs", []) if "virtio_blk" in f["message"]]
    assert initramfs and initramfs[0]["severity"] == "will-fix", doc["findings"]
    names = [e["text"] for f in by_code.get("fix-fstab", []) for e in f["evidence"]]
    assert any(t and t.startswith("/dev/sda1") for t in names), by_code.get("fix-fstab")
    grub = [e["text"] for f in by_code.get("fix-grub", []) for e in f["evidence"]]
    assert any(t and "root=/dev/sda1" in t for t in grub), by_code.get("fix-grub")


#: the migrated VM given back to migrate: its config where vmferry reads that config, else its
#: disk (the Hyper-V and VirtualBox outputs are scripts)
AGAIN = {"kvm": "hyperv", "proxmox": "libvirt", "hyperv": "libvirt", "virtualbox": "libvirt"}


@pytest.mark.parametrize("target", sorted(AGAIN))
def test_preflight_of_the_migrated_vm_predicts_success(
    target: str, migrated, tmp_path: Path
) -> None:
    """Migrating the output again to its own target: nothing blocks, nothing left to fix."""
    from vmferry.migrate import migrate

    m = migrated(AGAIN[target], target)
    assert m.doc["status"] == "completed", m.doc["error"]
    config = Path(m.doc["config_path"])
    again_src = config if config.suffix in (".xml", ".conf") else Path(m.disk["output"]["path"])
    again = migrate(again_src, target, tmp_path / "again", dry_run=True).to_json()
    severe = [f for f in again["findings"] if f["severity"] in ("blocker", "will-fix")]
    assert not severe, severe
    assert again["guest"]["bootable"], again["guest"]
