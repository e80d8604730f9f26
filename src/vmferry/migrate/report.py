"""``vmferry migrate --report FILE.html``: the migration document as one self-contained page.

Why render from the ``--json`` document rather than from live objects: the page and the JSON
can never disagree, and a document kept from an earlier run renders the same way later.

The page is for the administrator who signs the migration off, on a desk, a phone or paper:

* self-contained: inline CSS, no script, no image, no font, no link to anything outside the page;
  a Content-Security-Policy forbids every fetch and script, so even a bug in the escaping below
  could not make the page run code or call home;
* everything taken from the document is escaped.  VM names, file names and the guest's own file
  contents are written by whoever controls the source VM; invisible and direction-changing
  characters (C0/C1 controls, bidi overrides, zero-width marks) are shown as ``U+XXXX`` so a name
  cannot pretend to be another;
* meaning never rests on colour alone: diff lines keep their ``+``/``-``, changed values are
  ``<del>``/``<ins>``, severities are written out (the page prints in black and white);
* nothing scrolls sideways: long paths and lines wrap, so a phone shows the whole page.

Long lists are capped (:data:`MAX_DIFF_LINES`, :data:`MAX_EVIDENCE`); the page says how many
items it left out, which stay in the JSON document.
"""

from __future__ import annotations

import html
import math
import os
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmferry.errors import UsageError
from vmferry.migrate.findings import SEVERITIES
from vmferry.migrate.result import SCHEMA

#: lines of one guest file's diff shown on the page
MAX_DIFF_LINES = 2000
#: evidence lines shown under one finding
MAX_EVIDENCE = 50
#: list items (layers, notes, outputs, ...) shown in one list
MAX_ITEMS = 500

