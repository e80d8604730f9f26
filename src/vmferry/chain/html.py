"""``vmferry du --html``: one self-contained page (inline SVG, no scripts, no network)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from vmferry.chain.discover import Forest, Node

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:2em}
table{border-collapse:collapse}
td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
.legend span{display:inline-block;width:1em;height:1em;margin:0 .3em 0 1em;vertical-align:middle}
.problem{color:#b00}
"""
_COLORS = {"used": "#4477aa", "memory": "#ccbb44", "growth": "#ee6677"}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _bars(chains: list[dict[str, Any]]) -> str:
    width, row, label_w = 900, 34, 220
    scale_max = max((c["worst_case_bytes"] for c in chains), default=1) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{row * len(chains) + 10}" role="img" aria-label="used vs worst case">'
    ]
    for i, c in enumerate(chains):
        y = i * row + 5
        mem = sum(m["used_bytes"] for m in c["memory_files"])
        disk_used = c["used_bytes"] - mem
        growth = max(c["worst_case_bytes"] - c["used_bytes"], 0)
        x = label_w
        parts.append(f'<text x="0" y="{y + 18}" font-size="13">{html.escape(c["name"])}</text>')
        for kind, value in (("used", disk_used), ("memory", mem), ("growth", growth)):
            w = (width - label_w - 120) * value / scale_max
            if w > 0:
                parts.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="22" '
                    f'fill="{_COLORS[kind]}"><title>{kind}: {_gib(value)}</title></rect>'
                )
            x += w
        parts.append(
            f'<text x="{x + 6:.1f}" y="{y + 16}" font-size="12">'
            f"{_gib(c['used_bytes'])} / {_gib(c['worst_case_bytes'])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _tree_svg(forest: Forest, root: Node) -> str:
    """Boxes per layer, children indented under their parent, lines for the links."""
    rows: list[tuple[int, Node]] = []

    def walk(node: Node, depth: int) -> None:
        rows.append((depth, node))
        for child in node.children:
            walk(child, depth + 1)

    walk(root, 0)
    row_h, indent, box_w = 30, 36, 420
    width = indent * max(d for d, _ in rows) + box_w + 20
    height = row_h * len(rows) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    pos: dict[int, tuple[float, float]] = {}
    for i, (depth, node) in enumerate(rows):
        x, y = depth * indent + 5, i * row_h + 5
        pos[id(node)] = (x, y)
        if node.parent is not None and id(node.parent) in pos:
            px, py = pos[id(node.parent)]
            out.append(f'<path d="M{px + 10} {py + 22} V{y + 11} H{x}" stroke="#888" fill="none"/>')
        color = "#fdd" if node.problem else ("#dfd" if node.used_by else "#eef")
        label = (
            f"{node.path.name} — {node.format}, {_gib(node.file_size)} of {_gib(node.virtual_size)}"
        )
        if node.used_by:
            label += " (in use)"
        out.append(
            f'<rect x="{x}" y="{y}" width="{box_w}" height="22" rx="4" fill="{color}" '
            f'stroke="#889"/><text x="{x + 6}" y="{y + 15}" font-size="12">'
            f"{html.escape(label)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def render_du_html(forest: Forest, report: dict[str, Any], scanned: list[str]) -> str:
    chains = report["chains"]
    total = report["total"]
    body = [
        f"<h1>vmferry du — {html.escape(', '.join(scanned))}</h1>",
        f"<p>{total['files']} images in {total['chains']} chains: "
        f"<b>{_gib(total['used_bytes'])}</b> used now, "
        f"<b>{_gib(total['worst_case_bytes'])}</b> in the worst case.</p>",
        '<p class="legend"><span style="background:#4477aa"></span>disk files now'
        '<span style="background:#ccbb44"></span>memory state'
        '<span style="background:#ee6677"></span>growth until every leaf is full</p>',
        _bars(chains),
        "<h2>Chains</h2>",
    ]
    for root, c in zip(forest.roots, chains, strict=True):
        body.append(f"<h3>{html.escape(c['name'])}</h3>")
        body.append(_tree_svg(forest, root))
        body.append(
            "<table><tr><th>file</th><th>role</th><th>used</th><th>allocated</th>"
            "<th>worst case</th></tr>"
        )
        for f in c["files"] + [
            {**m, "role": "memory", "worst_case_bytes": m["used_bytes"]} for m in c["memory_files"]
        ]:
            cls = ' class="problem"' if f.get("problem") else ""
            body.append(
                f"<tr{cls}><td>{html.escape(Path(f['path']).name)}</td><td>{html.escape(f['role'])}"
                f"{' (' + html.escape(f['problem']) + ')' if f.get('problem') else ''}</td>"
                f"<td>{_gib(f['used_bytes'])}</td><td>{_gib(f['allocated_bytes'])}</td>"
                f"<td>{_gib(f['worst_case_bytes'])}</td></tr>"
            )
        body.append("</table>")
        if c["away_from_vm"]:
            body.append(
                '<p class="problem">Stored away from the VM\'s folder: '
                + html.escape(", ".join(c["away_from_vm"]))
                + "</p>"
            )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>vmferry du</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
