"""systemd-networkd's own files in /etc/systemd/network, bound to the old NIC.

A ``.network`` file whose ``[Match]`` names the old MAC address (``MACAddress=``,
``PermanentMACAddress=``), driver (``Driver=``) or PCI path (``Path=``) configures nothing on
the target.  Those lines are commented out (marked ``vmferry:``) when a ``Name=`` line still
says which interface the file is for; when they were the only match and this is the guest's
only such file, a ``Name=en* eth*`` line (any ethernet NIC, kernel or predictable name) follows
them (systemd files allow comments on lines of their own only).  An empty ``[Match]`` would
match every link, loopback and bridges included, so anything else is a finding.

A ``.link`` file renaming the old NIC by MAC/path simply stops matching on the target and is
left alone; the name it gave is one the configs may expect, so it is returned for pinning
(:mod:`.network_names`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vmferry.guest.linux.rules.base import PlanContext

DIR = "/etc/systemd/network"
MARK = "# vmferry: bound to the old NIC: "
BOUND = ("MACAddress", "PermanentMACAddress", "Driver", "Path")
ANY_ETHERNET = "Name=en* eth*"
WHY = "the target's NIC has another MAC address, driver and PCI path: match by name"
_LINE = re.compile(r"^\s*([A-Za-z]+)\s*=\s*(.*?)\s*$")


@dataclass
class NetworkdResult:
    names: dict[str, set[str]] = field(default_factory=dict)  # expected NIC names, by file
    link_names: set[str] = field(default_factory=set)  # names .link files gave by hardware
    unresolved: bool = False


def _sections(text: str) -> list[tuple[str, int, str, str]]:
    """(section, line index, key, value) for every ``key=value`` line."""
    out, section = [], ""
    for n, line in enumerate(text.split("\n")):
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        m = _LINE.match(line)
        if m and not s.startswith(("#", ";")):
            out.append((section, n, m.group(1), m.group(2)))
    return out


def plan_networkd(ctx: PlanContext, rule: str) -> NetworkdResult:
    result = NetworkdResult()
    entries = sorted(ctx.guest.try_listdir(DIR), key=lambda e: e.name)
    texts: dict[str, str] = {}
    for e in entries:
        if e.kind == "file" and e.name.endswith((".network", ".link")):
            text = ctx.read(f"{DIR}/{e.name}")
            if text is not None:
                texts[f"{DIR}/{e.name}"] = text
    bound_networks = [
        p
        for p, t in texts.items()
        if p.endswith(".network")
        and any(s == "Match" and k in BOUND for s, _, k, _ in _sections(t))
    ]
    for path, text in texts.items():
        lines = _sections(text)
        match = [(n, k, v) for s, n, k, v in lines if s == "Match"]
        bound = [(n, k, v) for n, k, v in match if k in BOUND]
        if path.endswith(".link"):
            if bound:
                result.link_names.update(v for s, _, k, v in lines if s == "Link" and k == "Name")
            continue
        names = {w for _, k, v in match if k == "Name" for w in v.split()}
        if names:
            result.names[path] = {n for n in names if not any(c in n for c in "*?[!")}
        if not bound:
            continue
        out = text.split("\n")
        specific = result.names.get(path)
        if specific or (names and len(bound_networks) == 1):
            for n, _, _ in bound:
                out[n] = MARK + out[n]
        elif not names and len(bound_networks) == 1 and len(match) == len(bound):
            for n, _, _ in bound:
                out[n] = MARK + out[n]
            # systemd files have no trailing comments: the marked line says why
            out[bound[0][0]] += "\n" + ANY_ETHERNET
        else:
            ctx.find(
                rule,
                "warning",
                "this networkd file matches its link by MAC address, driver or PCI path and "
                "which new NIC it means cannot be known offline (other keys or other such "
                "files); left alone",
                path,
            )
            result.unresolved = True
            continue
        ctx.edit(rule, path, "\n".join(out), WHY)
    return result