_STYLE = """
:root{--add:#e6ffec;--del:#ffebe9;--hunk:#ddf4ff;--chg:#fff8c5;--line:#d0d7de;--muted:#57606a}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,sans-serif;color:#1f2328;margin:0 auto;padding:1em;max-width:72em;
overflow-wrap:anywhere}
h1{font-size:1.45em;margin:.2em 0} h2{font-size:1.2em;margin:1.8em 0 .5em;
border-bottom:2px solid var(--line)} h3{font-size:1.05em;margin:1.2em 0 .4em}
h4{font-size:1em;margin:0 0 .3em}
table{border-collapse:collapse;width:100%;margin:.3em 0 1em}
th,td{padding:.25em .5em;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{overflow-wrap:break-word} thead th{border-bottom:2px solid var(--line)}
tbody th{font-weight:600;width:11em}
td.num{text-align:right;white-space:nowrap}
code,pre{font:13px/1.4 ui-monospace,monospace}
.muted,.none{color:var(--muted)}
.ctl{border:1px solid #cf222e;color:#cf222e;border-radius:3px;padding:0 .15em;font-size:.8em}
.status{display:inline-block;padding:.1em .6em;border-radius:1em;font-weight:700;
border:2px solid currentColor}
.status-completed{color:#1a7f37} .status-planned{color:#0969da}
.status-blocked,.status-failed,.status-unknown{color:#cf222e}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.6em 0}
dl.facts dt{font-weight:600} dl.facts dd{margin:0}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.3em 1em}
tr.chg td,tr.chg th{background:var(--chg)}
del{color:#82071e} ins{color:#116329;text-decoration-thickness:2px}
.sevgroup{margin:0 0 1em}
.finding{border-left:4px solid var(--line);padding:.2em .7em;margin:.5em 0}
.finding p{margin:.15em 0} .finding .muted{font-size:.85em}
.blockers{border:2px solid #cf222e;border-radius:6px;padding:.3em .8em;margin:.5em 0}
.blockers ul{margin:.2em 0}
.sev-blocker{border-color:#cf222e} .sev-will-fix{border-color:#0969da}
.sev-warning{border-color:#bf8700} .sev-info{border-color:#8c959f}
.sevname{font-weight:700;text-transform:uppercase;font-size:.8em;letter-spacing:.05em}
.evidence{margin:.2em 0;padding-left:1.2em}
.evidence code.text{display:block;background:#f6f8fa;padding:.1em .4em;white-space:pre-wrap}
.action{margin:.2em 0}
.change{border:1px solid var(--line);border-radius:6px;margin:.8em 0;page-break-inside:avoid}
.change h4{background:#f6f8fa;padding:.4em .6em;margin:0;border-bottom:1px solid var(--line)}
.change p{margin:.3em .6em}
pre.diff{margin:0;padding:.3em 0;white-space:pre-wrap}
pre.diff span{display:block;padding:0 .6em 0 1.6em;text-indent:-1em;min-height:1.4em}
.diff .add{background:var(--add)} .diff .del{background:var(--del)}
.diff .hunk{background:var(--hunk);color:var(--muted)} .diff .fh{font-weight:700}
.binary{font-family:ui-monospace,monospace;background:var(--add);padding:.3em .6em}
.bad{color:#cf222e;font-weight:700} .good{color:#1a7f37;font-weight:700}
.disk{border:1px solid var(--line);border-radius:6px;padding:.2em .8em;margin:.8em 0;
page-break-inside:avoid}
footer{margin-top:2em;color:var(--muted);font-size:.85em}
@media (max-width:40em){body{padding:.5em} tbody th{width:auto}
table.stack thead{display:none} table.stack tr{display:block;border-bottom:2px solid var(--line)}
table.stack td{display:block;border:0;text-align:left}
table.stack td::before{content:attr(data-label) ": ";font-weight:600}}
@media print{body{max-width:none;font-size:11pt} nav{display:none}
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""

# the page fetches nothing and runs nothing, whatever ends up in it
_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

# C0/C1 controls (tab and newline are kept where text is preformatted), zero-width and
# direction-changing marks: shown by code point instead of acting on the text around them
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb]"
)

_STATUS_TEXT = {
    "completed": "completed",
    "planned": "dry run: nothing was written",
    "blocked": "blocked: nothing was written",
    "failed": "failed",
}
_SEVERITY_TITLE = {
    "blocker": "Blockers: the VM would not boot, nothing is written",
    "will-fix": "Will fix: repaired during the migration",
    "warning": "Warnings: may need a person after the migration",
    "info": "Information",
}


# --- text --------------------------------------------------------------------------------------


def _t(value: Any) -> str:
    """Escaped text of any document value; None is a dash, invisible characters are shown."""
    if value is None:
        return '<span class="none">—</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = html.escape(str(value), quote=True)
    return _INVISIBLE.sub(lambda m: f'<span class="ctl">U+{ord(m.group()):04X}</span>', text)


def _attr(value: Any) -> str:
    """A value for an attribute (quoted by the caller): escaped, invisible characters named."""
    text = "" if value is None else str(value)
    return html.escape(_INVISIBLE.sub(lambda m: f"U+{ord(m.group()):04X}", text), quote=True)


def _code(value: Any) -> str:
    return f"<code>{_t(value)}</code>" if value not in (None, "") else _t(None)


def _num(value: Any) -> int | float | None:
    """A finite number, else None (JSON may carry booleans, NaN or Infinity where a count is)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _size(value: Any) -> str:
    """Binary units, the exact byte count as a tooltip; a non-number is shown as it is."""
    n = _num(value)
    if n is None:
        return _t(value)
    shown: float = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(shown) < 1024 or unit == "PiB":
            text = f"{int(n)} B" if unit == "B" else f"{shown:.1f} {unit}"
            break
        shown /= 1024
    return f'<span title="{int(n):,} bytes">{text}</span>'


def _seconds(value: Any) -> str:
    n = _num(value)
    return _t(value) if n is None else f"{n:.3f} s" if n < 10 else f"{n:.1f} s"


def _count(n: float, what: str) -> str:
    """``1 warning``, ``2 warnings``; ``will-fix`` and ``info`` do not take a plural."""
    plural = n != 1 and what in ("blocker", "warning")
    return f"{n:g} {what}{'s' if plural else ''}"


def _total(items: list[dict[str, Any]], key: str) -> float:
    return sum(_num(d.get(key)) or 0 for d in items)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(values: Iterable[Any], render: Any = _t, limit: int = MAX_ITEMS) -> str:
    values = list(values)
    if not values:
        return '<p class="none">none</p>'
    out = [f"<li>{render(v)}</li>" for v in values[:limit]]
    if len(values) > limit:
        out.append(f'<li class="muted">… {len(values) - limit} more in the JSON document</li>')
    return "<ul>" + "".join(out) + "</ul>"


def _facts(rows: list[tuple[str, str]]) -> str:
    return (
        '<dl class="facts">'
        + "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows)
        + "</dl>"
    )


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return (
        "<table><tbody>"
        + "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
        + "</tbody></table>"
    )


# --- the document ------------------------------------------------------------------------------


def _check(doc: Any) -> dict[str, Any]:
    """Refuse what is not a migrate document of the schema this page was written for."""
    if not isinstance(doc, dict):
        raise UsageError("the report needs a vmferry migrate document (a JSON object)")
    schema = doc.get("schema")
    if schema != SCHEMA:
        raise UsageError(
            f"not a {SCHEMA} document (schema {str(schema)[:60]!r})",
            hint="render it with the vmferry version that wrote it",
        )
    missing = [k for k in ("status", "source", "target", "findings", "disks") if k not in doc]
    if missing:
        raise UsageError(f"the migrate document lacks {', '.join(missing)}")
    return doc


