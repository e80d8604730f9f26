"""netplan: ethernet definitions matched by MAC address (or NIC driver) made portable.

cloud-init and many installers write ``match: {macaddress: ...}`` plus ``set-name: NAME``; the
new virtual NIC has another MAC (and often another driver), so nothing matches and the guest
comes up without network.  The match is rewritten to the *name* the configuration wants:

* with ``set-name: NAME``: ``macaddress:`` becomes ``name: NAME`` and ``driver:`` goes; the
  interface gets NAME from the udev rule of :mod:`.network_names` (netplan itself renames
  only on MAC or driver matches, which cannot be kept), so the definition matches it;
* without ``set-name``, when it is the guest's only ethernet definition: ``name: "e*"``, any
  ethernet NIC (kernel ``eth*`` and predictable ``en*`` names alike);
* several such definitions, unknown match keys, or YAML outside the subset
  :mod:`.network_yaml` reads: a finding, the file is left alone (which old MAC belongs to
  which new NIC cannot be known offline).

Edits are line edits: comments, layout and every other line stay byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vmferry.guest.linux.rules.base import PlanContext
from vmferry.guest.linux.rules.network_yaml import (
    Mapping,
    Opaque,
    Scalar,
    UnsupportedYamlError,
    last_line,
    parse,
)

DIRS = ("/etc/netplan",)
GLOB = '"e*"'
MATCH_KEYS = frozenset({"macaddress", "driver", "name"})
BOUND_KEYS = ("macaddress", "driver")
WHY = "the target's NIC has another MAC address and driver: match by interface name"
_MENTIONS_NIC = re.compile(r"(?<![\w-])(macaddress|driver)\s*:")
CLOUD_INIT_MARK = re.compile(r"cloud-init|provided by the datasource", re.IGNORECASE)


@dataclass
class NetplanResult:
    """What the network rule needs to know after the netplan pass."""

    #: interface names the (edited) definitions expect to find, by file
    names: dict[str, set[str]] = field(default_factory=dict)
    #: files rewritten that cloud-init generated (regenerated on a new instance)
    cloud_init_files: list[str] = field(default_factory=list)
    #: a definition still bound to hardware (left alone): no name can be pinned safely
    unresolved: bool = False


@dataclass
class _Def:
    path: str
    id: str
    line: int
    value: Mapping | None
    match: Mapping | None
    set_name: str | None


def netplan_files(ctx: PlanContext) -> list[str]:
    out = []
    for base in DIRS:
        for e in sorted(ctx.guest.try_listdir(base), key=lambda e: e.name):
            if e.kind == "file" and e.name.endswith((".yaml", ".yml")):
                out.append(f"{base}/{e.name}")
    return out


def plan_netplan(ctx: PlanContext, rule: str) -> NetplanResult:
    result = NetplanResult()
    defs: list[_Def] = []
    texts: dict[str, str] = {}
    for path in netplan_files(ctx):
        text = ctx.read(path)
        if text is None:
            continue
        try:
            found = _ethernets(path, text)
        except UnsupportedYamlError as exc:
            bound = _MENTIONS_NIC.search(text)
            ctx.find(
                rule,
                "warning" if bound else "info",
                f"netplan file left alone: {exc}"
                + (
                    "; it names a MAC address or NIC driver: check it for the new NIC"
                    if bound
                    else ""
                ),
                path,
            )
            # its NICs are unknown: pinning another config's name could misname them
            result.unresolved |= bool(bound) or "ethernets" in text
            continue
        texts[path] = text
        defs.extend(found)
    ids = [d.id for d in defs]
    bound = [d for d in defs if d.match is not None and _bound(d.match)]
    edits: dict[str, list[tuple[int, int, str | None]]] = {}
    for d in defs:
        if d in bound:
            why_not = _refusal(d, bound, defs, ids)
            if why_not:
                msg = f"netplan definition {d.id}: {why_not}; left alone (keep the MAC "
                ctx.find(rule, "warning", msg + "addresses, or edit it for the new NIC)", d.path)
                result.unresolved = True
                continue
            edits.setdefault(d.path, []).extend(_rewrite(d, texts[d.path]))
        name = _expected_name(d)
        if name is not None:
            result.names.setdefault(d.path, set()).add(name)
    for path, ops in edits.items():
        after = _apply(texts[path], ops)
        ctx.edit(rule, path, after, WHY)
        if CLOUD_INIT_MARK.search(texts[path]) or path.endswith("50-cloud-init.yaml"):
            result.cloud_init_files.append(path)
    return result


def _ethernets(path: str, text: str) -> list[_Def]:
    root = parse(text)
    if root is None:
        return []
    network = root.get("network")
    if network is None:
        return []
    if not isinstance(network, Mapping):
        raise UnsupportedYamlError("'network' is not a block mapping")
    eths = network.get("ethernets")
    if eths is None or (isinstance(eths, Opaque) and eths.text.replace(" ", "") == "{}"):
        return []
    if not isinstance(eths, Mapping):
        raise UnsupportedYamlError("'ethernets' is not a block mapping")
    out = []
    for e in eths.entries:
        value = e.value
        if isinstance(value, Opaque) and value.text.replace(" ", "") == "{}":
            value = None  # "eth1: {}", common for bond and bridge members
        if value is not None and not isinstance(value, Mapping):
            raise UnsupportedYamlError(f"ethernets.{e.key} is not a block mapping")
        match = value.get("match") if value else None
        if match is not None and not isinstance(match, Mapping):
            raise UnsupportedYamlError(f"ethernets.{e.key}.match is not a block mapping")
        set_name = value.get("set-name") if value else None
        if set_name is not None and not isinstance(set_name, Scalar):
            raise UnsupportedYamlError(f"ethernets.{e.key}.set-name is not a scalar")
        out.append(
            _Def(path, e.key, e.line, value, match, set_name.value if set_name else None)
        )  # fmt: skip
    return out


def _refusal(d: _Def, bound: list[_Def], defs: list[_Def], ids: list[str]) -> str | None:
    """Why this hardware-bound definition cannot be rewritten safely (None: it can)."""
    assert d.match is not None
    if ids.count(d.id) > 1:
        return "it is split over several files"
    unknown = set(d.match.entries_keys()) - MATCH_KEYS
    if unknown:
        return f"it also matches on {', '.join(sorted(unknown))}"
    if len(bound) > 1:
        return (
            f"{len(bound)} definitions match NICs by MAC address or driver, and which new NIC "
            "is which cannot be known offline"
        )
    if d.set_name is None and "name" not in d.match.entries_keys() and len(defs) > 1:
        return (
            "it matches a NIC by MAC address without set-name, and a name pattern would also "
            "take the NICs of the other ethernet definitions"
        )
    return None


def _bound(match: Mapping) -> bool:
    return any(k in match.entries_keys() for k in BOUND_KEYS)


def _expected_name(d: _Def) -> str | None:
    """The interface name this definition needs on the target (None: any name will do)."""
    if d.set_name:
        return d.set_name
    if d.match is not None:
        name = d.match.get("name")
        if isinstance(name, Scalar) and not any(c in name.value for c in "*?["):
            return name.value
        return None
    return d.id


def _rewrite(d: _Def, text: str) -> list[tuple[int, int, str | None]]:
    """Line operations (first, last, replacement or None to delete) for one definition.

    The first MAC/driver entry becomes the name match, carrying a ``# vmferry: was ...``
    comment with the removed one-line entries so the change is visible and reversible.
    """
    assert d.match is not None
    lines = text.split("\n")
    bound = [e for e in d.match.entries if e.key in BOUND_KEYS]
    was = "; ".join(
        lines[e.line].strip()
        for e in bound
        if last_line(e.value, e.line) == e.line and "#" not in lines[e.line]
    )
    note = f"  # vmferry: was {was}" if was else "  # vmferry: was bound to the old NIC"
    ops: list[tuple[int, int, str | None]] = []
    replaced = "name" in d.match.entries_keys()
    for entry in bound:
        end = last_line(entry.value, entry.line)
        if not replaced:
            new = _quote(d.set_name) if d.set_name else GLOB
            ops.append((entry.line, end, " " * entry.indent + f"name: {new}" + note))
            replaced = True
        else:
            ops.append((entry.line, end, None))
    return ops


def _apply(text: str, ops: list[tuple[int, int, str | None]]) -> str:
    lines = text.split("\n")
    for first, last, new in sorted(ops, reverse=True):
        lines[first : last + 1] = [] if new is None else [new]
    return "\n".join(lines)


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_.-]+", name) else '"' + name.replace('"', "") + '"'
