"""The network rule end to end: real ext4 images, netplan's own generator and udev's rule parser
as oracles, e2fsck and debugfs on the written image."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.guest.conftest import GuestDisk, build_guest_disk, debugfs_cat, e2fsck_clean, vmware_root
from vmferry.guest.linux.fix import apply_fixes, plan_fixes
from vmferry.guest.linux.rules.network_names import PIN_RULES, pin_rule_text

NETPLAN = "/etc/netplan/50-cloud-init.yaml"
CLOUD_DISABLE = "/etc/cloud/cloud.cfg.d/99-disable-network-config.cfg"
MAC = "00:0c:29:aa:bb:cc"
CLOUD_INIT_YAML = f"""\
# This file is generated from information provided by the datasource.  Changes
# to it will not persist across an instance reboot.  To disable cloud-init's
# network configuration capabilities, write a file
# /etc/cloud/cloud.cfg.d/99-disable-network-config.cfg with the following:
# network: {{config: disabled}}
network:
    ethernets:
        eth0:
            dhcp4: true
            match:
                macaddress: {MAC}
            set-name: eth0
    version: 2
"""
#: what makes a guest use predictable interface names (udev's naming rule is installed)
PREDICTABLE = {"lib/udev/rules.d/80-net-setup-link.rules": "# naming\n", "etc/udev/rules.d/x": ""}
CLOUD = {
    "etc/cloud/cloud.cfg": "datasource_list: [ NoCloud, None ]\n",
    "etc/cloud/cloud.cfg.d/05.cfg": "a: 1\n",
}


def _disk(tmp_path: Path, files: dict[str, str]) -> GuestDisk:
    root = vmware_root(tmp_path)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return build_guest_disk(tmp_path, root)


def _network(target: str, disk: GuestDisk) -> tuple[dict[str, str], list]:
    changes, findings = plan_fixes(disk.img, target)
    final = {c.path: c.after for c in changes if c.rule == "network"}
    return final, [f for f in findings if f.rule == "network"]


def netplan_generate(tmp: Path, files: dict[str, str]) -> dict[str, str]:
    """Run netplan's own generator on ``files`` (guest path → text); its output files."""
    require_tool("netplan")
    root = tmp / f"np{len(list(tmp.glob('np*')))}"
    for path, text in files.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(0o600)
    proc = subprocess.run(
        ["netplan", "generate", "--root-dir", str(root)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return {
        str(p.relative_to(root)): p.read_text()
        for p in (root / "run").rglob("*")
        if p.is_file() and "netplan-ovs" not in p.name
    }


def _apply_and_check(tmp_path: Path, disk: GuestDisk, target: str) -> dict[str, str]:
    out = tmp_path / "fixed.raw"
    result = apply_fixes(disk.img, target, output=out)
    start, size = disk.parts[1]
    part = tmp_path / "fixed-p1.raw"
    with open(out, "rb") as f, open(part, "wb") as g:
        f.seek(start)
        g.write(f.read(size))
    ok, report = e2fsck_clean(part)
    assert ok, report
    final = {c.path: c.after for c in result.plan.changes}
    for path, text in final.items():
        assert debugfs_cat(part, path) == text.encode(), path
    again, findings = plan_fixes(out, target)
    assert [c for c in again if c.rule == "network"] == []  # idempotent
    assert [f for f in findings if f.rule == "network"] == [
        f for f in result.plan.findings if f.rule == "network"
    ]
    return final


def test_cloud_init_mac_match_becomes_a_name_match(tmp_path: Path) -> None:
    disk = _disk(
        tmp_path, {"etc/netplan/50-cloud-init.yaml": CLOUD_INIT_YAML, **PREDICTABLE, **CLOUD}
    )
    final, findings = _network("kvm", disk)
    assert findings == []
    after = final[NETPLAN]
    # one line changed, everything else byte for byte
    assert after == CLOUD_INIT_YAML.replace(
        f"macaddress: {MAC}", f"name: eth0  # vmferry: was macaddress: {MAC}"
    )
    before_gen = netplan_generate(tmp_path, {NETPLAN: CLOUD_INIT_YAML})
    after_gen = netplan_generate(tmp_path, {NETPLAN: after})
    assert MAC in before_gen["run/systemd/network/10-netplan-eth0.network"]  # the oracle sees it
    network = after_gen["run/systemd/network/10-netplan-eth0.network"]
    assert re.search(r"^\[Match\]\nName=eth0\n\n", network, re.MULTILINE), network
    assert not any(MAC in text for text in after_gen.values())
    assert "DHCP=ipv4" in network
    # cloud-init would render the old MAC match again: its documented switch is written
    assert final[CLOUD_DISABLE].endswith("network: {config: disabled}\n")
    # the NIC must be called eth0 for the definition to match: the udev rule pins it
    rule = final[PIN_RULES]
    assert rule.rstrip().endswith('NAME="eth0"') and "virtio_net" in rule
    _apply_and_check(tmp_path, disk, "kvm")


def test_driver_match_goes_too_and_unnamed_single_definition_matches_any_ethernet(
    tmp_path: Path,
) -> None:
    yaml_text = (
        "network:\n"
        "  version: 2\n"
        "  renderer: networkd\n"
        "  ethernets:\n"
        "    lan:  # the only NIC\n"
        "      match:\n"
        "        driver: vmxnet3\n"
        f'        macaddress: "{MAC.upper()}"\n'
        "      addresses: [192.0.2.10/24]\n"
        "      routes:\n"
        "        - to: default\n"
        "          via: 192.0.2.1\n"
    )
    disk = _disk(tmp_path, {"etc/netplan/01-netcfg.yaml": yaml_text, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert findings == []
    after = final["/etc/netplan/01-netcfg.yaml"]
    assert after == yaml_text.replace(
        f'        driver: vmxnet3\n        macaddress: "{MAC.upper()}"\n',
        f'        name: "e*"  # vmferry: was driver: vmxnet3; macaddress: "{MAC.upper()}"\n',
    )
    gen = netplan_generate(tmp_path, {"/etc/netplan/01-netcfg.yaml": after})
    network = gen["run/systemd/network/10-netplan-lan.network"]
    assert "Name=e*" in network and "Driver" not in network and "MACAddress" not in network
    assert "Address=192.0.2.10/24" in network
    assert PIN_RULES not in final  # no name to keep: the glob takes the new name
    assert CLOUD_DISABLE not in final  # not cloud-init's file
    _apply_and_check(tmp_path, disk, "kvm")


def test_several_mac_matches_are_left_alone_with_a_finding(tmp_path: Path) -> None:
    yaml_text = (
        "network:\n  version: 2\n  ethernets:\n"
        f"    a:\n      match:\n        macaddress: {MAC}\n      dhcp4: true\n"
        "    b:\n      match:\n        macaddress: 00:0c:29:00:00:02\n      dhcp4: false\n"
    )
    disk = _disk(tmp_path, {"etc/netplan/50-x.yaml": yaml_text, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert "/etc/netplan/50-x.yaml" not in final and PIN_RULES not in final
    assert len(findings) == 2 and all(f.severity == "warning" for f in findings)
    assert {f.path for f in findings} == {"/etc/netplan/50-x.yaml"}


def test_yaml_outside_the_subset_is_reported_not_edited(tmp_path: Path) -> None:
    yaml_text = (
        "network:\n  version: 2\n  ethernets:\n    eth0: &e\n"
        f"      match: {{macaddress: {MAC}}}\n      set-name: eth0\n"
    )
    disk = _disk(tmp_path, {"etc/netplan/50-x.yaml": yaml_text, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert final == {}
    (finding,) = findings
    assert finding.severity == "warning" and "anchors" in finding.message


def test_flow_style_match_is_reported(tmp_path: Path) -> None:
    yaml_text = (
        "network:\n  version: 2\n  ethernets:\n    eth0:\n"
        f"      match: {{macaddress: {MAC}}}\n      set-name: eth0\n"
    )
    disk = _disk(tmp_path, {"etc/netplan/50-x.yaml": yaml_text, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert final == {}
    assert [f.severity for f in findings] == ["warning"]


@pytest.mark.parametrize("target", ["azure", "hyperv"])
def test_cloud_init_stays_in_charge_on_a_cloud(tmp_path: Path, target: str) -> None:
    disk = _disk(
        tmp_path, {"etc/netplan/50-cloud-init.yaml": CLOUD_INIT_YAML, **PREDICTABLE, **CLOUD}
    )
    final, findings = _network(target, disk)
    assert NETPLAN in final
    if target == "azure":
        assert CLOUD_DISABLE not in final
        assert [f.severity for f in findings] == ["info"]
    else:
        assert CLOUD_DISABLE in final and findings == []


def test_cloud_init_already_disabled_is_left_alone(tmp_path: Path) -> None:
    files = {
        "etc/netplan/50-cloud-init.yaml": CLOUD_INIT_YAML,
        **PREDICTABLE,
        **CLOUD,
        "etc/cloud/cloud.cfg.d/99-mine.cfg": "network:\n  config: disabled\n",
    }
    final, _ = _network("kvm", _disk(tmp_path, files))
    assert NETPLAN in final and CLOUD_DISABLE not in final


INTERFACES = "auto lo\niface lo inet loopback\n\nallow-hotplug ens192\niface ens192 inet dhcp\n"


def test_debian_pci_slot_name_is_pinned_by_udev_rule(tmp_path: Path) -> None:
    disk = _disk(tmp_path, {"etc/network/interfaces": INTERFACES, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert findings == []
    assert "/etc/network/interfaces" not in final  # the config stays as the admin wrote it
    assert final[PIN_RULES] == pin_rule_text("ens192", "kvm", ["/etc/network/interfaces"])
    written = _apply_and_check(tmp_path, disk, "kvm")
    assert written[PIN_RULES] == final[PIN_RULES]


def test_several_nics_are_a_finding_not_a_guess(tmp_path: Path) -> None:
    interfaces = INTERFACES + "\nauto ens224\niface ens224 inet static\n  address 10.1.1.2/24\n"
    disk = _disk(tmp_path, {"etc/network/interfaces": interfaces, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert final == {}
    (f,) = findings
    assert f.severity == "warning" and "ens192" in f.message and "ens224" in f.message


def test_vlan_and_bridge_on_one_nic_pin_that_nic(tmp_path: Path) -> None:
    interfaces = (
        "auto br0\niface br0 inet dhcp\n  bridge_ports ens33\n\n"
        "auto ens33.10\niface ens33.10 inet manual\n"
    )
    disk = _disk(tmp_path, {"etc/network/interfaces.d/br": interfaces, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert findings == []
    assert final[PIN_RULES].rstrip().endswith('NAME="ens33"')


@pytest.mark.parametrize(
    ("files", "pinned"),
    [
        ({"etc/default/grub": 'GRUB_CMDLINE_LINUX="net.ifnames=0 biosdevname=0"\n'}, False),
        (PREDICTABLE, True),
        ({}, False),  # no udev naming rules at all: an old udev, kernel names
    ],
)
def test_eth0_is_pinned_only_where_udev_would_rename_it(
    tmp_path: Path, files: dict[str, str], pinned: bool
) -> None:
    interfaces = "auto eth0\niface eth0 inet dhcp\n"
    disk = _disk(
        tmp_path, {"etc/network/interfaces": interfaces, "etc/udev/rules.d/x": "", **files}
    )
    final, findings = _network("kvm", disk)
    assert findings == []
    assert (PIN_RULES in final) == pinned


def test_red_hat_ifcfg_and_networkmanager(tmp_path: Path) -> None:
    ifcfg = f"TYPE=Ethernet\nBOOTPROTO=dhcp\nNAME=ens192\nDEVICE=ens192\nHWADDR={MAC}\n"
    keyfile = (
        "[connection]\nid=Wired\ntype=ethernet\ninterface-name=ens192\n\n"
        f"[ethernet]\nmac-address={MAC.upper()}\n"
    )
    files = {
        "etc/sysconfig/network-scripts/ifcfg-ens192": ifcfg,
        "etc/NetworkManager/system-connections/Wired.nmconnection": keyfile,
        "usr/lib/udev/rules.d/80-net-setup-link.rules": "# naming\n",
        "etc/udev/rules.d/x": "",
    }
    disk = _disk(tmp_path, files)
    final, findings = _network("kvm", disk)
    assert findings == []
    assert (
        f"# vmferry: bound to the old NIC: HWADDR={MAC}"
        in final["/etc/sysconfig/network-scripts/ifcfg-ens192"]
    )
    assert final[PIN_RULES].rstrip().endswith('NAME="ens192"')
    _apply_and_check(tmp_path, disk, "kvm")


def test_pin_rule_parses_cleanly_in_udev(tmp_path: Path) -> None:
    """udev's own rule parser (``udevadm test``, in a private mount namespace so the host's
    rules and database are untouched) reads the rule without complaint, while a broken
    copy of it is reported: the oracle can fail."""
    require_tool("udevadm")
    require_tool("unshare")
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace needs root")
    rules = tmp_path / "rules"
    rules.mkdir()
    good = pin_rule_text("ens192", "kvm", ["/etc/network/interfaces"])
    (rules / "70-vmferry-net.rules").write_text(good)
    (rules / "71-broken.rules").write_text(good.replace('DRIVERS=="', 'DRIVERS="'))
    script = (
        # a fresh /run of its own: udev's runtime directory need not exist on the host
        f"mount --bind {rules} /etc/udev/rules.d && mount -t tmpfs tmpfs /run && "
        "mkdir /run/udev && "
        "udevadm test --action=add /sys/class/net/lo"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    log = proc.stdout + proc.stderr
    assert "Reading rules file: /etc/udev/rules.d/70-vmferry-net.rules" in log, log[-2000:]
    complaints = [ln for ln in log.splitlines() if "70-vmferry-net.rules:" in ln]
    assert complaints == []
    assert any("71-broken.rules:" in ln and "Invalid" in ln for ln in log.splitlines())


def test_persistent_net_name_is_kept_for_the_config_that_uses_it(tmp_path: Path) -> None:
    # a Debian upgraded from 8: eth0 came from the MAC rule; without it udev would say ens3
    udev = (
        "# generated\n"
        f'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{{address}}=="{MAC}", '
        'ATTR{dev_id}=="0x0", ATTR{type}=="1", KERNEL=="eth*", NAME="eth0"\n'
    )
    files = {
        "etc/udev/rules.d/70-persistent-net.rules": udev,
        "etc/network/interfaces": "allow-hotplug eth0\niface eth0 inet dhcp\n",
        **PREDICTABLE,
    }
    disk = _disk(tmp_path, files)
    final, findings = _network("kvm", disk)
    assert findings == []
    assert final["/etc/udev/rules.d/70-persistent-net.rules"].endswith(
        "# vmferry: bound to the old NIC: " + udev.splitlines()[1] + "\n"
    )
    assert final[PIN_RULES].rstrip().endswith('NAME="eth0"')
    _apply_and_check(tmp_path, disk, "kvm")


def test_custom_name_from_a_link_file_is_pinned(tmp_path: Path) -> None:
    link = f"[Match]\nMACAddress={MAC}\n\n[Link]\nName=lan0\n"
    network = f"[Match]\nName=lan0\nMACAddress={MAC}\n\n[Network]\nDHCP=yes\n"
    files = {
        "etc/systemd/network/10-lan0.link": link,
        "etc/systemd/network/20-lan0.network": network,
        **PREDICTABLE,
    }
    disk = _disk(tmp_path, files)
    final, findings = _network("kvm", disk)
    assert findings == []
    assert "/etc/systemd/network/10-lan0.link" not in final  # stops matching; harmless
    assert final["/etc/systemd/network/20-lan0.network"] == network.replace(
        f"MACAddress={MAC}", f"# vmferry: bound to the old NIC: MACAddress={MAC}"
    )
    assert final[PIN_RULES].rstrip().endswith('NAME="lan0"')
    _apply_and_check(tmp_path, disk, "kvm")


def test_networkd_mac_only_match_becomes_any_ethernet(tmp_path: Path) -> None:
    network = f"[Match]\nMACAddress={MAC}\n\n[Network]\nDHCP=yes\n"
    files = {"etc/systemd/network/50-wired.network": network, **PREDICTABLE}
    disk = _disk(tmp_path, files)
    final, findings = _network("kvm", disk)
    assert findings == []
    after = final["/etc/systemd/network/50-wired.network"]
    assert after == network.replace(
        f"MACAddress={MAC}\n", f"# vmferry: bound to the old NIC: MACAddress={MAC}\nName=en* eth*\n"
    )
    assert PIN_RULES not in final
    _apply_and_check(tmp_path, disk, "kvm")
    # two such files: which is which is unknowable
    files["etc/systemd/network/60-other.network"] = network.replace(MAC, "00:0c:29:00:00:09")
    final, findings = _network("kvm", _disk(tmp_path / "two", files))
    assert final == {} and len(findings) == 2


def test_ifcfg_backups_do_not_count_as_nics(tmp_path: Path) -> None:
    ifcfg = "DEVICE=ens192\nBOOTPROTO=dhcp\n"
    files = {
        "etc/sysconfig/network-scripts/ifcfg-ens192": ifcfg,
        "etc/sysconfig/network-scripts/ifcfg-ens160.bak": ifcfg.replace("192", "160"),
        **PREDICTABLE,
    }
    final, findings = _network("kvm", _disk(tmp_path, files))
    assert findings == []
    assert final[PIN_RULES].rstrip().endswith('NAME="ens192"')


def test_bond_members_written_as_empty_flow_mappings_count_as_nics(tmp_path: Path) -> None:
    yaml_text = (
        "network:\n  version: 2\n  ethernets:\n    ens192: {}\n    ens224: {}\n"
        "  bonds:\n    bond0:\n      interfaces: [ens192, ens224]\n      dhcp4: true\n"
    )
    disk = _disk(tmp_path, {"etc/netplan/01-bond.yaml": yaml_text, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert final == {}
    (f,) = findings  # two NICs: reported, not guessed
    assert "ens192" in f.message and "ens224" in f.message
    gen = netplan_generate(tmp_path, {"/etc/netplan/01-bond.yaml": yaml_text})
    assert "Name=ens192" in gen["run/systemd/network/10-netplan-ens192.network"]


def test_netplan_id_without_match_is_pinned(tmp_path: Path) -> None:
    yaml_text = "network:\n  version: 2\n  ethernets:\n    ens160:\n      dhcp4: true\n"
    disk = _disk(tmp_path, {"etc/netplan/00-installer-config.yaml": yaml_text, **PREDICTABLE})
    final, findings = _network("kvm", disk)
    assert findings == []
    assert set(final) == {PIN_RULES}
    assert final[PIN_RULES].rstrip().endswith('NAME="ens160"')
    # netplan's own reading: the definition wants exactly that interface name
    gen = netplan_generate(tmp_path, {"/etc/netplan/00-installer-config.yaml": yaml_text})
    assert "Name=ens160" in gen["run/systemd/network/10-netplan-ens160.network"]