def _status(doc: dict[str, Any]) -> str:
    status = doc.get("status")
    return status if status in _STATUS_TEXT else "unknown"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{title}</h2>{body}</section>'


# --- header ------------------------------------------------------------------------------------


def _header(doc: dict[str, Any], generated: datetime | None) -> str:
    src, tgt = _dict(doc["source"]), _dict(doc["target"])
    status = _status(doc)
    disks = [_dict(d) for d in _list(doc["disks"])]
    summary = _dict(doc.get("summary"))
    timings = _dict(doc.get("timings"))
    written, read = _total(disks, "bytes_written"), _total(disks, "bytes_read")
    seconds = _total(disks, "seconds")
    target = f"{_t(tgt.get('name'))}"
    if tgt.get("requested") not in (None, tgt.get("name")):
        target += f" (asked for {_t(tgt.get('requested'))})"
    target += f": {_t(tgt.get('description'))}, disks as {_t(tgt.get('format'))}"
    target += f", firmware {_t(tgt.get('firmware'))}"
    if tgt.get("boot_controller"):
        target += f", boot disk on {_t(tgt.get('boot_controller'))}"
    when = []
    for key, label in (("started_at", "started"), ("finished_at", "finished")):
        if doc.get(key):
            when.append(f"{label} {_t(doc[key])}")
    if _num(timings.get("total_s")) is not None:
        parts = ", ".join(
            f"{_t(k.removesuffix('_s'))} {_seconds(v)}"
            for k, v in timings.items()
            if k != "total_s"
        )
        when.append(f"took {_seconds(timings['total_s'])}" + (f" ({parts})" if parts else ""))
    if generated is not None:
        when.append(f"report written {generated.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    totals = f"{len(disks)} disk(s)"
    dropped = sum(1 for d in disks if d.get("status") == "not-carried")
    if dropped and isinstance(doc.get("after"), dict):
        totals += f" ({dropped} not carried)"
    totals += (
        f"; {_size(_total(disks, 'virtual_size'))} virtual, "
        f"{_size(_total(disks, 'data_bytes'))} of data"
    )
    if read or written:
        totals += f"; {_size(read)} read, {_size(written)} written"
        if seconds > 0:
            totals += f" in {_seconds(seconds)} ({_size(read / seconds)}/s)"
    counts = ", ".join(
        f'<a href="#sev-{s}">{_count(_num(summary.get(s)) or 0, s)}</a>' for s in SEVERITIES
    )
    rows = [
        ("Source", f"{_code(src.get('path'))} ({_t(src.get('kind'))})"),
        ("Target", target),
        ("Output", _code(doc.get("outdir"))),
    ]
    if doc.get("config_path"):
        rows.append(("Config", _code(doc.get("config_path"))))
    rows += [
        ("Time", "; ".join(when) or _t(None)),
        ("Totals", totals),
        ("Findings", counts),
    ]
    label = _t(_STATUS_TEXT.get(status, doc.get("status")))
    dry = (
        ' <span class="muted">(dry run)</span>'
        if doc.get("dry_run") and status != "planned"
        else ""
    )
    blockers = [
        f"<li>{_t(_dict(f).get('message'))}<br>→ {_t(_dict(f).get('action'))}</li>"
        for f in _list(doc["findings"])
        if _dict(f).get("severity") == "blocker"
    ]
    why = (
        f'<div class="blockers"><strong>Blocked by:</strong><ul>{"".join(blockers)}</ul></div>'
        if blockers
        else ""
    )
    return (
        f"<header><h1>{_t(src.get('name'))}: {_t(src.get('kind'))} → {_t(tgt.get('name'))}</h1>"
        f'<p><span class="status status-{status}" id="status">{label}</span>{dry}</p>'
        f"{why}{_facts(rows)}</header>"
    )


def _nav() -> str:
    links = [
        ("machine", "Before and after"),
        ("findings", "Findings"),
        ("guest", "Guest"),
        ("changes", "Guest changes"),
        ("disks", "Disks"),
        ("space", "Space"),
        ("choices", "Choices"),
        ("resume", "Resume"),
        ("notes", "Notes and errors"),
    ]
    return (
        "<nav><ul>" + "".join(f'<li><a href="#{a}">{t}</a></li>' for a, t in links) + "</ul></nav>"
    )


# --- before and after --------------------------------------------------------------------------


def _row(label: str, before: Any, after: Any, *, render: Any = _t, planned: bool = True) -> str:
    """One before/after row; a value the migration changes is struck out and inserted.
    Without a plan (blocked) there is no after column."""
    b = render(before)
    if not planned:
        return f"<tr><th>{label}</th><td>{b}</td></tr>"
    a = render(after)
    if before != after:
        return (
            f'<tr class="chg"><th>{label}</th><td><del>{b}</del></td><td><ins>{a}</ins></td></tr>'
        )
    return f"<tr><th>{label}</th><td>{b}</td><td>{a}</td></tr>"


def _controllers(disks: list[dict[str, Any]]) -> str:
    seen: list[str] = []
    for d in disks:
        name = f"{d.get('controller')}/{d.get('controller_model') or '?'}"
        if name not in seen:
            seen.append(name)
    return ", ".join(seen)


_VM_ROWS = (
    ("Name", "name"),
    ("Firmware", "firmware"),
    ("Secure Boot", "secure_boot"),
    ("Memory (MiB)", "memory_mb"),
    ("CPUs", "cpus"),
    ("Cores per socket", "cores_per_socket"),
    ("Guest OS id", "guest_os"),
)
_DISK_ROWS = (
    ("controller", "controller", _t),
    ("model", "controller_model", _t),
    ("bus", "bus", _t),
    ("unit", "unit", _t),
    ("format", "format", _t),
    ("size", "size_bytes", _size),
    ("boot order", "boot_order", _t),
    ("file", "path", _code),
)


def _machine(doc: dict[str, Any]) -> str:
    before = _dict(doc.get("before"))
    planned = isinstance(doc.get("after"), dict)
    after = _dict(doc.get("after"))
    cols = 3 if planned else 2
    head = "<thead><tr><th></th><th>before (source)</th>"
    head += "<th>after (target)</th></tr></thead>" if planned else "</tr></thead>"
    out = []
    if not planned:
        out.append(
            '<p class="bad">No target configuration was planned (see the blockers); '
            "the source is shown alone.</p>"
        )
    rows = [_row(label, before.get(k), after.get(k), planned=planned) for label, k in _VM_ROWS]
    rows.insert(
        1,
        _row(
            "Config", before.get("source_format"), _dict(doc["target"]).get("name"), planned=planned
        ),
    )
    rows.append(
        _row(
            "Controllers",
            _controllers([_dict(d) for d in _list(before.get("disks"))]),
            _controllers([_dict(d) for d in _list(after.get("disks"))]),
            planned=planned,
        )
    )
    out.append(f'<table id="vm-table">{head}<tbody>{"".join(rows)}</tbody></table>')
    # disks: each source disk beside the disk the target config describes (by disk index)
    results = {_dict(r).get("index"): _dict(r) for r in _list(doc["disks"])}
    out.append(f'<h3>Disks</h3><table id="disk-table">{head}<tbody>')
    for i, d in enumerate(_dict(x) for x in _list(before.get("disks"))):
        res = results.get(i, {})
        fitted = res.get("fitted")
        label = f"disk {i}" + (" (boot)" if res.get("boot") else "")
        if planned and not isinstance(fitted, dict):
            out.append(
                f'<tr class="chg"><th>{label}</th><td>{_code(d.get("path"))}</td>'
                "<td><ins>not carried</ins></td></tr>"
            )
            continue
        out.append(f'<tr class="group"><th colspan="{cols}">{label}</th></tr>')
        for name, key, render in _DISK_ROWS:
            bval = d.get(key)
            if key == "size_bytes" and bval is None:
                bval = res.get("virtual_size")  # the config may not say; the image does
            if key == "format" and bval is None:
                bval = _dict(res.get("source")).get("format")
            out.append(_row(name, bval, _dict(fitted).get(key), render=render, planned=planned))
    out.append("</tbody></table>")
    # NICs, paired by position
    nb = [_dict(n) for n in _list(before.get("nics"))]
    na = [_dict(n) for n in _list(after.get("nics"))]
    out.append(f'<h3>Network adapters</h3><table id="nic-table">{head}<tbody>')
    if not nb and not na:
        out.append(f'<tr><td colspan="{cols}" class="none">none</td></tr>')
    for i in range(max(len(nb), len(na))):
        b = nb[i] if i < len(nb) else {}
        a = na[i] if i < len(na) else {}
        out.append(f'<tr class="group"><th colspan="{cols}">NIC {i}</th></tr>')
        out.append(_row("model", b.get("model"), a.get("model"), planned=planned))
        out.append(_row("MAC", _mac(b), _mac(a), planned=planned))
        out.append(_row("network", b.get("network"), a.get("network"), planned=planned))
    out.append("</tbody></table>")
    extra = [
        _row(label, len(_list(before.get(k))), len(_list(after.get(k))), planned=planned)
        for label, k in (
            ("CD/DVD drives", "cdroms"),
            ("Serial ports", "serial_ports"),
            ("Snapshots", "snapshots"),
        )
    ]
    out.append(f"<h3>Other devices</h3><table>{head}<tbody>{''.join(extra)}</tbody></table>")
    unsupported = _list(before.get("unsupported"))
    if unsupported:
        out.append(
            "<p>In the source config but not understood by vmferry:</p>" + _items(unsupported)
        )
    return _section("machine", "Before and after", "".join(out))


def _mac(nic: dict[str, Any]) -> str | None:
    if not nic:
        return None
    mac = nic.get("mac")
    if mac is None:
        return "assigned by the target"
    return f"{mac} ({'static' if nic.get('mac_static') else 'generated'})"


# --- findings ----------------------------------------------------------------------------------


def _evidence(items: list[Any]) -> str:
    if not items:
        return ""
    out = []
    for e in items[:MAX_EVIDENCE]:
        e = _dict(e)
        where = _t(e.get("path")) + (f":{_t(e['line'])}" if e.get("line") is not None else "")
        text = f'<code class="text">{_t(e["text"])}</code>' if e.get("text") is not None else ""
        out.append(f"<li><code>{where}</code>{text}</li>")
    if len(items) > MAX_EVIDENCE:
        out.append(
            f'<li class="muted">… {len(items) - MAX_EVIDENCE} more in the JSON document</li>'
        )
    return '<ul class="evidence">' + "".join(out) + "</ul>"


def _findings(doc: dict[str, Any]) -> str:
    findings = [_dict(f) for f in _list(doc["findings"])]
    out = []
    for sev in SEVERITIES:
        group = [f for f in findings if f.get("severity") == sev]
        body = []
        for f in group:
            disk = f" · disk {_t(f['disk'])}" if f.get("disk") is not None else ""
            body.append(
                f'<article class="finding sev-{sev}"><h4><span class="sevname">{sev}</span> '
                f"{_t(f.get('message'))}</h4>"
                f'<p class="muted">{_t(f.get("code"))}{disk}</p>'
                f"{_evidence(_list(f.get('evidence')))}"
                f'<p class="action">→ {_t(f.get("action"))}</p></article>'
            )
        out.append(
            f'<div class="sevgroup" id="sev-{sev}"><h3>{_SEVERITY_TITLE[sev]} ({len(group)})</h3>'
            + ("".join(body) or '<p class="none">none</p>')
            + "</div>"
        )
    other = [f for f in findings if f.get("severity") not in SEVERITIES]
    if other:  # a newer vmferry's severity: shown, not dropped
        out.append(
            "<h3>Other</h3>"
            + "".join(
                f'<article class="finding"><h4>{_t(f.get("severity"))}: '
                f"{_t(f.get('message'))}</h4>{_evidence(_list(f.get('evidence')))}"
                f'<p class="action">→ {_t(f.get("action"))}</p>'
                "</article>"
                for f in other
            )
        )
    return _section("findings", "Preflight findings", "".join(out))


# --- guest -------------------------------------------------------------------------------------


def _guest(doc: dict[str, Any]) -> str:
    guest = doc.get("guest")
    if not isinstance(guest, dict):
        return _section(
            "guest", "Guest", '<p class="none">No guest operating system was inspected.</p>'
        )
    os_info = _dict(guest.get("os"))
    if os_info.get("family") == "windows":
        body = "<p>A Windows guest: vmferry's repair rules are for Linux; it is not changed.</p>"
        return _section("guest", "Guest", body + _items(_list(guest.get("evidence"))))
    boot = _dict(guest.get("bootloader"))
    rows = [
        (
            "System",
            f"{_t(os_info.get('pretty_name') or os_info.get('distro'))} "
            f"({_t(os_info.get('arch'))})",
        ),
        ("On disk", _t(guest.get("disk"))),
        ("Partition table", _t(guest.get("partition_table"))),
        ("Firmware", _t(guest.get("firmware"))),
        (
            "Boot loader",
            f"{_t(boot.get('type'))}; "
            + ", ".join(_code(c) for c in _list(boot.get("configs"))[:MAX_ITEMS]),
        ),
        (
            "Guest tools",
            ", ".join(
                f"{_t(_dict(g).get('name'))} ({_t(_dict(g).get('hypervisor'))})"
                for g in _list(guest.get("guest_tools"))
            )
            or _t(None),
        ),
        ("Bootable on the target", _verdict(guest.get("bootable"))),
    ]
    after = next(
        (_dict(d).get("guest_after") for d in _list(doc["disks"]) if _dict(d).get("guest_after")),
        None,
    )
    if isinstance(after, dict):
        remaining = _list(after.get("remaining_changes"))
        errors = _list(after.get("errors"))
        text = _verdict(after.get("bootable"))
        text += (
            "; nothing left to change"
            if not remaining
            else f"; {len(remaining)} change(s) still wanted"
        )
        rows.append(("Re-checked on the written disk", text))
        if remaining or errors:
            rows.append(("Left over", _items([*remaining, *errors])))
    out = [_kv_table(rows), "<h3>Kernels</h3>"]
    kernels = [_dict(k) for k in _list(guest.get("kernels"))]
    if kernels:
        out.append(
            '<table class="stack"><thead><tr><th>version</th><th>image</th><th>initramfs</th>'
            "<th>storage drivers</th></tr></thead><tbody>"
        )
        for k in kernels[:MAX_ITEMS]:
            drivers = ", ".join(_t(x) for x in _list(k.get("drivers"))) or _t(None)
            out.append(
                f'<tr><td data-label="version">{_t(k.get("version"))}</td>'
                f'<td data-label="image">{_code(k.get("image"))}</td>'
                f'<td data-label="initramfs">{_code(k.get("initramfs"))}</td>'
                f'<td data-label="storage drivers">{drivers}</td></tr>'
            )
        out.append("</tbody></table>")
    else:
        out.append('<p class="none">none found</p>')
    return _section("guest", "Guest", "".join(out))


def _verdict(value: Any) -> str:
    if value is True:
        return '<span class="good">yes</span>'
    if value is False:
        return '<span class="bad">no</span>'
    return _t(value)


def _diff(text: str) -> str:
    """A unified diff, one block per line, its ``+``/``-`` kept (colour is not the only sign)."""
    lines = text.splitlines()
    out = []
    for line in lines[:MAX_DIFF_LINES]:
        if line.startswith(("--- ", "+++ ")):
            cls = "fh"
        elif line.startswith("@@"):
            cls = "hunk"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        else:
            cls = "ctx"
        out.append(f'<span class="{cls}">{_t(line)}</span>')
    if len(lines) > MAX_DIFF_LINES:
        out.append(
            f'<span class="muted">… {len(lines) - MAX_DIFF_LINES} more lines '
            "in the JSON document</span>"
        )
    return '<pre class="diff">' + "".join(out) + "</pre>"


def _changes(doc: dict[str, Any]) -> str:
    status = _status(doc)
    disks = [_dict(d) for d in _list(doc["disks"]) if _list(_dict(d).get("guest_changes"))]
    if status == "completed":
        intro = "Written into the output disk only; the source was not changed."
    else:
        intro = "Planned; nothing was written."
    if not disks:
        none = "nothing planned: the migration is blocked" if status == "blocked" else "none"
        return _section("changes", "Guest changes", f'<p class="none">{none}</p>')
    out = [f"<p>{intro} Changes to one file are shown in the order they are made.</p>"]
    for d in disks:
        changes = [_dict(c) for c in _list(d.get("guest_changes"))]
        name = _dict(d.get("output")).get("name")
        out.append(f"<h3>disk {_t(d.get('index'))} → {_code(name)}: {len(changes)} change(s)</h3>")
        for c in changes:
            kind = c.get("kind")
            head = (
                f'<h4><code>{_t(c.get("path"))}</code> <span class="muted">({_t(kind)}, '
                f"rule {_t(c.get('rule'))})</span></h4><p>{_t(c.get('why'))}</p>"
            )
            if kind == "append":  # binary: what was added, not the bytes
                before, after = c.get("size_before"), c.get("size_after")
                grown = (
                    f" (+{_size(after - before)})"
                    if _num(before) is not None and _num(after) is not None
                    else ""
                )
                body = (
                    f'<p class="binary">binary file: {_size(before)} → {_size(after)}{grown}; '
                    f"added: {_t(c.get('summary'))}</p>"
                )
            else:
                body = _diff(str(c.get("diff") or ""))
            out.append(f'<article class="change">{head}{body}</article>')
    return _section("changes", "Guest changes", "".join(out))


# --- disks -------------------------------------------------------------------------------------


def _verify(v: Any) -> str:
    if not isinstance(v, dict):
        return _t(None)
    check = _dict(v.get("check"))
    bad = '<strong class="bad">{}</strong>'.format
    parts = [
        "content digest re-read: " + ("matches" if v.get("digest_ok") else bad("DIFFERS")),
        "beyond the data: " + ("zero" if v.get("tail_zero") else bad("NOT ZERO")),
        "structure check: " + ("clean" if check.get("clean") else bad("PROBLEMS")),
    ]
    head = (
        '<span class="good">verified</span>' if v.get("ok") else '<span class="bad">FAILED</span>'
    )
    problems = [
        *_list(check.get("corruptions")),
        *_list(check.get("leaks")),
        *_list(check.get("notes")),
    ]
    return f"{head}: {'; '.join(parts)}" + (_items(problems) if problems else "")


def _throughput(d: dict[str, Any]) -> str:
    tp = _num(d.get("throughput_bytes_per_s"))
    return f"{_size(tp)}/s" if tp else _t(None)


def _disks(doc: dict[str, Any]) -> str:
    disks = [_dict(d) for d in _list(doc["disks"])]
    if not disks:
        return _section("disks", "Disks", '<p class="none">The VM has no disk.</p>')
    out = [
        '<table class="stack" id="disk-summary"><thead><tr><th>disk</th><th>status</th>'
        "<th>output</th><th>virtual</th><th>data</th><th>written</th><th>time</th>"
        "<th>throughput</th><th>verify</th></tr></thead><tbody>"
    ]
    for d in disks:
        out_ = _dict(d.get("output"))
        v = d.get("verify")
        boot = " (boot)" if d.get("boot") else ""
        vtext = _t(None)
        if isinstance(v, dict):
            vtext = (
                '<span class="good">ok</span>' if v.get("ok") else '<span class="bad">FAILED</span>'
            )
        out.append(
            f'<tr><td data-label="disk">{_t(d.get("index"))}{boot}</td>'
            f'<td data-label="status">{_t(d.get("status"))}</td>'
            f'<td data-label="output">{_code(out_.get("name"))}</td>'
            f'<td data-label="virtual" class="num">{_size(d.get("virtual_size"))}</td>'
            f'<td data-label="data" class="num">{_size(d.get("data_bytes"))}</td>'
            f'<td data-label="written" class="num">{_size(d.get("bytes_written"))}</td>'
            f'<td data-label="time" class="num">{_seconds(d.get("seconds"))}</td>'
            f'<td data-label="throughput" class="num">{_throughput(d)}</td>'
            f'<td data-label="verify">{vtext}</td></tr>'
        )
    out.append("</tbody></table>")
    for d in disks:
        src, o = _dict(d.get("source")), _dict(d.get("output"))
        chain = [_dict(x) for x in _list(src.get("chain"))]
        layers = "".join(
            f"<li>{_code(x.get('path'))} ({_t(x.get('format'))}, file {_size(x.get('file_size'))}"
            f", allocated {_size(x.get('allocated_bytes'))})</li>"
            for x in chain[:MAX_ITEMS]
        )
        if len(chain) > MAX_ITEMS:
            layers += f'<li class="muted">… {len(chain) - MAX_ITEMS} more in the JSON document</li>'
        options = ", ".join(f"{_t(k)}={_t(v)}" for k, v in _dict(o.get("options")).items())
        rows = [
            ("Status", _t(d.get("status"))),
            ("Source", _code(src.get("label"))),
            (
                f"Source chain ({len(chain)} layer{'s' if len(chain) != 1 else ''}, top first)",
                f"<ol>{layers}</ol>" if layers else _t(None),
            ),
            ("Virtual size", _size(d.get("virtual_size"))),
            ("Data in the chain", _size(d.get("data_bytes"))),
            ("Output", _code(o.get("path")) + (" (packed in the OVA)" if o.get("in_ova") else "")),
            (
                "Output format",
                f"{_t(o.get('format'))} (driver {_t(o.get('driver'))})"
                + (f"; {options}" if options else ""),
            ),
            ("Output virtual size", _size(o.get("virtual_size"))),
            ("Space needed", _size(o.get("required_bytes"))),
        ]
        if "file_size" in o:
            rows.append(
                (
                    "Output file",
                    f"{_size(o.get('file_size'))}, allocated {_size(o.get('allocated_bytes'))}",
                )
            )
        rows += [
            ("Read", _size(d.get("bytes_read"))),
            ("Written", _size(d.get("bytes_written"))),
            ("Time", _seconds(d.get("seconds"))),
            ("Throughput", _throughput(d)),
            ("Digest", f"{_code(d.get('digest'))} ({_t(d.get('digest_algorithm'))})"),
            ("Verify", _verify(d.get("verify"))),
        ]
        boot = " (boot)" if d.get("boot") else ""
        out.append(
            f'<div class="disk" id="disk-{_attr(d.get("index"))}">'
            f"<h3>disk {_t(d.get('index'))}{boot}</h3>"
            f"{_kv_table(rows)}</div>"
        )
    return _section("disks", "Disks", "".join(out))


# --- the rest ----------------------------------------------------------------------------------


def _space(doc: dict[str, Any]) -> str:
    space = _dict(doc.get("space"))
    if not space:
        return _section("space", "Space", '<p class="none">not measured</p>')
    need, free = _num(space.get("required")), _num(space.get("available"))
    verdict = ""
    if need is not None and free is not None:
        verdict = (
            '<span class="good">enough</span>'
            if need <= free
            else '<span class="bad">NOT ENOUGH</span>'
        )
    rows = [
        ("Needed", _size(space.get("required"))),
        ("Free", _size(space.get("available"))),
        ("Where", _code(space.get("path"))),
    ]
    if verdict:
        rows.append(("Verdict", verdict))
    rows += [(_t(k), _t(v)) for k, v in space.items() if k not in ("required", "available", "path")]
    return _section("space", "Space", _kv_table(rows))


def _choices(doc: dict[str, Any]) -> str:
    body = (
        "<h3>Choices made for the target</h3>"
        + _items(_list(doc.get("choices")))
        + "<h3>Not carried to the target</h3>"
        + _items(_list(doc.get("not_carried")))
    )
    return _section("choices", "Choices and what is not carried", body)


def _resume(doc: dict[str, Any]) -> str:
    r = _dict(doc.get("resume"))
    if not r:
        return _section("resume", "Resume", '<p class="none">no resume state</p>')
    rows = [
        ("State file", _code(r.get("state_file"))),
        ("This run resumed an earlier one", _t(bool(r.get("resumed")))),
        (
            "Disks kept from the earlier run",
            ", ".join(_t(x) for x in _list(r.get("disks_skipped"))) or _t(None),
        ),
    ]
    if "removed_leftovers" in r:
        rows.append(("Leftovers removed", _items(_list(r.get("removed_leftovers")), _code)))
    rows += [
        (_t(k), _t(v))
        for k, v in r.items()
        if k not in ("state_file", "resumed", "disks_skipped", "removed_leftovers")
    ]
    return _section("resume", "Resume", _kv_table(rows))


def _notes(doc: dict[str, Any]) -> str:
    out = []
    error = doc.get("error")
    if error:
        e = _dict(error)
        rows = (
            [(_t(k), _code(v) if k == "path" else _t(v)) for k, v in e.items()]
            if e
            else [("error", _t(error))]
        )
        out.append('<h3 class="bad" id="error">Error</h3>' + _kv_table(rows))
    out.append(
        "<h3>Notes</h3>"
        + _items([*_list(doc.get("notes")), *_list(_dict(doc["source"]).get("notes"))])
    )
    out.append("<h3>Files written</h3>" + _items(_list(doc.get("outputs")), _code))
    return _section("notes", "Notes and errors", "".join(out))


# --- the page ----------------------------------------------------------------------------------


def render_html(doc: dict[str, Any], *, generated: datetime | None = None) -> str:
    """The page for one migrate document (``MigrationResult.to_json()``); ``generated`` is
    the time shown as the report's own (none when not given, so a render is reproducible)."""
    doc = _check(doc)
    src, tgt = _dict(doc["source"]), _dict(doc["target"])
    title = f"vmferry migrate: {_attr(src.get('name'))} → {_attr(tgt.get('name'))}"
    body = "".join(
        (
            _header(doc, generated),
            _nav(),
            _machine(doc),
            _findings(doc),
            _guest(doc),
            _changes(doc),
            _disks(doc),
            _space(doc),
            _choices(doc),
            _resume(doc),
            _notes(doc),
        )
    )
    from vmferry import __version__

    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{title}</title><style>{_STYLE}</style></head><body>{body}"
        f"<footer>vmferry {_t(__version__)}, document {_t(doc.get('schema'))}</footer>"
        "</body></html>\n"
    )


def write_html(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Render ``doc`` and write it to ``path`` whole or not at all (temporary name, fsync,
    rename).  An existing file at ``path`` is replaced: a report is rewritten by each run."""
    final = Path(os.path.abspath(path))
    if final.is_dir():
        raise UsageError("the report path is a directory", path=str(final))
    if not final.parent.is_dir():
        raise UsageError("the report's directory does not exist", path=str(final.parent))
    text = render_html(doc, generated=datetime.now(UTC))
    tmp = final.with_name(f".{final.name}.vmferry-{secrets.token_hex(4)}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(
            f"cannot write the report: {exc.strerror or exc}", path=str(final)
        ) from None
    return final
